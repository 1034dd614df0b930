import Foundation
import SqueezeComm
import SqueezeEngine
import SqueezeTraining

/// How the coordinator runs a cluster.
public struct CoordinatorOptions: Sendable {
    public var bind: String
    public var workers: Int
    public var config: TrainingConfig
    /// Records in the training set (sizes an epoch for the progress display).
    public var trainingRecords = 50_000
    public var algorithm: AllReduceAlgorithm = .ring
    public var compression: GradientCompression = .none
    public var bucketBytes = 1 << 20
    public var transport = "tcp"
    /// Silence (no heartbeat, no report) after which a worker counts as lost.
    public var timeout: Duration = .seconds(10)
    /// How long to wait for all workers to join.
    public var joinTimeout: Duration = .seconds(120)
    public var metricsPath: String?
    /// Initial weights every worker loads (a path each can read) instead of initialising from the seed.
    public var initWeights: String?
    /// Rank 0 writes the final weights here.
    public var saveWeights: String?
    /// Test accuracy at every epoch end (each worker evaluates 1/N of the test set).
    public var evaluate = true
    /// A directory every worker can reach (a shared filesystem across machines); rank 0 writes
    /// checkpoints there at epoch ends, every `checkpointEvery` steps and at the end of the run.
    public var checkpointDirectory: String?
    public var checkpointEvery = 0
    public var keepCheckpoints = 3
    /// Continue from the newest valid checkpoint in `checkpointDirectory`.
    public var resume = false
    public var quiet = false
    public init(bind: String, workers: Int, config: TrainingConfig) {
        self.bind = bind; self.workers = workers; self.config = config
    }
}

/// Per-rank totals for the summary table.
public struct RankTraffic: Sendable {
    public var steps = 0
    public var bytesSent = 0, bytesReceived = 0, controlBytes = 0
    public var allreduceSeconds = 0.0, stepSeconds = 0.0, computeSeconds = 0.0
}

public struct ClusterSummary: Sendable {
    public var steps: Int
    public var seconds: Double
    public var imagesPerSecond: Double
    public var perRank: [RankTraffic]
    public var theoryBytesPerWorker: Double
    public var hubBytesSent: Int, hubBytesReceived: Int
    public var testAccuracy: Double?
    /// The signal that stopped the run early (after a checkpoint), if any.
    public var interruptedBy: Int32?
    public var finalStep = 0
}

/// Owns a run: rendezvous, ranks, configuration and the initial-weights checksum, metrics from
/// every worker, failure detection (heartbeats) and the end of the run. For `star` it is also the
/// hub that averages every worker's gradients.
public final class Coordinator {
    let options: CoordinatorOptions
    let log: (String) -> Void
    private var identities = [[UInt8]?]()
    private var lastHeard = [ContinuousClock.Instant]()
    private var lastStep = [Int]()
    private var resumeFrom: String?

    public init(options: CoordinatorOptions, log: @escaping (String) -> Void) {
        self.options = options
        self.log = log
    }

