import Foundation
import Testing
import SqueezeCollectives
import SqueezeTransport
import SqueezeEngine
import SqueezeTraining
@testable import SqueezeCluster

// Whole clusters in this process: the real `Coordinator` and `Worker`s (threads) training on
// CIFAR-10, over the in-process control plane and data plane. The protocol's clock is a manual
// one that never moves, so no silence is ever detected by accident and nothing waits on time.

/// Each worker's error, if it failed.
final class WorkerErrors: @unchecked Sendable {
    // @unchecked Sendable: guarded by `lock`.
    private let lock = NSLock()
    private var errors: [String?]
    init(_ n: Int) { errors = Array(repeating: nil, count: n) }
    func set(_ r: Int, _ e: String) { lock.withLock { errors[r] = e } }
    var all: [String?] { lock.withLock { errors } }
}

struct ClusterRun {
    var summary: Result<ClusterSummary, Error>
    var workerErrors: [String?]
    var metrics: [[String: Any]]
    var log: Log
}

/// Runs a cluster of `options.workers` workers to its end.
func runInProcess(_ options: CoordinatorOptions, dataPlane: InProcessDataPlane = InProcessDataPlane(),
                  stop: StopToken = StopToken(), onEvent: @escaping (ClusterEvent) -> Void = { _ in }) throws -> ClusterRun {
    let plane = InProcessControlPlane(), clock = ManualClock(), log = Log(), metrics = MemoryMetrics()
    let n = options.workers
    let errors = WorkerErrors(n)
    let done = DispatchSemaphore(value: 0)
    for r in 0..<n {
        Thread {
            var o = WorkerOptions()
            o.rank = r; o.data = cifarDirectory
            do {
                try Worker(options: o, control: plane, dataPlane: dataPlane, clock: clock, events: { log.add($0) }, log: { log.add($0) }).run()
            } catch {
                errors.set(r, "\(error)")
            }
            done.signal()
        }.start()
    }
    let coordinator = Coordinator(options: options, channel: plane.server, dataPlane: dataPlane, stop: stop, clock: clock,
                                  metrics: metrics, events: { log.add($0); onEvent($0) }, log: { log.add($0) })
    let summary = Result { try coordinator.run() }
    for _ in 0..<n { done.wait() }
    let lines = try metrics.lines.map { try JSONSerialization.jsonObject(with: Data($0.utf8)) as! [String: Any] }
    return ClusterRun(summary: summary, workerErrors: errors.all, metrics: lines, log: log)
}

func clusterOptions(workers n: Int, steps: Int, perWorker: Int = 8, _ configure: (inout CoordinatorOptions) -> Void = { _ in }) -> CoordinatorOptions {
    var o = CoordinatorOptions(bind: "", workers: n, config: clusterConfig(workers: n, steps: steps, perWorker: perWorker))
    o.evaluate = false
    o.quiet = true
    configure(&o)
    return o
}

/// Fails every send of step `step`'s gradients, like a worker whose network broke there.
final class FailingTransport: DataPlaneTransport, @unchecked Sendable {
    // @unchecked Sendable: used by one thread at a time, as any transport.
    let inner: InProcessTransport
    let step: UInt32
    init(_ inner: InProcessTransport, failingAt step: Int) { self.inner = inner; self.step = UInt32(step) }
    var rank: Int { inner.rank }
    var worldSize: Int { inner.worldSize }
    var counters: ByteCounters { inner.counters }
    var boundEndpoint: String { inner.boundEndpoint }
    var interruption: Interruption? {
        get { inner.interruption }
        set { inner.interruption = newValue }
    }
    func resetCounters() { inner.resetCounters() }
    func send(control: UnsafeRawBufferPointer, payload: UnsafeRawBufferPointer, to peer: Int) throws {
        if let header = try? WireHeader.decode(control, from: rank), header.tag.step == step {
            throw CommError.invalidArgument("injected failure sending step \(step)")
        }
        try inner.send(control: control, payload: payload, to: peer)
    }
    func receive<R>(from peer: Int, timeout: Duration, _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws -> R) throws -> R {
        try inner.receive(from: peer, timeout: timeout, body)
    }
    func completeSends(timeout: Duration) throws { try inner.completeSends(timeout: timeout) }
    func abandonSends() { inner.abandonSends() }
    func connect(topology: Topology, endpoints: [String]) throws {}
    func close(flushTimeout: Duration) {}
}

