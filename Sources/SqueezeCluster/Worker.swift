import Foundation
import SqueezeComm
import SqueezeData
import SqueezeEngine
import SqueezeTraining

/// How a worker joins a run.
public struct WorkerOptions: Sendable {
    public var coordinator: String
    public var threads = 1
    /// CIFAR-10 directory on this machine (nil: the usual search).
    public var data: String?
    /// Ask for this rank (the launcher does); nil takes any free one.
    public var rank: Int?
    /// Address the other workers use to reach this one (default: the local address that routes to
    /// the coordinator, so nothing assumes loopback).
    public var advertise: String?
    public var joinTimeout: Duration = .seconds(120)
    public init(coordinator: String) { self.coordinator = coordinator }
}

/// One data-parallel worker: joins the coordinator, builds the model from the shared seed and
/// proves it with a checksum, trains on its shard, all-reduces gradients with the other workers
/// (or through the coordinator for `star`), and reports every step.
public final class Worker {
    let options: WorkerOptions
    let log: (String) -> Void

    public init(options: WorkerOptions, log: @escaping (String) -> Void) {
        self.options = options
        self.log = log
    }

    /// Runs until the coordinator says stop. Throws on any failure (after telling the coordinator).
    public func run() throws {
        ComputeThreads.set(options.threads)
        // SIGINT/SIGTERM do not kill a worker mid-step: the coordinator (which gets them too under
        // `launch`) decides where the run stops, and rank 0 checkpoints there.
        StopSignals.ignore()
        let context = try ZMQContext()
        defer { context.terminate() }
        let control = try ControlClient(context: context, coordinator: options.coordinator)
        defer { control.close() }
        try control.send(.hello(Hello(protocolVersion: ControlMessage.version, host: ProcessInfo.processInfo.hostName,
                                      pid: getpid(), requestedRank: options.rank, threads: options.threads)))
        let welcome: Welcome = try expect(control, timeout: options.joinTimeout, waitingFor: "a rank") {
            if case .welcome(let w) = $0 { w } else { nil }
        }
        let rank = welcome.rank
        var step = 0
        do {
            try train(welcome, control: control, context: context, step: &step)
        } catch {
            try? control.send(.failure(Failure(rank: rank, step: step, message: String(describing: error))))
            throw error
        }
    }