    public func run() throws -> ClusterSummary {
        let n = options.workers, config = options.config
        let context = try ZMQContext()
        defer { context.terminate() }
        let server = try ControlServer(context: context, bind: options.bind)
        defer { server.close() }
        let reference = Network(config: config.model, seed: config.seed)
        if let path = options.initWeights { try reference.loadWeights(from: path) }
        var startStep = 0
        if options.resume, let dir = options.checkpointDirectory {
            let (found, skipped) = Checkpoint.newestValid(in: dir)
            for s in skipped { log("skipping checkpoint \(s.path): \(s.reason)") }
            if let found {
                do {
                    try found.checkCompatible(with: config)
                } catch {
                    throw ClusterError("\(error)")
                }
                try found.copyWeights(into: reference)
                startStep = found.step
                resumeFrom = found.path
                log("resuming from \(found.path!) at step \(found.step) (written by \(found.worldSize) worker(s))")
            } else {
                log("no valid checkpoint in \(dir); starting from step 0")
            }
        }
        let checksum = parametersChecksum(UnsafeBufferPointer(reference.parameters.valueBuffer))
        let parameterCount = reference.parameters.count
        let plan = bucketPlan(layerRanges: reference.layerRanges, bucketBytes: options.bucketBytes)
        log("coordinator at \(server.endpoint): waiting for \(n) worker(s); \(config.model.architecture.rawValue), "
            + "\(parameterCount) parameters, \(options.algorithm.rawValue) all-reduce in \(plan.count) bucket(s)"
            + (options.compression == .none ? "" : ", --compress \(options.compression)"))

        // The hub's data plane (star only): rank n of a group of n + 1.
        var hub: ZMQTransport?
        if options.algorithm == .star {
            let host = try localAddress(towards: server.endpoint)
            let bind = options.transport == "ipc" ? "ipc://\(NSTemporaryDirectory())squeezetrain-\(getpid())-hub.ipc" : "tcp://\(host):*"
            hub = try ZMQTransport(rank: n, worldSize: n + 1, bind: bind, context: context)
        }
        defer { hub?.close(flushTimeout: .milliseconds(500)) }

        let endpoints: [String]
        do {
            endpoints = try rendezvous(server, checksum: checksum, parameterCount: parameterCount)
        } catch {
            for id in identities { if let id { server.send(.abort(Abort(reason: String(describing: error))), to: id) } }
            throw error
        }
        var all = endpoints
        if let hub { all.append(hub.boundEndpoint); try hub.connect(topology: .star(hub: n), endpoints: all) }
        var hubThread: HubThread?
        if let hub {
            hubThread = HubThread(hub: StarAllReduceHub(transport: hub, options: CollectiveOptions(timeout: options.timeout),
                                                                   compression: options.compression),
                                  plan: plan, steps: startStep..<config.totalSteps)
        }
        for id in identities { server.send(.start(Start(step: startStep, endpoints: all)), to: id!) }
        log("all \(n) worker(s) ready; training \(config.totalSteps) steps of \(config.batchSize) images (\(config.batchSize / n) per worker)")

        do {
            let summary = try monitor(server, plan: plan, parameterCount: parameterCount, startStep: startStep)
            for id in identities { server.send(.stop(Stop(reason: "run complete")), to: id!) }
            // A run stopped early leaves the hub waiting for a step that never comes; a complete
            // run cannot finish without the hub, so its failure then is real.
            if let failure = hubThread?.join(), summary.interruptedBy == nil { throw failure }
            var s = summary
            if let hub { s.hubBytesSent = hub.counters.payloadBytesSent; s.hubBytesReceived = hub.counters.payloadBytesReceived }
            return s
        } catch {
            for id in identities { if let id { server.send(.abort(Abort(reason: String(describing: error))), to: id) } }
            // The hub's socket must not be closed under it: it ends within one receive timeout.
            hubThread?.cancel()
            if let failure = hubThread?.join(), !(error is StarHubError) { log("\(failure)") }
            throw error
        }
    }