let modelParameters = Network(config: ModelConfig()).parameters.count  // 727,626

@Suite("Cluster in process (coordinator + worker threads)", .serialized)
struct InProcessClusterTests {
    @Test(arguments: [2, 3])
    func ringBytesAreTheCollectivesFormulas(workers n: Int) throws {
        let run = try runInProcess(clusterOptions(workers: n, steps: 2) { $0.bucketBytes = 524_288 })
        let summary = try run.summary.get()
        #expect(run.workerErrors.allSatisfy { $0 == nil }, "\(run.workerErrors)")
        #expect(summary.steps == 2 && summary.finalStep == 2)
        #expect(run.metrics.count == 2 * n)
        let plan = bucketPlan(layerRanges: Network(config: ModelConfig()).layerRanges, bucketBytes: 524_288)
        for line in run.metrics {
            let rank = line["rank"] as! Int
            let expected = plan.map { ringPayloadBytes(count: $0.count, worldSize: n, rank: rank) }
            #expect(line["allreduce_bytes_sent"] as? Int == expected.reduce(0) { $0 + $1.sent })
            #expect(line["allreduce_bytes_received"] as? Int == expected.reduce(0) { $0 + $1.received })
            #expect(line["world_size"] as? Int == n)
        }
        for step in 0..<2 {
            let total = run.metrics.filter { $0["step"] as? Int == step }.reduce(0) { $0 + ($1["allreduce_bytes_sent"] as! Int) }
            #expect(total == 2 * (n - 1) * 4 * modelParameters)
        }
    }

    /// The star hub takes every worker's whole gradient, bucket by bucket and step by step in
    /// lockstep (a bucket out of order would fail its tag check), and sends the average back.
    @Test func starHubAveragesEveryBucketInLockstep() throws {
        let run = try runInProcess(clusterOptions(workers: 2, steps: 3) { $0.algorithm = .star; $0.bucketBytes = 524_288 })
        let summary = try run.summary.get()
        #expect(run.workerErrors.allSatisfy { $0 == nil }, "\(run.workerErrors)")
        #expect(run.metrics.count == 6)
        for line in run.metrics {
            #expect(line["allreduce_bytes_sent"] as? Int == 4 * modelParameters)
            #expect(line["allreduce_bytes_received"] as? Int == 4 * modelParameters)
        }
        #expect(summary.hubBytesReceived == 3 * 2 * 4 * modelParameters)
        #expect(summary.hubBytesSent == 3 * 2 * 4 * modelParameters)
    }

    /// The tree: every rank's bytes are its role's (a leaf's a third of an inner node's with two children),
    /// and its metrics line carries its own theory; ranks end bit-identical (the same weights checksum).
    @Test(arguments: [(1, "none"), (3, "none"), (5, "int8"), (4, "fp16")])
    func treeBytesMatchEachRanksTheory(workers n: Int, compress: String) throws {
        let compression = try GradientCompression(parsing: compress)
        let run = try runInProcess(clusterOptions(workers: n, steps: 2, perWorker: 4) {
            $0.algorithm = .tree; $0.compression = compression; $0.bucketBytes = 524_288
        })
        let summary = try run.summary.get()
        #expect(run.workerErrors.allSatisfy { $0 == nil }, "\(run.workerErrors)")
        #expect(run.metrics.count == 2 * n)
        let plan = bucketPlan(layerRanges: Network(config: ModelConfig()).layerRanges, bucketBytes: 524_288)
        let chunk = CollectiveOptions().chunkBytes
        let copy = plan.reduce(0) { $0 + compression.densePayloadBytes(count: $1.count, chunkBytes: chunk)! }  // one copy of the gradient
        let edges = [1: [0], 3: [2, 1, 1], 4: [2, 2, 1, 1], 5: [2, 3, 1, 1, 1]][n]!
        for line in run.metrics {
            let rank = line["rank"] as! Int
            #expect(line["allreduce_bytes_sent"] as? Int == copy * edges[rank], "rank \(rank)")
            #expect(line["allreduce_bytes_received"] as? Int == copy * edges[rank], "rank \(rank)")
            #expect(line["theory_bytes_sent"] as? Int == copy * edges[rank], "rank \(rank)")
            #expect(line["dense_bytes_sent"] as? Int == 4 * modelParameters * edges[rank], "rank \(rank)")
        }
        #expect(summary.theoryBytesPerRank == edges.map { Double(copy * $0) })
        #expect(summary.perRank.map(\.bytesSent) == edges.map { 2 * copy * $0 })
    }