    private func train(_ welcome: Welcome, control: ControlClient, context: ZMQContext, step: inout Int) throws {
        let (rank, world, config) = (welcome.rank, welcome.worldSize, welcome.config)
        let timeout = Duration.milliseconds(Int(welcome.timeoutSeconds * 1000))
        let dataDir = try CIFAR10.resolveDirectory(explicit: options.data)
        let trainSet = try CIFAR10(directory: dataDir, split: .train)
        let testSet = welcome.evaluate ? try CIFAR10(directory: dataDir, split: .test) : nil
        let testShard = Array(stride(from: rank, to: testSet?.count ?? 0, by: world))
        let trainer = try Trainer(config: config, trainSet: trainSet, rank: rank, worldSize: world)
        if let path = welcome.initWeights { try trainer.network.loadWeights(from: path) }
        if let path = welcome.resumeFrom { try Checkpoint.load(path: path).restore(into: trainer) }
        let checksum = parametersChecksum(UnsafeBufferPointer(trainer.network.parameters.valueBuffer))
        guard checksum == welcome.parametersChecksum else {
            throw ClusterError("rank \(rank): initial parameters (\(welcome.resumeFrom ?? welcome.initWeights ?? "seed \(config.seed)")) have checksum \(checksum), the coordinator's have \(welcome.parametersChecksum) (different builds?)")
        }
        // Data plane: a star worker talks to the hub (the coordinator, rank `world`) only.
        let groupSize = welcome.algorithm == .star ? world + 1 : world
        let bind = welcome.transport == "ipc"
            ? "ipc://\(NSTemporaryDirectory())squeezetrain-\(getpid())-rank\(rank).ipc"
            : "tcp://\(try advertisedHost()):*"
        var transportOptions = ZMQTransport.Options()
        transportOptions.abandonTimeout = .seconds(5)
        let transport = try ZMQTransport(rank: rank, worldSize: groupSize, bind: bind, context: context, options: transportOptions)
        defer { transport.close(flushTimeout: .milliseconds(500)) }
        try control.send(.ready(Ready(rank: rank, model: config.model, parameterCount: trainer.network.parameters.count,
                                      parametersChecksum: checksum, dataEndpoint: transport.boundEndpoint)))
        let start: Start = try expect(control, timeout: options.joinTimeout, waitingFor: "the start signal") {
            if case .start(let s) = $0 { s } else { nil }
        }
        try transport.connect(topology: welcome.algorithm == .star ? .star(hub: world) : .ring, endpoints: start.endpoints)
        guard trainer.step == start.step else {
            throw ClusterError("rank \(rank): the coordinator starts at step \(start.step), this worker's state is at step \(trainer.step)")
        }
        let collective = CollectiveOptions(timeout: timeout)
        let allReducer: any AllReducer = welcome.algorithm == .star
            ? StarAllReduceWorker(transport: transport, hub: world, options: collective, compression: welcome.compression)
            : RingAllReduce(transport: transport, options: collective, compression: welcome.compression)
        let parameterCount = trainer.network.parameters.count
        let feedback = welcome.compression.usesErrorFeedback ? allReducer as? any ErrorFeedbackReducer : nil
        if let feedback, let resumed = welcome.resumeFrom {
            let dir = (resumed as NSString).deletingLastPathComponent
            do {
                feedback.restoreErrorFeedback(try ResidualFile.load(directory: dir, step: trainer.step, rank: rank, worldSize: world,
                                                                    count: parameterCount))
                log("rank \(rank): error-feedback residual restored from \(ResidualFile.path(directory: dir, step: trainer.step, rank: rank))")
            } catch {
                log("rank \(rank): warning: \(error); its error-feedback residual starts from zero")
            }
        }
        let reducer = BucketedReducer(reducer: allReducer, plan: bucketPlan(layerRanges: trainer.network.layerRanges,
                                                                            bucketBytes: welcome.bucketBytes))
        defer { reducer.close() }
        let heartbeat = try HeartbeatSender(context: context, coordinator: options.coordinator, rank: rank,
                                            interval: timeout / 4)
        defer { heartbeat.stop() }
        log("rank \(rank) of \(world): \(trainSet.count) images from \(dataDir), data plane \(transport.boundEndpoint)")

        let loader = trainer.makeLoader()
        defer { loader.stop() }
        var lastEnd = DispatchTime.now().uptimeNanoseconds
        var stopAfter: Int?  // set when the coordinator stops the run early (a signal)
        var checkpointed = -1
        var heardFromCoordinator = ContinuousClock.now
        func silent(_ silence: Duration) -> String {
            "rank \(rank): the coordinator at \(options.coordinator) has been silent for \(Int(silence.components.seconds)) s (timeout \(timeout))"
        }
        func checkpoint() throws {
            guard let dir = welcome.checkpointDirectory, checkpointed != trainer.step else { return }
            checkpointed = trainer.step
            // The gradient mass compression has not sent yet differs between ranks: each writes its own.
            if let feedback {
                try ResidualFile.save(feedback.errorFeedback(count: parameterCount), directory: dir, step: trainer.step, rank: rank,
                                      worldSize: world, compression: welcome.compression.description, keep: welcome.keepCheckpoints)
            }
            // One writer for the rest: after the all-reduce every rank holds the same parameters and momentum.
            guard rank == 0 else { return }
            let path = try Checkpoint(trainer: trainer, worldSize: world).save(directory: dir, keep: welcome.keepCheckpoints)
            log("rank 0: checkpoint at step \(trainer.step): \(path)")
        }
        training: while !trainer.isFinished {
            step = trainer.step
            heartbeat.step = step
            let waitBefore = loader.waitSeconds
            guard let batch = loader.next() else { break }
            let before = transport.counters
            let controlBefore = control.bytesSent + control.bytesReceived
            reducer.step = step
            let r: StepResult
            do {
                r = try trainer.trainStep(batch, reducer: reducer)
            } catch {
                // A peer that stopped because the coordinator died looks like a dead peer; say which it was.
                while (try? control.receive(timeout: .zero)) != nil { heardFromCoordinator = ContinuousClock.now }
                let silence = ContinuousClock.now - heardFromCoordinator
                guard silence > timeout else { throw error }
                throw ClusterError(silent(silence) + "; step \(step) failed: \(error)")
            }
            let after = transport.counters
            let now = DispatchTime.now().uptimeNanoseconds
            var report = StepReport(
                step: r.step, epoch: r.epoch, rank: rank, loss: r.loss, correct: r.correct, images: r.images,
                learningRate: r.learningRate,
                allreduceBytesSent: after.payloadBytesSent - before.payloadBytesSent,
                allreduceBytesReceived: after.payloadBytesReceived - before.payloadBytesReceived,
                controlBytes: (after.controlBytesSent + after.controlBytesReceived + after.framingBytesSent + after.framingBytesReceived)
                    - (before.controlBytesSent + before.controlBytesReceived + before.framingBytesSent + before.framingBytesReceived)
                    + control.bytesSent + control.bytesReceived - controlBefore,
                allreduceSeconds: reducer.busySeconds, computeSeconds: r.computeSeconds,
                stepSeconds: Double(now - lastEnd) * 1e-9, dataWaitSeconds: loader.waitSeconds - waitBefore)
            if let testSet, trainer.step % trainer.stepsPerEpoch == 0 || trainer.isFinished {
                // Every rank evaluates its share of the test set at once, so nobody waits for one evaluator.
                let e = trainer.evaluate(testSet, indices: testShard)
                report.testCorrect = Int((e.accuracy * Double(e.images)).rounded())
                report.testImages = e.images
                lastEnd = DispatchTime.now().uptimeNanoseconds
            } else {
                lastEnd = now
            }
            let due = trainer.isFinished || trainer.step % trainer.stepsPerEpoch == 0
                || (welcome.checkpointEvery > 0 && trainer.step % welcome.checkpointEvery == 0) || trainer.step == stopAfter
            if due { try checkpoint() }
            try control.send(.stepReport(report))
            if trainer.isFinished || trainer.step == stopAfter { break }
            while let message = try control.receive(timeout: .zero) {
                heardFromCoordinator = ContinuousClock.now
                switch message {
                case .abort(let a): throw ClusterError("rank \(rank): the coordinator aborted the run: \(a.reason)")
                case .stop(let s):
                    guard let after = s.afterStep else { throw ClusterError("rank \(rank): the coordinator stopped the run early: \(s.reason)") }
                    log("rank \(rank): stopping after step \(after) (\(s.reason))")
                    stopAfter = after
                    if trainer.step >= after { try checkpoint(); break training }
                default: break
                }
            }
            let silence = ContinuousClock.now - heardFromCoordinator
            if silence > timeout { throw ClusterError(silent(silence) + "; stopping after step \(trainer.step)") }
        }
        step = trainer.step
        // Wait for the coordinator's word that everyone is done (it may still need our data plane).
        _ = try expect(control, timeout: timeout * 4, waitingFor: "the stop signal") {
            if case .stop(let s) = $0, s.afterStep == nil { true } else { nil }
        }
        if rank == 0, trainer.isFinished, let path = welcome.saveWeights {
            try trainer.network.saveWeights(to: path)
            log("rank 0: weights written to \(path)")
        }
        log("rank \(rank): done after step \(step)")
    }