    /// Waits for `workers` hellos and readies; returns each rank's data endpoint.
    private func rendezvous(_ server: ControlServer, checksum: String, parameterCount: Int) throws -> [String] {
        let n = options.workers
        identities = Array(repeating: nil, count: n)
        var endpoints = [String?](repeating: nil, count: n)
        var names = [String](repeating: "", count: n)
        let deadline = ContinuousClock.now + options.joinTimeout
        func rankOf(_ id: [UInt8]) -> Int? { identities.firstIndex { $0 == id } }
        while endpoints.contains(where: { $0 == nil }) {
            guard ContinuousClock.now < deadline else {
                let joined = (0..<n).filter { identities[$0] != nil }
                let missing = (0..<n).filter { endpoints[$0] == nil }
                throw ClusterError("rendezvous timed out after \(options.joinTimeout): \(joined.count) of \(n) worker(s) joined; "
                                   + "rank(s) still missing: \(missing.map(String.init).joined(separator: ", "))")
            }
            guard let (id, frame) = try server.receive(timeout: .milliseconds(200)) else { continue }
            let peer = rankOf(id).map { "worker rank \($0) (\(names[$0]))" } ?? "an unregistered peer"
            guard let message = decodeOrReject(frame, from: peer, id: id, server) else { continue }
            switch message {
            case .hello(let h):
                guard rankOf(id) == nil else { continue }
                let free = (0..<n).filter { identities[$0] == nil }
                let rank = h.requestedRank.flatMap { free.contains($0) ? $0 : nil } ?? free.first
                guard let rank else {
                    let reason = "the run already has its \(n) worker(s)"
                    log("refused \(h.host) pid \(h.pid): \(reason)")
                    server.send(.reject(Reject(reason: reason)), to: id)
                    continue
                }
                if let r = h.requestedRank, r != rank { log("\(h.host) pid \(h.pid) asked for rank \(r), which is taken or out of range; gave rank \(rank)") }
                identities[rank] = id
                names[rank] = "\(h.host) pid \(h.pid)"
                server.send(.welcome(Welcome(rank: rank, worldSize: n, config: options.config, algorithm: options.algorithm,
                                             compression: options.compression,
                                             bucketBytes: options.bucketBytes, transport: options.transport,
                                             timeoutSeconds: seconds(options.timeout), parametersChecksum: checksum,
                                             initWeights: options.initWeights, saveWeights: options.saveWeights,
                                             evaluate: options.evaluate, checkpointDirectory: options.checkpointDirectory,
                                             checkpointEvery: options.checkpointEvery, keepCheckpoints: options.keepCheckpoints,
                                             resumeFrom: resumeFrom)), to: id)
                log("worker \(names[rank]) joined as rank \(rank)")
            case .ready(let r):
                guard let rank = rankOf(id), rank == r.rank else { continue }
                var problems = [String]()
                if r.model != options.config.model { problems.append("its model configuration differs from the run's") }
                if r.parameterCount != parameterCount { problems.append("it has \(r.parameterCount) parameters, the run \(parameterCount)") }
                if r.parametersChecksum != checksum { problems.append("its initial parameters' checksum \(r.parametersChecksum) is not \(checksum)") }
                if !problems.isEmpty {
                    let reason = "worker rank \(rank) (\(names[rank])) rejected: " + problems.joined(separator: "; ")
                    log(reason)
                    server.send(.reject(Reject(reason: reason)), to: id)
                    identities[rank] = nil  // the rank is free again for a correct worker
                    continue
                }
                endpoints[rank] = r.dataEndpoint
            case .failure(let f):
                throw ClusterError("worker rank \(f.rank) failed before training: \(f.message)")
            default:
                continue
            }
        }
        lastHeard = Array(repeating: ContinuousClock.now, count: n)
        lastStep = Array(repeating: 0, count: n)
        return endpoints.map { $0! }
    }

    /// A valid message, or nil after logging the problem and sending the peer a `reject` (the run goes on).
    private func decodeOrReject(_ frame: [UInt8], from peer: String, id: [UInt8], _ server: ControlServer) -> ControlMessage? {
        do {
            return try frame.withUnsafeBytes { try ControlMessage.decode($0, from: peer) }
        } catch {
            log("\(error)")
            server.send(.reject(Reject(reason: String(describing: error))), to: id)
            return nil
        }
    }