    /// The chunk size travels in the welcome: with 64 KiB chunks (not the 1 MiB default) int8 sends a
    /// scale per 16,384 elements, and every rank (and the star's hub) cuts the same chunks.
    @Test(arguments: [AllReduceAlgorithm.ring, .star])
    func everyRankCutsTheCoordinatorsChunks(algorithm: AllReduceAlgorithm) throws {
        let chunk = 64 << 10
        let run = try runInProcess(clusterOptions(workers: 2, steps: 1) {
            $0.compression = .int8; $0.algorithm = algorithm; $0.bucketBytes = 524_288; $0.chunkBytes = chunk
        })
        _ = try run.summary.get()
        #expect(run.workerErrors.allSatisfy { $0 == nil }, "\(run.workerErrors)")
        let plan = bucketPlan(layerRanges: Network(config: ModelConfig()).layerRanges, bucketBytes: 524_288)
        #expect(run.metrics.count == 2)
        for line in run.metrics {
            let rank = line["rank"] as! Int
            func sent(_ chunkBytes: Int) -> Int {
                plan.reduce(0) { bytes, bucket in
                    bytes + (algorithm == .ring
                        ? ringPayloadBytes(count: bucket.count, worldSize: 2, rank: rank, compression: .int8, chunkBytes: chunkBytes)!.sent
                        : GradientCompression.int8.densePayloadBytes(count: bucket.count, chunkBytes: chunkBytes)!)
                }
            }
            #expect(sent(chunk) != sent(CollectiveOptions.defaultChunkBytes))  // so the default's chunks would show
            #expect(line["allreduce_bytes_sent"] as? Int == sent(chunk), "rank \(rank)")
        }
    }

    /// What the codecs put on the wire, against the collectives' own formulas per bucket; the
    /// metrics carry the uncompressed reference and the ratio.
    @Test(arguments: [("fp16", AllReduceAlgorithm.ring), ("int8", .star), ("topk:0.01", .ring), ("bf16", .star)])
    func compressedBytesMatchTheCodecs(compress: String, algorithm: AllReduceAlgorithm) throws {
        let compression = try GradientCompression(parsing: compress)
        let run = try runInProcess(clusterOptions(workers: 2, steps: 2) {
            $0.compression = compression; $0.algorithm = algorithm; $0.bucketBytes = 524_288
        })
        _ = try run.summary.get()
        let plan = bucketPlan(layerRanges: Network(config: ModelConfig()).layerRanges, bucketBytes: 524_288)
        let chunk = CollectiveOptions().chunkBytes
        #expect(run.metrics.count == 4)
        for line in run.metrics {
            let rank = line["rank"] as! Int, sent = line["allreduce_bytes_sent"] as! Int
            let dense = algorithm == .ring
                ? plan.reduce(0) { $0 + ringPayloadBytes(count: $1.count, worldSize: 2, rank: rank).sent }
                : 4 * modelParameters
            #expect(line["dense_bytes_sent"] as? Int == dense)
            let ratio = try #require(line["compression_ratio"] as? Double)
            #expect(abs(ratio - Double(dense) / Double(sent)) < 1e-3 * ratio)
            if case .topk(let f) = compression {
                // Every bucket's k pairs cross one link (N = 2), unless some of its largest entries are 0.
                let k = plan.reduce(0) { $0 + GradientCompression.topkPairs(fraction: f, count: $1.count) }
                #expect(sent <= 8 * k && sent > 8 * k * 9 / 10)
                #expect(line["theory_bytes_sent"] as? Int == 8 * k)
            } else {
                let expected = algorithm == .ring
                    ? plan.reduce(0) { $0 + ringPayloadBytes(
                        count: $1.count, worldSize: 2, rank: rank, compression: compression, chunkBytes: chunk)!.sent }
                    : plan.reduce(0) { $0 + compression.densePayloadBytes(count: $1.count, chunkBytes: chunk)! }
                #expect(sent == expected)
                #expect(line["allreduce_bytes_received"] as? Int == expected)
                #expect(line["theory_bytes_sent"] as? Int == expected)
                #expect(ratio > (compression == .int8 ? 3.9 : 1.99))
            }
        }
    }