    /// Waits for the message `match` accepts; an abort or reject ends the wait with an error.
    private func expect<T>(_ control: ControlClient, timeout: Duration, waitingFor what: String,
                           _ match: (ControlMessage) -> T?) throws -> T {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            guard let message = try control.receive(timeout: min(.milliseconds(500), deadline - ContinuousClock.now)) else { continue }
            if let value = match(message) { return value }
            switch message {
            case .reject(let r): throw ClusterError("the coordinator at \(options.coordinator) refused this worker: \(r.reason)")
            case .abort(let a): throw ClusterError("the coordinator aborted the run: \(a.reason)")
            default: continue
            }
        }
        throw ClusterError("no word from the coordinator at \(options.coordinator) for \(timeout) while waiting for \(what)")
    }

    /// The address of this host as seen on the route to the coordinator (or --advertise).
    private func advertisedHost() throws -> String {
        if let a = options.advertise { return a }
        return try localAddress(towards: options.coordinator)
    }
}

/// Sends a heartbeat every `interval` from its own thread and socket, so a long step never looks like silence.
final class HeartbeatSender: @unchecked Sendable {
    // @unchecked Sendable: `step` is a plain Int written by the training thread and read by the
    // heartbeat thread; a stale value only makes a report one step late. `running` is guarded by `lock`.
    private let socket: ZMQSocket
    private let lock = NSLock()
    private var running = true
    /// Signalled by `stop()`, so the thread closes its socket at once rather than after its sleep
    /// (the ZeroMQ context, and so the process exit, waits for that).
    private let wake = DispatchSemaphore(value: 0)
    var step = 0