    /// Collects reports until every rank has finished the last step; detects failures and silence.
    private func monitor(_ server: ControlServer, plan: [Range<Int>], parameterCount: Int, startStep: Int) throws -> ClusterSummary {
        let n = options.workers, config = options.config
        let metrics = try options.metricsPath.map { try MetricsWriter(path: $0, append: options.resume) }
        let display = ProgressDisplay(prefix: "")
        let expected = TrafficTheory(plan: plan, workers: n, algorithm: options.algorithm, compression: options.compression)
        let theory = expected.bytesSent, uncompressed = (0..<n).map { expected.uncompressedBytesSent(rank: $0) }
        let perEpoch = config.stepsPerEpoch(trainingRecords: options.trainingRecords, workers: n)
        let epochs = (config.totalSteps + perEpoch - 1) / perEpoch
        var pending = [Int: [StepReport]]()
        var traffic = [RankTraffic](repeating: RankTraffic(), count: n)
        var completed = startStep
        var stopAfter = config.totalSteps
        var interruptedBy: Int32?
        var testAccuracies = [Double]()
        let start = ContinuousClock.now
        var windowImages = 0, windowStart = ContinuousClock.now, lossSum = 0.0, correct = 0, images = 0
        var lastBeat = ContinuousClock.now
        while completed < stopAfter {
            // Workers watch for our silence as we watch for theirs (a worker started by hand would
            // otherwise only learn of a dead coordinator from its data plane).
            if ContinuousClock.now - lastBeat > options.timeout / 4 {
                for id in identities { server.send(.heartbeat(Heartbeat(rank: -1, step: completed)), to: id!) }
                lastBeat = ContinuousClock.now
            }
            if interruptedBy == nil, StopSignals.received != 0 {
                // Stop two steps past the furthest report, so no rank is already inside the stop step's all-reduce.
                interruptedBy = StopSignals.received
                let furthest = max(completed, (pending.keys.max() ?? -1) + 1)
                stopAfter = min(furthest + 2, config.totalSteps)
                log("signal \(StopSignals.received): stopping after step \(stopAfter)"
                    + (options.checkpointDirectory != nil ? " (rank 0 writes a checkpoint there)" : ""))
                for id in identities { server.send(.stop(Stop(reason: "signal \(StopSignals.received)", afterStep: stopAfter)), to: id!) }
            }
            if let (id, frame) = try server.receive(timeout: .milliseconds(100)) {
                let rank = identities.firstIndex { $0 == id }
                let peer = rank.map { "worker rank \($0)" } ?? "an unregistered peer"
                guard let message = decodeOrReject(frame, from: peer, id: id, server) else { continue }
                if let rank { lastHeard[rank] = ContinuousClock.now }
                switch message {
                case .stepReport(let r):
                    guard let rank, r.rank == rank else { continue }
                    lastStep[rank] = r.step
                    pending[r.step, default: []].append(r)
                case .heartbeat(let h):
                    if (0..<n).contains(h.rank) { lastHeard[h.rank] = ContinuousClock.now; lastStep[h.rank] = max(lastStep[h.rank], h.step) }
                case .failure(let f):
                    throw ClusterError("worker rank \(f.rank) failed at step \(f.step): \(f.message)")
                case .hello:
                    server.send(.reject(Reject(reason: "the run is already training with \(n) worker(s)")), to: id)
                default:
                    continue
                }
            }
            // Steps complete in order once every rank has reported them.
            while let reports = pending[completed], reports.count == n {
                pending[completed] = nil
                for r in reports.sorted(by: { $0.rank < $1.rank }) {
                    metrics?.write([("step", r.step), ("epoch", r.epoch), ("rank", r.rank), ("world_size", n), ("loss", r.loss),
                                    ("accuracy", Double(r.correct) / Double(max(r.images, 1))), ("images", r.images),
                                    ("learning_rate", r.learningRate),
                                    ("allreduce_bytes_sent", r.allreduceBytesSent), ("allreduce_bytes_received", r.allreduceBytesReceived),
                                    ("theory_bytes_sent", theory), ("dense_bytes_sent", uncompressed[r.rank]),
                                    ("compression_ratio", Double(uncompressed[r.rank]) / Double(max(r.allreduceBytesSent, 1))),
                                    ("control_bytes", r.controlBytes),
                                    ("allreduce_seconds", r.allreduceSeconds), ("compute_seconds", r.computeSeconds),
                                    ("step_seconds", r.stepSeconds), ("data_wait_seconds", r.dataWaitSeconds)])
                    traffic[r.rank].steps += 1
                    traffic[r.rank].bytesSent += r.allreduceBytesSent
                    traffic[r.rank].bytesReceived += r.allreduceBytesReceived
                    traffic[r.rank].controlBytes += r.controlBytes
                    traffic[r.rank].allreduceSeconds += r.allreduceSeconds
                    traffic[r.rank].computeSeconds += r.computeSeconds
                    traffic[r.rank].stepSeconds += r.stepSeconds
                    lossSum += Double(r.loss) * Double(r.images); correct += r.correct; images += r.images
                    windowImages += r.images
                }
                completed += 1
                let evaluated = reports.compactMap { r in r.testImages.map { (r.testCorrect ?? 0, $0) } }
                if evaluated.count == n {
                    let images = evaluated.reduce(0) { $0 + $1.1 }, right = evaluated.reduce(0) { $0 + $1.0 }
                    let accuracy = Double(right) / Double(max(images, 1))
                    metrics?.write([("step", completed - 1), ("epoch", reports[0].epoch), ("test_accuracy", accuracy), ("test_images", images)])
                    testAccuracies.append(accuracy)
                    if !options.quiet { display.line(String(format: "epoch %d: test accuracy %.2f%% (%d images)", reports[0].epoch + 1, 100 * accuracy, images)) }
                }
                if !options.quiet {
                    let elapsed = seconds(ContinuousClock.now - windowStart)
                    let rate = Double(windowImages) / max(elapsed, 1e-9)
                    let sent = Double(reports.reduce(0) { $0 + $1.allreduceBytesSent }) / Double(n)
                    let epoch = (completed - 1) / perEpoch
                    let done = completed - epoch * perEpoch, total = min(perEpoch, config.totalSteps - epoch * perEpoch)
                    display.update(epoch: epoch, epochs: epochs, done: done, total: total, loss: lossSum / Double(max(images, 1)),
                                   accuracy: Double(correct) / Double(max(images, 1)), imagesPerSecond: rate,
                                   etaSeconds: Double(config.totalSteps - completed) * Double(config.batchSize) / max(rate, 1e-9),
                                   extra: "sent/worker/step \(megabytes(sent)) (theory \(megabytes(theory)))")
                    if done == total { lossSum = 0; correct = 0; images = 0; windowImages = 0; windowStart = ContinuousClock.now }
                }
            }
            // Silence: a worker that neither reports nor heartbeats within the timeout is lost.
            let now = ContinuousClock.now
            for rank in 0..<n where now - lastHeard[rank] > options.timeout {
                throw ClusterError("worker rank \(rank) stopped answering at step \(lastStep[rank]) (no message for \(seconds(now - lastHeard[rank]).formatted(.number.precision(.fractionLength(1)))) s)")
            }
        }
        let total = seconds(ContinuousClock.now - start)
        return ClusterSummary(steps: completed - startStep, seconds: total,
                              imagesPerSecond: Double((completed - startStep) * config.batchSize) / max(total, 1e-9),
                              perRank: traffic, theoryBytesPerWorker: theory, hubBytesSent: 0, hubBytesReceived: 0,
                              testAccuracy: testAccuracies.last, interruptedBy: interruptedBy, finalStep: completed)
    }
}