    /// DGC's sparsity warm-up: the fraction falls step by step (one step an "epoch" here), and so do the
    /// bytes and the theory on every metrics line; momentum correction and clipping ride along.
    @Test func sparsityWarmupBytesFollowTheTheoryStepByStep() throws {
        let dgc = DGCSettings(momentumCorrection: true, localClipNorm: 5, warmupEpochs: 2, stepsPerEpoch: 1)
        let run = try runInProcess(clusterOptions(workers: 2, steps: 4) {
            $0.compression = .topk(fraction: 0.01); $0.config.dgc = dgc; $0.bucketBytes = 524_288
        })
        _ = try run.summary.get()
        let plan = bucketPlan(layerRanges: Network(config: ModelConfig()).layerRanges, bucketBytes: 524_288)
        // 0.01^(1/3) = 21.5%, 0.01^(2/3) = 4.6%, then 1%.
        let fractions = [pow(0.01, 1.0 / 3), pow(0.01, 2.0 / 3), 0.01, 0.01]
        #expect(run.metrics.count == 8)
        for line in run.metrics {
            let step = line["step"] as! Int, sent = line["allreduce_bytes_sent"] as! Int
            let k = plan.reduce(0) { $0 + GradientCompression.topkPairs(fraction: fractions[step], count: $1.count) }
            #expect(line["theory_bytes_sent"] as? Int == 8 * k, "step \(step)")
            #expect(sent <= 8 * k && sent > 8 * k * 9 / 10, "step \(step): \(sent) bytes, theory \(8 * k)")
        }
    }

    /// A stop requested (as a signal would) as training begins: the coordinator stops everyone
    /// after step 2, rank 0 checkpoints there (every rank its error feedback), and a resumed run
    /// ends bit for bit where an uninterrupted one does; then 3 workers continue the 2-worker run.
    /// "+dgc": Deep Gradient Compression's momentum correction, clipping and warm-up too (each rank's
    /// velocity goes into its residual file).
    @Test(arguments: ["none", "int8", "topk:0.05+dgc"])
    func aStopCheckpointsAtItsStepAndResumeIsBitExact(_ codec: String) throws {
        let dir = try temporaryDirectory("inprocess-stop")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let compression = try GradientCompression(parsing: codec.replacingOccurrences(of: "+dgc", with: ""))
        let dgc = codec.hasSuffix("+dgc") ? DGCSettings(momentumCorrection: true, localClipNorm: 1, warmupEpochs: 2, stepsPerEpoch: 1) : nil
        func options(_ n: Int = 2, steps: Int = 4, _ more: (inout CoordinatorOptions) -> Void) -> CoordinatorOptions {
            clusterOptions(workers: n, steps: steps, perWorker: 24 / n) {
                $0.config.schedule = .constant; $0.config.learningRate = 0.02; $0.compression = compression; $0.config.dgc = dgc
                $0.checkpointDirectory = dir + "/ckpt"
                more(&$0)
            }
        }
        let straight = try runInProcess(options { $0.checkpointDirectory = nil; $0.saveWeights = dir + "/straight.safetensors" })
        _ = try straight.summary.get()

        let stop = StopToken()
        let stopped = try runInProcess(options { _ in }, stop: stop) { if $0.event == .ready { stop.request(signal: SIGTERM) } }
        let summary = try stopped.summary.get()
        #expect(summary.interruptedBy == SIGTERM && summary.finalStep == 2)
        #expect(stopped.log.text.contains("rank 1: stopping after step 2 (signal 15)"))
        #expect(stopped.log.events.contains(ClusterEvent(.checkpoint, step: 2, path: dir + "/ckpt/checkpoint-000000002.safetensors")))
        #expect(try Checkpoint.load(path: dir + "/ckpt/checkpoint-000000002.safetensors").step == 2)
        if compression != .none {
            for rank in 0..<2 {
                let file = ResidualFile.path(directory: dir + "/ckpt", step: 2, rank: rank)
                #expect(FileManager.default.fileExists(atPath: file))
                let saved = try ResidualFile.load(directory: dir + "/ckpt", step: 2, rank: rank, worldSize: 2, count: modelParameters)
                #expect(saved.count == (dgc == nil ? 1 : 2) * modelParameters, "\(file): the velocity is saved with momentum correction")
            }
        }

        let resumed = try runInProcess(options { $0.resume = true; $0.saveWeights = dir + "/resumed.safetensors" })
        _ = try resumed.summary.get()
        #expect(resumed.log.text.contains("at step 2"))
        #expect(resumed.metrics.map { $0["step"] as! Int }.sorted() == [2, 2, 3, 3])
        let difference = try byteDifference(dir + "/straight.safetensors", dir + "/resumed.safetensors")
        #expect(difference == nil, "resumed weights differ from the uninterrupted run: \(difference ?? "")")
        if compression != .none { #expect(resumed.log.text.contains("rank 1: error-feedback residual restored from")) }

        // The same global batch over 3 workers continues from the 4-step checkpoint.
        let third = try runInProcess(options(3, steps: 6) { $0.resume = true })
        _ = try third.summary.get()
        #expect(FileManager.default.fileExists(atPath: dir + "/ckpt/checkpoint-000000006.safetensors"))
        if compression != .none {
            // Three workers cannot take over two ranks' residuals: they say so and start from zero.
            #expect(third.log.text.contains("world_size is 2, this run needs 3") && third.log.text.contains("rank2.safetensors does not exist")
                    && !third.log.text.contains("restored"), "\(third.log.text)")
        }
    }