    init(context: ZMQContext, coordinator: String, rank: Int, interval: Duration) throws {
        socket = try ZMQSocket(context: context, type: .dealer)
        try socket.connect(coordinator)
        let sock = socket
        Thread {
            while self.lock.withLock({ self.running }) {
                let body = ControlMessage.heartbeat(Heartbeat(rank: rank, step: self.step)).encoded()
                _ = body.withUnsafeBytes { try? sock.send($0, dontWait: true) }
                _ = self.wake.wait(timeout: .now() + Double(interval.components.seconds) + Double(interval.components.attoseconds) * 1e-18)
            }
            sock.close(linger: .zero)
        }.start()
    }

    func stop() {
        lock.withLock { running = false }
        wake.signal()
    }
}

/// The local IP address the kernel would use to reach the host of `endpoint` (tcp://HOST:PORT).
/// For ipc:// endpoints, 127.0.0.1.
func localAddress(towards endpoint: String) throws -> String {
    guard endpoint.hasPrefix("tcp://") else { return "127.0.0.1" }
    let rest = endpoint.dropFirst(6)
    guard let colon = rest.lastIndex(of: ":") else { throw ClusterError("endpoint \(endpoint) has no port") }
    var host = String(rest[..<colon])
    if host.hasPrefix("[") { host = String(host.dropFirst().dropLast()) }
    if host == "*" || host == "0.0.0.0" || host == "localhost" { return "127.0.0.1" }
    var hints = addrinfo()
    hints.ai_family = AF_INET
    hints.ai_socktype = Int32(SOCK_DGRAM.rawValue)
    var info: UnsafeMutablePointer<addrinfo>?
    guard getaddrinfo(host, "9", &hints, &info) == 0, let info else { throw ClusterError("cannot resolve the coordinator host '\(host)'") }
    defer { freeaddrinfo(info) }
    let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
    guard fd >= 0 else { throw ClusterError("socket() failed finding the local address") }
    defer { close(fd) }
    guard connect(fd, info.pointee.ai_addr, info.pointee.ai_addrlen) == 0 else {
        throw ClusterError("no route to the coordinator host '\(host)'")
    }
    var local = sockaddr_in()
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &local) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
    var buffer = [CChar](repeating: 0, count: Int(INET_ADDRSTRLEN))
    inet_ntop(AF_INET, &local.sin_addr, &buffer, socklen_t(INET_ADDRSTRLEN))
    return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