/// The star hub's reduce loop, on its own thread so the coordinator keeps watching the control plane.
final class HubThread: @unchecked Sendable {
    // @unchecked Sendable: the hub is used only by the thread; `isCancelled` is guarded by
    // `cancelled`; `failure` is written by the thread before `done` is signalled.
    private let done = DispatchSemaphore(value: 0)
    private let cancelled = NSLock()
    private var isCancelled = false
    private var failure: (any Error)?
    private let hub: StarAllReduceHub<ZMQTransport>

    init(hub: StarAllReduceHub<ZMQTransport>, plan: [Range<Int>], steps: Range<Int>) {
        self.hub = hub
        Thread {
            defer { self.done.signal() }
            do { try self.hub.serve(plan: plan, steps: steps) { self.cancelled.withLock { self.isCancelled } } } catch { self.failure = error }
        }.start()
    }

    /// Waits for the thread (again if called twice) and returns the hub's failure, if it had one.
    @discardableResult
    func join() -> (any Error)? {
        done.wait()
        done.signal()
        return failure
    }
    func cancel() { cancelled.withLock { isCancelled = true } }
}

func seconds(_ d: Duration) -> Double { Double(d.components.seconds) + Double(d.components.attoseconds) * 1e-18 }

/// Bytes as "2.91 MB" (10⁶ bytes).
public func megabytes(_ bytes: Double) -> String { String(format: "%.2f MB", bytes / 1e6) }