    @Test func aWorkerFailureEndsTheRunNamingItsRankAndStep() throws {
        let failing = InProcessDataPlane { t in t.rank == 1 ? FailingTransport(t, failingAt: 2) as any DataPlaneTransport : t }
        let run = try runInProcess(clusterOptions(workers: 2, steps: 10) { $0.timeout = .seconds(5) }, dataPlane: failing)
        #expect(throws: (any Error).self) { try run.summary.get() }
        if case .failure(let error) = run.summary {
            #expect("\(error)".contains("worker rank 1 failed at step 2: ") && "\(error)".contains("injected failure sending step 2"), "\(error)")
        }
        #expect(run.metrics.map { $0["step"] as! Int }.max() == 1)  // steps 0 and 1 completed
        #expect(run.workerErrors[1]?.contains("injected failure") == true)
        #expect(run.workerErrors[0] != nil)  // told to abort, or its peer vanished
    }
}

/// Worker-side protocol: the test plays the coordinator over the in-process control plane.
@Suite("Worker protocol (in process)", .serialized)
struct WorkerProtocolTests {
    struct FakeCoordinator {
        let plane = InProcessControlPlane()
        let clock = ManualClock()
        let log = Log()
        let errors = WorkerErrors(1)
        let done = DispatchSemaphore(value: 0)

        /// Starts a one-worker run's worker on a thread.
        func startWorker() {
            let (plane, clock, log, errors, done) = (plane, clock, log, errors, done)
            Thread {
                var o = WorkerOptions()
                o.data = cifarDirectory
                do {
                    try Worker(options: o, control: plane, dataPlane: InProcessDataPlane(), clock: clock,
                               events: { log.add($0) }, log: { log.add($0) }).run()
                } catch {
                    errors.set(0, "\(error)")
                }
                done.signal()
            }.start()
        }

        /// The next message other than a heartbeat, waiting for the worker's thread.
        func next() throws -> (peer: [UInt8], message: ControlMessage) {
            while true {
                guard let (peer, frame) = try plane.server.receive(timeout: .seconds(300)) else { throw TestFailure("the worker went quiet") }
                let m = try frame.withUnsafeBytes { try ControlMessage.decode($0, from: "worker") }
                if case .heartbeat = m { continue }
                return (peer, m)
            }
        }

        func welcome(_ config: TrainingConfig, checkpointDirectory: String? = nil, resumeFrom: String? = nil,
                     checksum: String) throws -> (peer: [UInt8], ready: Ready) {
            let (peer, hello) = try next()
            guard case .hello = hello else { throw TestFailure("expected hello, got \(hello.kind)") }
            plane.server.send(ControlMessage.welcome(Welcome(
                rank: 0, worldSize: 1, config: config, algorithm: .ring, compression: .none, bucketBytes: 1 << 20, chunkBytes: 1 << 20, transport: .tcp,
                timeoutSeconds: 10, parametersChecksum: checksum, initWeights: nil, saveWeights: nil, evaluate: false,
                checkpointDirectory: checkpointDirectory, checkpointEvery: 0, keepCheckpoints: 3, resumeFrom: resumeFrom)).encoded(), to: peer)
            guard case .ready(let ready) = try next().message else { throw TestFailure("expected ready") }
            return (peer, ready)
        }
    }

