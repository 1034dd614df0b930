import Foundation
import Testing
import SqueezeCollectives
import SqueezeTransport
import SqueezeData
import SqueezeEngine
@testable import SqueezeTraining
@testable import SqueezeCluster

// The cluster protocol in process: the coordinator driven message by message over an
// `InProcessControlPlane`, with a clock the test advances by hand. Nothing sleeps; nothing waits
// for a timeout to pass on the wall clock.

/// A clock that moves only when told to.
final class ManualClock: ClusterClock, @unchecked Sendable {
    // @unchecked Sendable: `instant` is guarded by `lock`.
    private let lock = NSLock()
    private var instant = ContinuousClock.now
    var now: ContinuousClock.Instant { lock.withLock { instant } }
    func advance(by d: Duration) { lock.withLock { instant += d } }
}

/// A worker played by the test: raw control messages over an in-process channel.
struct FakeWorker {
    let channel: InProcessControlClient
    func send(_ m: ControlMessage) { channel.trySend(m.encoded()) }
    func send(raw frame: [UInt8]) { channel.trySend(frame) }
    /// Every message the coordinator has sent so far (no waiting).
    func received() throws -> [ControlMessage] {
        var out = [ControlMessage]()
        while let f = try channel.receive(timeout: .zero) { out.append(try f.withUnsafeBytes { try ControlMessage.decode($0, from: "coordinator") }) }
        return out
    }
    func hello(rank: Int? = nil, host: String = "test") {
        send(.hello(Hello(protocolVersion: ControlMessage.version, host: host, pid: 1, requestedRank: rank, threads: 1)))
    }
}

/// Collects log lines and events from any thread.
final class Log: @unchecked Sendable {
    // @unchecked Sendable: guarded by `lock`.
    private let lock = NSLock()
    private var lines = [String]()
    private var seen = [ClusterEvent]()
    func add(_ s: String) { lock.withLock { lines.append(s) } }
    func add(_ e: ClusterEvent) { lock.withLock { seen.append(e) } }
    var text: String { lock.withLock { lines.joined(separator: "\n") } }
    var events: [ClusterEvent] { lock.withLock { seen } }
}

func clusterConfig(workers: Int, steps: Int, perWorker: Int = 8) -> TrainingConfig {
    var c = TrainingConfig()
    c.batchSize = perWorker * workers
    c.totalSteps = steps
    return c
}

func checksum(_ config: TrainingConfig) -> String {
    let network = Network(config: config.model, seed: config.seed)
    return withExtendedLifetime(network) { parametersChecksum(UnsafeBufferPointer(network.parameters.valueBuffer)) }
}

/// A coordinator over an in-process control plane, prepared and waiting for workers.
struct Harness {
    let plane = InProcessControlPlane()
    let clock = ManualClock()
    let stop = StopToken()
    let metrics = MemoryMetrics()
    let log = Log()
    let coordinator: Coordinator
    let options: CoordinatorOptions

    init(workers n: Int, steps: Int, _ configure: (inout CoordinatorOptions) -> Void = { _ in }) throws {
        var o = CoordinatorOptions(bind: "", workers: n, config: clusterConfig(workers: n, steps: steps))
        o.evaluate = false
        o.quiet = true
        configure(&o)
        options = o
        let log = self.log
        coordinator = Coordinator(options: o, channel: plane.server, dataPlane: InProcessDataPlane(), stop: stop, clock: clock,
                                  metrics: metrics, events: { log.add($0) }, log: { log.add($0) })
        try coordinator.prepare()
    }

    func worker() -> FakeWorker { FakeWorker(channel: plane.connectClient()) }

    /// Handles every queued message, then checks time once.
    func pump() throws {
        while plane.pendingForServer > 0 { try coordinator.poll(timeout: .zero) }
        try coordinator.poll(timeout: .zero)
    }