    func config(steps: Int) -> TrainingConfig { clusterConfig(workers: 1, steps: steps) }

    @Test func aSilentCoordinatorIsDetectedAndNamed() throws {
        let c = FakeCoordinator()
        c.startWorker()
        let (peer, ready) = try c.welcome(config(steps: 1000), checksum: checksum(config(steps: 1000)))
        c.plane.server.send(ControlMessage.start(Start(step: 0, endpoints: [ready.dataEndpoint])).encoded(), to: peer)
        guard case .stepReport(let first) = try c.next().message else { Issue.record("no report"); return }
        #expect(first.step == 0)
        c.clock.advance(by: .seconds(11))
        var failure: Failure?
        while failure == nil {
            if case .failure(let f) = try c.next().message { failure = f }
        }
        c.done.wait()
        #expect(failure!.message.contains("rank 0: the coordinator at inproc://coordinator has been silent for 11 s (timeout 10.0 seconds)"),
                "\(failure!.message)")
        #expect(c.errors.all[0] == failure!.message)
    }

    /// The coordinator says "stop after step 3" before the first step ends: rank 0 checkpoints
    /// exactly there and waits for the final stop; a worker given that checkpoint starts at step 3,
    /// and one told to start anywhere else refuses.
    @Test func aStopAtAChosenStepCheckpointsThereAndResumesThere() throws {
        let dir = try temporaryDirectory("worker-stop")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let cfg = config(steps: 1000)
        let c = FakeCoordinator()
        c.startWorker()
        let (peer, ready) = try c.welcome(cfg, checkpointDirectory: dir, checksum: checksum(cfg))
        c.plane.server.send(ControlMessage.start(Start(step: 0, endpoints: [ready.dataEndpoint])).encoded(), to: peer)
        c.plane.server.send(ControlMessage.stop(Stop(reason: "signal 15", afterStep: 3)).encoded(), to: peer)
        var steps = [Int]()
        for _ in 0..<3 {
            guard case .stepReport(let r) = try c.next().message else { Issue.record("expected a report"); return }
            steps.append(r.step)
        }
        #expect(steps == [0, 1, 2])
        c.plane.server.send(ControlMessage.stop(Stop(reason: "run complete")).encoded(), to: peer)
        c.done.wait()
        #expect(c.errors.all[0] == nil, "\(c.errors.all)")
        #expect(c.log.text.contains("rank 0: stopping after step 3 (signal 15)"))
        let path = dir + "/checkpoint-000000003.safetensors"
        #expect(c.log.events == [ClusterEvent(.checkpoint, step: 3, path: path)])
        let checkpoint = try Checkpoint.load(path: path)
        #expect(checkpoint.step == 3)

        // Resume there.
        let network = Network(config: cfg.model)
        try checkpoint.copyWeights(into: network)
        let resumedChecksum = withExtendedLifetime(network) { parametersChecksum(UnsafeBufferPointer(network.parameters.valueBuffer)) }
        for (startAt, accepted) in [(3, true), (0, false)] {
            let r = FakeCoordinator()
            r.startWorker()
            let (peer, ready) = try r.welcome(config(steps: 4), resumeFrom: path, checksum: resumedChecksum)
            #expect(ready.parametersChecksum == resumedChecksum)
            r.plane.server.send(ControlMessage.start(Start(step: startAt, endpoints: [ready.dataEndpoint])).encoded(), to: peer)
            let m = try r.next().message
            if accepted {
                guard case .stepReport(let report) = m else { Issue.record("expected a report, got \(m.kind)"); continue }
                #expect(report.step == 3)
                r.plane.server.send(ControlMessage.stop(Stop(reason: "run complete")).encoded(), to: peer)
            } else {
                guard case .failure(let f) = m else { Issue.record("expected a failure, got \(m.kind)"); continue }
                #expect(f.message.contains("the coordinator starts at step 0, this worker's state is at step 3"), "\(f.message)")
            }
            r.done.wait()
            #expect((r.errors.all[0] == nil) == accepted)
        }
    }
}