    /// Rendezvous of `n` fake workers (ranks in order); returns them after the Start.
    func join(_ n: Int, checksum given: String? = nil) throws -> [FakeWorker] {
        let workers = (0..<n).map { _ in worker() }
        for (r, w) in workers.enumerated() { w.hello(rank: r) }
        try pump()
        let sum = given ?? checksum(options.config)
        for (r, w) in workers.enumerated() {
            w.send(.ready(Ready(rank: r, model: options.config.model, parameterCount: Network(config: options.config.model).parameters.count,
                                parametersChecksum: sum, dataEndpoint: "inproc://rank\(r)")))
        }
        try pump()
        return workers
    }

    func report(_ w: FakeWorker, rank: Int, step: Int, sent: Int = 1000) {
        w.send(.stepReport(StepReport(step: step, epoch: 0, rank: rank, loss: 2.5, correct: 3, images: 8, learningRate: 0.05,
                                      allreduceBytesSent: sent, allreduceBytesReceived: sent, controlBytes: 100,
                                      allreduceSeconds: 0.25, computeSeconds: 0.5, stepSeconds: 1, dataWaitSeconds: 0)))
    }
}

func reasons(_ messages: [ControlMessage]) -> [String] {
    messages.compactMap { if case .reject(let r) = $0 { r.reason } else { nil } }
}

@Suite("Cluster protocol (in process, deterministic)")
struct CoordinatorProtocolTests {
    @Test func rendezvousGivesRanksChecksThemAndStartsEveryone() throws {
        let h = try Harness(workers: 2, steps: 4)
        let a = h.worker(), b = h.worker()
        a.hello(rank: 1)  // asks for rank 1
        b.hello()         // any free rank: 0
        try h.pump()
        guard case .welcome(let wa)? = try a.received().first, case .welcome(let wb)? = try b.received().first else {
            Issue.record("no welcome"); return
        }
        #expect(wa.rank == 1 && wb.rank == 0 && wa.worldSize == 2)
        #expect(wa.parametersChecksum == checksum(h.options.config))
        #expect(wa.transport == .tcp)
        #expect(h.coordinator.phase == .rendezvous)
        let count = Network(config: h.options.config.model).parameters.count
        for (w, rank) in [(a, 1), (b, 0)] {
            w.send(.ready(Ready(rank: rank, model: h.options.config.model, parameterCount: count,
                                parametersChecksum: wa.parametersChecksum, dataEndpoint: "inproc://rank\(rank)")))
        }
        try h.pump()
        #expect(h.coordinator.phase == .training)
        for w in [a, b] {
            guard case .start(let s)? = try w.received().first else { Issue.record("no start"); continue }
            #expect(s.step == 0 && s.endpoints == ["inproc://rank0", "inproc://rank1"])
        }
        #expect(h.log.events == [ClusterEvent(.listening, endpoint: "inproc://coordinator", workers: 2), ClusterEvent(.ready, step: 0, workers: 2)])
    }

    @Test func rendezvousTimeoutNamesTheMissingRanks() throws {
        let h = try Harness(workers: 3, steps: 1) { $0.joinTimeout = .seconds(30); $0.timeout = .seconds(60) }
        let w0 = h.worker()
        w0.hello(rank: 0)
        try h.pump()
        h.clock.advance(by: .seconds(29))
        try h.pump()  // not yet
        h.clock.advance(by: .seconds(1))
        #expect { try h.pump() } throws: {
            String(describing: $0).contains("rendezvous timed out after 30.0 seconds: 1 of 3 worker(s) joined; rank(s) still missing: 0, 1, 2")
        }
    }

    @Test func heartbeatsKeepAWorkerAliveAndASilentOneIsNamed() throws {
        let h = try Harness(workers: 2, steps: 100) { $0.timeout = .seconds(10) }
        let w = try h.join(2)
        _ = try w[0].received(); _ = try w[1].received()
        for _ in 0..<3 {
            h.clock.advance(by: .seconds(6))
            w[0].send(.heartbeat(Heartbeat(rank: 0, step: 7)))
            w[1].send(.heartbeat(Heartbeat(rank: 1, step: 7)))
            try h.pump()
        }
        // The coordinator heartbeats too (rank −1), four times per timeout.
        #expect(try w[0].received().contains { if case .heartbeat(let b) = $0 { b.rank == -1 } else { false } })
        h.clock.advance(by: .seconds(6))
        w[0].send(.heartbeat(Heartbeat(rank: 0, step: 8)))
        try h.pump()
        h.clock.advance(by: .seconds(5))
        w[0].send(.heartbeat(Heartbeat(rank: 0, step: 8)))
        #expect { try h.pump() } throws: {
            String(describing: $0).contains("worker rank 1 stopped answering at step 7 (no message for 11.0 s)")
        }
    }

    @Test func stepsCompleteInOrderOnceEveryRankReportedAndMetricsKeepTheirFields() throws {
        let h = try Harness(workers: 2, steps: 2)
        let w = try h.join(2)
        h.report(w[1], rank: 1, step: 0)
        h.report(w[1], rank: 1, step: 1)
        try h.pump()
        #expect(h.metrics.lines.isEmpty)  // rank 0 has not reported
        h.report(w[0], rank: 0, step: 0)
        try h.pump()
        #expect(h.metrics.lines.count == 2 && !h.coordinator.isFinished)
        h.report(w[0], rank: 0, step: 1)
        try h.pump()
        #expect(h.coordinator.isFinished)
        let summary = h.coordinator.finish()
        #expect(summary.steps == 2 && summary.finalStep == 2 && summary.interruptedBy == nil)
        #expect(summary.perRank.map(\.bytesSent) == [2000, 2000])
        for x in w { #expect(try x.received().contains { if case .stop(let s) = $0 { s.afterStep == nil } else { false } }) }
        // The fields, their order and number formats other tools read.
        let theory = TrafficTheory(plan: bucketPlan(layerRanges: Network(config: ModelConfig()).layerRanges, bucketBytes: 1 << 20),
                                   workers: 2, algorithm: .ring, compression: .none)
        let dense = theory.uncompressedBytesSent(rank: 1)
        let theoryBytes = Int(theory.bytesSent), ratio = MetricsWriter.encode(Double(dense) / 1000)
        var expected = #"{"step":0,"epoch":0,"rank":1,"world_size":2,"loss":2.5,"accuracy":0.375,"images":8,"#
        expected += #""learning_rate":0.05,"allreduce_bytes_sent":1000,"allreduce_bytes_received":1000,"#
        expected += "\"theory_bytes_sent\":\(theoryBytes),\"dense_bytes_sent\":\(dense),\"compression_ratio\":\(ratio),"
        expected += #""control_bytes":100,"allreduce_seconds":0.25,"compute_seconds":0.5,"step_seconds":1,"data_wait_seconds":0}"#
        #expect(h.metrics.lines[1] == expected)
    }

    @Test func aSignalStopsEveryRankTwoStepsPastTheFurthestReport() throws {
        let h = try Harness(workers: 2, steps: 100) { $0.checkpointDirectory = "/tmp/unused" }
        let w = try h.join(2)
        h.report(w[0], rank: 0, step: 0); h.report(w[1], rank: 1, step: 0); h.report(w[0], rank: 0, step: 1)
        try h.pump()
        h.stop.request(signal: SIGTERM)
        try h.pump()
        for x in w {
            let stops = try x.received().compactMap { if case .stop(let s) = $0 { s } else { nil } }
            #expect(stops.count == 1 && stops[0].afterStep == 4 && stops[0].reason == "signal \(SIGTERM)")
        }
        #expect(h.log.text.contains("signal 15: stopping after step 4 (rank 0 writes a checkpoint there)"))
        h.report(w[1], rank: 1, step: 1)
        for step in 2..<4 { h.report(w[0], rank: 0, step: step); h.report(w[1], rank: 1, step: step) }
        try h.pump()
        #expect(h.coordinator.isFinished)
        let summary = h.coordinator.finish()
        #expect(summary.interruptedBy == SIGTERM && summary.finalStep == 4)
    }

    /// Membership: only the holder of a rank speaks for it; strangers are dropped and counted, and
    /// nothing they send stops, fails or advances the run.
    @Test func strangersAndImpostorsCannotStopFailOrReportForARank() throws {
        let h = try Harness(workers: 2, steps: 3)
        let w = try h.join(2)
        let stranger = h.worker()
        stranger.send(.failure(Failure(rank: 1, step: 0, message: "forged")))
        stranger.send(.stop(Stop(reason: "forged")))
        stranger.send(.stepReport(StepReport(step: 0, epoch: 0, rank: 0, loss: 1, correct: 0, images: 8, learningRate: 0.1,
                                             allreduceBytesSent: 0, allreduceBytesReceived: 0, controlBytes: 0, allreduceSeconds: 0,
                                             computeSeconds: 0, stepSeconds: 0, dataWaitSeconds: 0)))
        stranger.send(.heartbeat(Heartbeat(rank: 0, step: 99)))
        // Rank 0's holder speaking for rank 1; a heartbeat identity of a session that holds no rank.
        w[0].send(.failure(Failure(rank: 1, step: 0, message: "forged by rank 0")))
        h.report(w[0], rank: 1, step: 0)
        let ghost = FakeWorker(channel: h.plane.connectClient(identity: ControlIdentity.newSession() + [ControlIdentity.heartbeat]))
        ghost.send(.stop(Stop(reason: "ghost")))
        try h.pump()
        #expect(h.coordinator.droppedMessages == 7)
        #expect(h.coordinator.phase == .training && h.metrics.lines.isEmpty)
        #expect(h.log.text.contains("dropped a failure message from a peer that holds no rank (1 dropped so far)"))
        #expect(!h.log.text.contains("dropped a stop"))  // one line per 5 s at most
        for x in w { #expect(try !x.received().contains { if case .stop = $0 { true } else { false } }) }
        // The real workers finish the run.
        for step in 0..<3 { h.report(w[0], rank: 0, step: step); h.report(w[1], rank: 1, step: step) }
        try h.pump()
        #expect(h.coordinator.isFinished && h.metrics.lines.count == 6)
    }

    /// A worker's heartbeats may come from its own heartbeat connection (same session, last byte "h").
    @Test func heartbeatsCountOnlyFromTheHolderSession() throws {
        let h = try Harness(workers: 1, steps: 100) { $0.timeout = .seconds(10) }
        let session = ControlIdentity.newSession()
        let main = FakeWorker(channel: h.plane.connectClient(identity: session + [ControlIdentity.main]))
        let beat = FakeWorker(channel: h.plane.connectClient(identity: session + [ControlIdentity.heartbeat]))
        main.hello(rank: 0)
        try h.pump()
        main.send(.ready(Ready(rank: 0, model: h.options.config.model, parameterCount: Network(config: h.options.config.model).parameters.count,
                               parametersChecksum: checksum(h.options.config), dataEndpoint: "inproc://rank0")))
        try h.pump()
        #expect(h.coordinator.phase == .training)
        for _ in 0..<3 {
            h.clock.advance(by: .seconds(8))
            beat.send(.heartbeat(Heartbeat(rank: 0, step: 1)))
            try h.pump()
        }
        #expect(h.coordinator.droppedMessages == 0)
        beat.send(.failure(Failure(rank: 0, step: 1, message: "not on the heartbeat connection")))
        try h.pump()
        #expect(h.coordinator.droppedMessages == 1 && h.coordinator.phase == .training)
    }

    /// A rank whose holder falls silent before it is ready goes to the next worker that asks.
    @Test func aRankSilentBeforeReadyIsGivenBack() throws {
        let h = try Harness(workers: 1, steps: 1) { $0.timeout = .seconds(10) }
        let squatter = h.worker()
        squatter.hello()
        try h.pump()
        let late = h.worker()
        late.hello()
        try h.pump()
        #expect(reasons(try late.received()) == ["the run already has its 1 worker(s)"])
        h.clock.advance(by: .seconds(11))
        try h.pump()
        #expect(h.log.text.contains("worker rank 0 (test pid 1) went silent before it was ready; the rank is free again"))
        late.hello()
        try h.pump()
        #expect(try late.received().contains { if case .welcome(let w) = $0 { w.rank == 0 } else { false } })
    }

    /// SIGTERM while waiting for workers ends the rendezvous at the next poll, naming the signal.
    @Test func aSignalDuringTheRendezvousStopsAtOnce() throws {
        let h = try Harness(workers: 2, steps: 1)
        h.worker().hello()
        try h.pump()
        h.stop.request(signal: SIGTERM)
        #expect { try h.pump() } throws: { ($0 as? Interrupted)?.signal == SIGTERM && "\($0)".contains("signal 15 while waiting for workers") }
    }

    /// A worker that got a signal asks to stop; the coordinator stops every rank at one step.
    @Test func aWorkersStopRequestStopsTheRun() throws {
        let h = try Harness(workers: 2, steps: 100)
        let w = try h.join(2)
        h.report(w[0], rank: 0, step: 0); h.report(w[1], rank: 1, step: 0)
        w[1].send(.stop(Stop(reason: "signal 15")))
        try h.pump()
        for x in w {
            #expect(try x.received().contains { if case .stop(let s) = $0 { s.afterStep == 3 } else { false } })
        }
        #expect(h.log.text.contains("worker rank 1 asks to stop (signal 15): stopping after step 3"))
    }

    @Test func aWorkerFailureIsReportedWithRankAndStep() throws {
        let h = try Harness(workers: 2, steps: 100)
        let w = try h.join(2)
        h.report(w[0], rank: 0, step: 0)
        w[1].send(.failure(Failure(rank: 1, step: 5, message: "disk full")))
        var failure: Error?
        do { try h.pump() } catch { failure = error }
        #expect("\(failure!)".contains("worker rank 1 failed at step 5: disk full"))
        h.coordinator.abort(failure!)
        for x in w { #expect(try x.received().contains { if case .abort(let a) = $0 { a.reason.contains("rank 1 failed") } else { false } }) }
        // Before training, too.
        let early = try Harness(workers: 2, steps: 1)
        let e = early.worker()
        e.hello()
        e.send(.failure(Failure(rank: 0, step: 0, message: "no CIFAR-10 here")))
        #expect { try early.pump() } throws: { String(describing: $0).contains("worker rank 0 failed before training: no CIFAR-10 here") }
    }

    @Test func badAndImpostorMessagesAreRejectedWhileTheRunGoesOn() throws {
        let h = try Harness(workers: 1, steps: 2)
        let stranger = h.worker()
        var wrongVersion = ControlMessage.hello(Hello(protocolVersion: 1, host: "test", pid: 1, requestedRank: nil, threads: 1)).encoded()
        wrongVersion[4] = 7
        let truncated = Array(ControlMessage.heartbeat(Heartbeat(rank: 0, step: 0)).encoded().dropLast(2))
        var unknown = ControlMessage.stop(Stop(reason: "x")).encoded()
        unknown[6] = 42
        for frame in [wrongVersion, truncated, unknown] { stranger.send(raw: frame) }
        try h.pump()
        let refused = reasons(try stranger.received())
        #expect(refused.count == 3)
        for (reason, words) in zip(refused, ["protocol version 7", "truncated", "unknown message kind 42"]) {
            #expect(reason.contains(words) && reason.contains("a peer that holds no rank"), "\(reason)")
        }
        // A worker whose Ready describes a different model is refused, and its rank is free again.
        let impostor = h.worker()
        impostor.hello(host: "impostor")
        try h.pump()
        guard case .welcome(let w)? = try impostor.received().first else { Issue.record("no welcome"); return }
        var model = w.config.model
        model.batchNorm = true
        impostor.send(.ready(Ready(rank: w.rank, model: model, parameterCount: 1, parametersChecksum: "0", dataEndpoint: "x")))
        try h.pump()
        let refusal = reasons(try impostor.received())
        #expect(refusal.count == 1 && refusal[0].contains("worker rank 0 (impostor pid 1) rejected") && refusal[0].contains("model configuration differs"))
        #expect(h.coordinator.phase == .rendezvous)
        // A proper worker then takes rank 0 and the run starts; a latecomer and a bad frame from a
        // registered worker are refused without ending it.
        let proper = try h.join(1)[0]
        #expect(h.coordinator.phase == .training)
        _ = try proper.received()
        let late = h.worker()
        late.hello()
        proper.send(raw: truncated)
        try h.pump()
        #expect(reasons(try late.received()) == ["the run is already training with 1 worker(s)"])
        let refusedFrame = reasons(try proper.received())
        #expect(refusedFrame.count == 1 && refusedFrame[0].contains("message from worker rank 0 rejected: ") && refusedFrame[0].contains("truncated"),
                "\(refusedFrame)")
        h.report(proper, rank: 0, step: 0); h.report(proper, rank: 0, step: 1)
        try h.pump()
        #expect(h.coordinator.isFinished)
    }

    @Test func resumeStartsEveryoneAtTheCheckpointsStep() throws {
        let dir = try temporaryDirectory("resume-coordinator")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = clusterConfig(workers: 2, steps: 10)
        let trainer = try Trainer(config: config, trainSet: try smallTrainingSet(), rank: 0, worldSize: 2)
        trainer.step = 6
        _ = try Checkpoint(trainer: trainer, worldSize: 2).save(directory: dir)
        // The first coordinator holds the directory's lock until it goes away, at the end of this scope.
        var checksum = ""
        do {
            let h = try Harness(workers: 2, steps: 10) { $0.checkpointDirectory = dir; $0.resume = true }
            #expect(h.log.text.contains("resuming from \(dir)/checkpoint-000000006.safetensors at step 6 (written by 2 worker(s))"))
            let w = (0..<2).map { _ in h.worker() }
            for x in w { x.hello() }
            try h.pump()
            guard case .welcome(let welcome)? = try w[0].received().first else { Issue.record("no welcome"); return }
            checksum = welcome.parametersChecksum
            #expect(welcome.resumeFrom == "\(dir)/checkpoint-000000006.safetensors")
            #expect(welcome.parametersChecksum == withExtendedLifetime(trainer) { parametersChecksum(UnsafeBufferPointer(trainer.network.parameters.valueBuffer)) })
            _ = try w[1].received()
            for (r, x) in w.enumerated() {
                x.send(.ready(Ready(rank: r, model: config.model, parameterCount: trainer.network.parameters.count,
                                    parametersChecksum: welcome.parametersChecksum, dataEndpoint: "e\(r)")))
            }
            try h.pump()
            for x in w { #expect(try x.received().contains { if case .start(let s) = $0 { s.step == 6 } else { false } }) }
            #expect(h.log.events.last == ClusterEvent(.ready, step: 6, workers: 2))
        }

        // Resumed at its last step: nothing is left to train, and the run ends once everyone is ready.
        let end = try Harness(workers: 2, steps: 6) { $0.checkpointDirectory = dir; $0.resume = true }
        let w2 = try end.join(2, checksum: checksum)
        #expect(end.coordinator.isFinished)
        #expect(end.coordinator.finish().finalStep == 6)
        for x in w2 { #expect(try x.received().contains { if case .stop(let s) = $0 { s.afterStep == nil } else { false } }) }
    }
}

/// One CIFAR-10 training file (10,000 records), enough for a trainer.
func smallTrainingSet() throws -> CIFAR10 {
    try CIFAR10(directory: cifarDirectory, files: ["data_batch_1.bin"])
}
