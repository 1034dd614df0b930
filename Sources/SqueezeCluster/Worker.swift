import Foundation
import SqueezeCollectives
import SqueezeTransport
import SqueezeData
import SqueezeEngine
import SqueezeSystem
import SqueezeTraining

/// How a worker joins a run.
public struct WorkerOptions: Codable, Sendable {
    /// Compute threads (sent to the coordinator; the executable sets OpenMP's team size).
    public var threads = 1
    /// CIFAR-10 directory on this machine (nil: the usual search).
    public var data: String?
    /// Ask for this rank (the launcher does); nil takes any free one.
    public var rank: Int?
    public var joinTimeout: Duration = .seconds(120)
    /// Write this rank's timeline here (Chrome trace-event JSON; nil: no trace) ...
    public var tracePath: String?
    /// ... for these steps.
    public var traceWindow = try! TraceWindow(parsing: "5")
    /// In a run without authentication (`--insecure`): the only files this worker may use, from its own
    /// command line; a welcome naming any other path is refused, since whoever answers at the
    /// coordinator's address could name any file. nil: the coordinator's paths are used (it proved it
    /// holds the run's key, or it answered on this user's private ipc socket).
    public var ownPaths: OwnPaths?
    public init() {}
}

/// The files a worker of an unauthenticated run was given itself (absolute paths).
public struct OwnPaths: Codable, Sendable, Equatable {
    public var checkpointDirectory: String?, initWeights: String?, saveWeights: String?
    public init(checkpointDirectory: String? = nil, initWeights: String? = nil, saveWeights: String? = nil) {
        self.checkpointDirectory = checkpointDirectory; self.initWeights = initWeights; self.saveWeights = saveWeights
    }

    /// Throws unless every path `welcome` names is one of these (a resume: a checkpoint file in this
    /// checkpoint directory), naming the flag, the path and the fix.
    func check(_ welcome: Welcome, coordinator: String) throws {
        func same(_ a: String?, _ b: String?) -> Bool { a.map { ($0 as NSString).standardizingPath } == b.map { ($0 as NSString).standardizingPath } }
        func refuse(_ what: String, fix: String) -> ClusterError {
            ClusterError("the coordinator at \(coordinator) asks this worker to use \(what), but this run is not authenticated (--insecure): "
                         + "whoever answers at that address could name any file. If that is the run's, give this worker \(fix) too, "
                         + "or give every process --key-file")
        }
        for (flag, theirs, mine) in [("--save-weights", welcome.saveWeights, saveWeights), ("--init-weights", welcome.initWeights, initWeights),
                                     ("--checkpoint-dir", welcome.checkpointDirectory, checkpointDirectory)] {
            if let theirs, !same(theirs, mine) { throw refuse("\(flag) \(theirs)", fix: "\(flag) \(theirs)") }
        }
        if let resume = welcome.resumeFrom {
            let name = (resume as NSString).lastPathComponent, directory = (resume as NSString).deletingLastPathComponent
            guard let mine = checkpointDirectory, same(directory, mine), name.hasPrefix("checkpoint-"), name.hasSuffix(".safetensors") else {
                throw refuse("the checkpoint \(resume)", fix: "--checkpoint-dir \(directory)")
            }
        }
    }
}

/// One data-parallel worker: joins the coordinator, builds the model from the shared seed and
/// proves it with a checksum, trains on its shard (`TrainingLoop`), all-reduces gradients with the
/// other workers (or through the coordinator for `star`), and reports every step.
///
/// It receives its control connection (`control`) and its data-plane transports (`dataPlane`), so
/// a test can run it in process; `clock` is what silence is measured with.
public final class Worker {
    let options: WorkerOptions
    let log: (String) -> Void
    let control: any ControlConnector
    let dataPlane: any DataPlaneFactory
    let clock: any ClusterClock
    let events: (ClusterEvent) -> Void
    /// Set by a signal to this process: before training the worker leaves at once; during training it
    /// asks the coordinator to stop the run (after a checkpoint), as a signal to the coordinator does.
    let signals: StopToken
    /// The step being trained (reported with a failure).
    private var step = 0
    /// A crash on purpose at a point of a step, for tests (`InjectedFault`); nil normally.
    private var fault: InjectedFault?
    /// What an elastic run's rank holds of its own when its membership epoch was halted, which the next
    /// epoch keeps (`carryHalted`).
    private var halted: HaltedState?
    /// This process's control identities (`ControlIdentity`).
    private let session = ControlIdentity.newSession()

    /// `events` gets rank 0's `checkpoint` events.
    public init(options: WorkerOptions, control: any ControlConnector, dataPlane: any DataPlaneFactory,
                clock: any ClusterClock = SystemClock(), signals: StopToken = StopToken(),
                events: @escaping (ClusterEvent) -> Void = { _ in }, log: @escaping (String) -> Void) {
        self.options = options; self.control = control; self.dataPlane = dataPlane; self.clock = clock
        self.signals = signals; self.events = events; self.log = log
    }

    private var coordinator: String { control.coordinator }

    /// Runs until the coordinator says stop. Throws on any failure (after telling the coordinator).
    public func run() throws {
        let channel = try control.connect(identity: session + [ControlIdentity.main])
        defer { channel.close() }
        try channel.send(.hello(Hello(protocolVersion: ControlMessage.version, host: ProcessInfo.processInfo.hostName,
                                      pid: getpid(), requestedRank: options.rank, threads: options.threads)))
        let welcome: Welcome = try expect(channel, timeout: options.joinTimeout, waitingFor: "a rank") {
            if case .welcome(let w) = $0 { w } else { nil }
        }
        do {
            // From now on the coordinator watches this rank's silence, also while it loads data.
            let heartbeat = try HeartbeatSender(channel: try control.connect(identity: session + [ControlIdentity.heartbeat]), rank: welcome.rank,
                                                interval: .milliseconds(Int(welcome.timeoutSeconds * 250)))
            defer { heartbeat.stop() }
            try train(welcome, channel: channel, heartbeat: heartbeat)
        } catch let error as Interrupted {
            throw error
        } catch {
            try? channel.send(.failure(Failure(rank: welcome.rank, step: step, message: String(describing: error))))
            throw error
        }
    }

    private func train(_ welcome: Welcome, channel: any ControlClientChannel, heartbeat: HeartbeatSender) throws {
        try options.ownPaths?.check(welcome, coordinator: coordinator)  // before any file is touched
        guard welcome.chunkBytes >= MemoryLayout<Float>.size else {
            throw ClusterError("the coordinator at \(coordinator) asks for data-plane chunks of \(welcome.chunkBytes) bytes, "
                               + "less than one Float: is it another build? (run the same build everywhere)")
        }
        if let asked = try InjectedFault.from(), asked.rank == welcome.rank, welcome.joining != true {
            fault = asked
            log("rank \(welcome.rank): \(InjectedFault.variable): this worker kills itself in step \(asked.step)'s \(asked.phase.rawValue)")
        }
        let model = try prepareModel(welcome)
        let tracer = options.tracePath.map { Tracer(path: $0, pid: welcome.rank, processName: "rank \(welcome.rank)", window: options.traceWindow) }
        model.trainer.tracer = tracer
        defer {  // also after a failure: the trace of what was recorded
            do { try tracer?.write() } catch { log("rank \(welcome.rank): warning: the trace was not written: \(error)") }
        }
        let stop = StopToken()
        // An elastic run's membership epochs: each trains until the run ends or the coordinator halts it.
        var epoch = WorkerEpoch(number: 0, welcome: welcome, transfer: nil)
        if welcome.joining == true {
            guard let admitted = try admission(welcome, model: model, channel: channel) else { return }
            epoch = admitted
            heartbeat.rank = epoch.welcome.rank
        }
        while try !trainEpoch(epoch, model: model, channel: channel, heartbeat: heartbeat, stop: stop, tracer: tracer) {
            epoch = try rejoin(epoch, model: model, channel: channel)
            heartbeat.rank = epoch.welcome.rank
        }
        step = model.trainer.step
        let (rank, timeout) = (epoch.welcome.rank, welcome.timeout)
        // Wait for the coordinator's word that everyone is done (it may still need our data plane).
        // A signal now changes nothing: the coordinator's stop ends the run in a moment. A member lost
        // now (an elastic run) halts nothing left to train: the position says so.
        var answered: Int?
        while true {
            do {
                _ = try expect(channel, timeout: timeout * 4, waitingFor: "the stop signal", interruptible: false, halts: answered) {
                    if case .stop(let s) = $0, s.afterStep == nil { true } else { nil }
                }
                break
            } catch is Halted {
                try channel.send(.position(Position(rank: rank, completedSteps: step, checksum: stateChecksum(model.trainer))))
                answered = epoch.number
            }
        }
        if rank == 0, model.trainer.isFinished, let path = welcome.saveWeights {
            try model.trainer.network.saveWeights(to: path)
            log("rank 0: weights written to \(path)")
        }
        log("rank \(rank): done after step \(step)")
    }

    /// One membership epoch (the whole run unless it is elastic): a data plane of `epoch.welcome`'s
    /// world size, then the training loop from the trainer's step. Returns true at the end of the run
    /// (or a stop), false when the coordinator halted it (a member was lost): the step in flight was
    /// abandoned, nothing of it applied.
    private func trainEpoch(_ epoch: WorkerEpoch, model: WorkerModel, channel: any ControlClientChannel,
                            heartbeat: HeartbeatSender, stop: StopToken, tracer: Tracer?) throws -> Bool {
        let welcome = epoch.welcome, (rank, world) = (epoch.welcome.rank, epoch.welcome.worldSize)
        // Elastic: the coordinator decides who is lost (after --timeout); a peer's receive waits twice that.
        let timeout = welcome.elastic == true ? welcome.timeout * 2 : welcome.timeout
        let plan = bucketPlan(layerRanges: model.trainer.network.layerRanges, bucketBytes: welcome.bucketBytes)
        let frameLimit = dataFrameLimit(largestBucket: plan.map(\.count).max() ?? 0)
        let transport = try dataPlane.makeTransport(rank: rank, worldSize: welcome.algorithm.groupSize(workers: world),
                                                    kind: welcome.transport, maxFrameBytes: frameLimit,
                                                    salt: welcome.dataPlaneSalt.flatMap(DataPlaneSeal.salt(hex:)))
        defer { transport.close(flushTimeout: .milliseconds(500)) }
        let interruption = Interruption()
        transport.interruption = interruption
        heartbeat.watch(epoch: epoch.number, interruption)
        do {
            try joinDataPlane(epoch, model: model, transport: transport, channel: channel, chunkBytes: min(welcome.chunkBytes, frameLimit - 4096),
                              timeout: timeout)
        } catch {
            guard let reason = (error as? Halted)?.reason ?? interruption.reason else { throw error }
            if let transfer = epoch.transfer, model.trainer.step < transfer.step {
                throw ClusterError("rank \(rank): halted (\(reason)) before it received the training state of step \(transfer.step); it leaves the run")
            }
            return false
        }
        let (reducer, feedback) = makeReducer(welcome, trainer: model.trainer, transport: transport, timeout: timeout, tracer: tracer)
        defer { reducer.close() }
        if let fault { reducer.faultHook = { fault.strike(step: $1, phase: $0) } }
        if let held = halted { carryHalted(held, into: feedback, epoch: epoch, trainer: model.trainer) }
        halted = nil
        log("rank \(rank) of \(world): \(model.trainer.trainSet.count) images from \(model.dataDirectory), data plane \(transport.boundEndpoint)"
            + (epoch.number == 0 ? "" : " (membership epoch \(epoch.number), from step \(model.trainer.step))"))
        let hooks = WorkerHooks(welcome: welcome, model: model, channel: channel, transport: transport, reducer: reducer,
                                feedback: feedback, heartbeat: heartbeat, stop: stop, signals: signals, clock: clock, timeout: timeout,
                                coordinator: coordinator, events: events, log: log) { [unowned self] in
            self.step = $0
            self.fault?.strike(step: $0, phase: .forward)
        }
        hooks.halt = (epoch.number, interruption)
        let loop = TrainingLoop(trainer: model.trainer, reducer: reducer, policy: CheckpointPolicy(every: welcome.checkpointEvery), stop: stop)
        do {
            _ = try loop.run(hooks)
            return true
        } catch {
            if let reason = interruption.reason {
                log("rank \(rank): step \(model.trainer.step) abandoned (\(reason)); \(model.trainer.step) steps completed")
                let buffers = model.trainer.network.buffers
                halted = HaltedState(
                    residual: feedback.map { HaltedValues(current: $0.errorFeedback(count: model.trainer.network.parameters.count),
                                                          atStepStart: hooks.residualAtStepStart) },
                    buffers: buffers.count > 0 ? HaltedValues(current: buffers.copyValues(), atStepStart: hooks.buffersAtStepStart) : nil,
                    worldSize: world)
                return false
            }
            throw hooks.explain(error)
        }
    }

    /// After a halt: sends this worker's position, then takes the rank the coordinator gives it in the
    /// next membership epoch; or, asked to `save` (too few workers remain), writes the checkpoint of its
    /// step and waits for the run's end (an abort, which throws).
    private func rejoin(_ epoch: WorkerEpoch, model: WorkerModel, channel: any ControlClientChannel) throws -> WorkerEpoch {
        let trainer = model.trainer, welcome = epoch.welcome
        let position = Position(rank: welcome.rank, completedSteps: trainer.step, checksum: stateChecksum(trainer))
        try channel.send(.position(position))
        enum Next { case reform(Reform), save(Save) }
        let next: Next = try expect(channel, timeout: welcome.timeout * 4, waitingFor: "the new members", halts: epoch.number) {
            switch $0 {
            case .reform(let r): .reform(r)
            case .save(let s): .save(s)
            default: nil
            }
        }
        switch next {
        case .save(let s):
            guard let dir = welcome.checkpointDirectory else { throw ClusterError("rank \(welcome.rank): asked to save a checkpoint, but the run has no --checkpoint-dir") }
            let path = try Checkpoint(trainer: trainer, worldSize: welcome.worldSize).save(directory: dir, keep: welcome.keepCheckpoints)
            log("rank \(welcome.rank): checkpoint at step \(trainer.step) (\(s.reason)): \(path)")
            events(ClusterEvent(.checkpoint, step: trainer.step, path: path))
            try channel.send(.position(position))
            _ = try expect(channel, timeout: welcome.timeout * 4, waitingFor: "the end of the run", halts: epoch.number) { _ in nil as Bool? }
            throw ClusterError("rank \(welcome.rank): the coordinator did not end the run after the checkpoint")
        case .reform(let r):
            return try enter(r, welcome: welcome, trainer: trainer)
        }
    }

    /// A joiner: tells the coordinator that its model is built and verified (`ready`), then waits for
    /// the reform that admits it at a step boundary. nil: the run ended first.
    private func admission(_ welcome: Welcome, model: WorkerModel, channel: any ControlClientChannel) throws -> WorkerEpoch? {
        try channel.send(.ready(Ready(rank: welcome.rank, model: welcome.config.model, parameterCount: model.trainer.network.parameters.count,
                                      parametersChecksum: model.checksum, dataEndpoint: "")))
        log("joiner: model ready; waiting to be admitted at a step boundary")
        enum Next { case reform(Reform), ended }
        let next: Next = try expect(channel, timeout: options.joinTimeout, waitingFor: "admission to the running run") {
            switch $0 {
            case .reform(let r): .reform(r)
            case .stop(let s) where s.afterStep == nil: .ended
            default: nil
            }
        }
        guard case .reform(let r) = next else {
            log("joiner: the run ended before this worker was admitted")
            return nil
        }
        return try enter(r, welcome: welcome, trainer: model.trainer)
    }

    /// The membership epoch `r` begins: this worker's new rank (its sampler re-sharded), the data
    /// plane's new salt, and the state transfer when some rank receives the state (this one, if it
    /// completed fewer steps than `r.step`: a joiner, or a survivor one step behind).
    private func enter(_ r: Reform, welcome: Welcome, trainer: Trainer) throws -> WorkerEpoch {
        let who = welcome.joining == true ? "joiner" : "rank \(welcome.rank)"
        let transfer = r.receivers.flatMap { $0.isEmpty ? nil : StateTransfer(receivers: Set($0), checksum: r.stateChecksum ?? "", step: r.step) }
        let receives = transfer?.receivers.contains(r.rank) == true
        guard r.step == trainer.step || receives else {
            throw ClusterError("\(who): told to go on from step \(r.step), but this worker completed \(trainer.step) steps")
        }
        try trainer.reshard(numShards: r.worldSize, rank: r.rank)
        var next = welcome
        next.rank = r.rank; next.worldSize = r.worldSize; next.joining = nil
        next.resumeFrom = nil  // the state is in memory now (a residual file is only read when the run resumes)
        next.dataPlaneSalt = r.dataPlaneSalt ?? welcome.dataPlaneSalt
        log("\(who): now rank \(r.rank) of \(r.worldSize) from step \(r.step) (membership epoch \(r.epoch))"
            + (receives ? ", once it has received the training state" : ""))
        return WorkerEpoch(number: r.epoch, welcome: next, transfer: transfer)
    }

    /// The data, the trainer at its starting state (seed, initial weights or checkpoint) and the
    /// checksum that proves every rank starts from the coordinator's parameters.
    private func prepareModel(_ welcome: Welcome) throws -> WorkerModel {
        let (rank, world, config) = (welcome.rank, welcome.worldSize, welcome.config)
        let dataDir = try CIFAR10.resolveDirectory(explicit: options.data)
        let trainSet = try CIFAR10(directory: dataDir, split: .train)
        let testSet = welcome.evaluate ? try CIFAR10(directory: dataDir, split: .test) : nil
        let trainer = try Trainer(config: config, trainSet: trainSet, rank: rank, worldSize: world)
        if trainer.network.precision == .bf16 && !CPUFeatures.hasAVX512BF16 {
            log("rank \(rank): warning: the run asks for bf16, which needs a CPU with AVX512_BF16; this one lacks it, running in fp32 "
                + "(the gradients on the wire are fp32 either way)")
            trainer.network.precision = .fp32
        }
        if let path = welcome.initWeights { try trainer.network.loadWeights(from: path) }
        if let path = welcome.resumeFrom { try Checkpoint.load(path: path).restore(into: trainer) }
        let checksum = parametersChecksum(UnsafeBufferPointer(trainer.network.parameters.valueBuffer))
        guard checksum == welcome.parametersChecksum else {
            throw ClusterError("rank \(rank): initial parameters (\(welcome.resumeFrom ?? welcome.initWeights ?? "seed \(config.seed)")) have checksum \(checksum), the coordinator's have \(welcome.parametersChecksum) (different builds?)")
        }
        return WorkerModel(trainer: trainer, testSet: testSet,
                           dataDirectory: dataDir, checksum: checksum)
    }

    /// Ready (with this rank's data endpoint), then Start (every endpoint): connects the data plane.
    /// A star worker talks to the hub (the coordinator, rank `world`) only (and, to hand on the training
    /// state, to its neighbours on a ring of the workers), a tree worker to its parent and children.
    /// Then the epoch's state transfer, if any, in messages of at most `chunkBytes`.
    private func joinDataPlane(_ epoch: WorkerEpoch, model: WorkerModel, transport: any DataPlaneTransport,
                               channel: any ControlClientChannel, chunkBytes: Int, timeout: Duration) throws {
        let welcome = epoch.welcome, (rank, world, trainer) = (epoch.welcome.rank, epoch.welcome.worldSize, model.trainer)
        try channel.send(.ready(Ready(rank: rank, model: welcome.config.model, parameterCount: trainer.network.parameters.count,
                                      parametersChecksum: model.checksum, dataEndpoint: transport.boundEndpoint)))
        let start: Start = try expect(channel, timeout: options.joinTimeout, waitingFor: "the start signal") {
            if case .start(let s) = $0 { s } else { nil }
        }
        let topology = welcome.algorithm.topology(workers: world)
        // A star's workers reach only the hub: an epoch with a state transfer adds a ring of the workers for it.
        let star = welcome.algorithm == .star, transfers = epoch.transfer != nil
        try transport.connect(topology: star && transfers ? .starAndRing(hub: world) : topology, endpoints: start.endpoints)
        if let transfer = epoch.transfer {
            let received = try transfer.run(rank: rank, topology: star ? .ring : topology, workers: world, transport: transport, trainer: trainer,
                                            chunkBytes: chunkBytes, timeout: timeout)
            if received > 0 {
                log("rank \(rank): received the training state of step \(transfer.step) (\(received) bytes); parameters and momentum "
                    + "match checksum \(transfer.checksum), every holder's")
            }
        }
        guard trainer.step == start.step else {
            throw ClusterError("rank \(rank): the coordinator starts at step \(start.step), this worker's state is at step \(trainer.step)")
        }
    }

    /// Puts what this rank held of its own when the last membership epoch was halted into the new epoch
    /// (a joiner has nothing: it starts from the state it receives, and a lost rank's is gone with it).
    /// A rank that abandoned a step in flight keeps the values from before that step: the step never
    /// happened, yet its forward pass had updated BatchNorm's running statistics and its error went into
    /// the residual. A rank that completed its step keeps what it holds, and so does one a step behind:
    /// the others completed the step its forward pass belonged to, and it had sent all its parts of it
    /// (only the all-gather, which keeps no residual, was cut); the state transfer brought it a holder's
    /// statistics, which it replaces with its own, as each rank keeps its own.
    /// The residual is scaled by N'/N: the collectives divide the sum by the world size, and the mass
    /// left unsent was N's 1/N share.
    private func carryHalted(_ held: HaltedState, into feedback: (any ErrorFeedbackReducer)?, epoch: WorkerEpoch, trainer: Trainer) {
        let (rank, world) = (epoch.welcome.rank, epoch.welcome.worldSize)
        let receives = epoch.transfer?.receivers.contains(rank) == true
        if let buffers = held.buffers?.kept(at: trainer.step, receives: receives).values {
            _ = buffers.withUnsafeBufferPointer { trainer.network.buffers.valueBuffer.update(fromContentsOf: $0) }
        }
        guard let feedback, let residual = held.residual?.kept(at: trainer.step, receives: receives) else { return }
        let scale = Float(world) / Float(held.worldSize)
        feedback.restoreErrorFeedback(residual.values.map { $0 * scale }, count: trainer.network.parameters.count)
        log("rank \(rank): error-feedback residual kept across the change of members (\(residual.abandoned ? "from before the abandoned step" : "as held")"
            + ", scaled by \(world)/\(held.worldSize))")
    }

    /// The bucketed all-reduce over `transport`, with this rank's error-feedback residual restored on a resume.
    private func makeReducer(_ welcome: Welcome, trainer: Trainer, transport: any DataPlaneTransport,
                             timeout: Duration, tracer: Tracer?) -> (BucketedReducer, (any ErrorFeedbackReducer)?) {
        let (rank, world) = (welcome.rank, welcome.worldSize)
        var options = CollectiveOptions(chunkBytes: welcome.chunkBytes, timeout: timeout)
        options.dgc = welcome.config.dgcOptions
        let allReducer = makeAllReducer(transport, algorithm: welcome.algorithm, hub: world, options: options,
                                        compression: welcome.compression, tracer: tracer)
        let count = trainer.network.parameters.count
        let feedback = welcome.compression.usesErrorFeedback ? allReducer as? any ErrorFeedbackReducer : nil
        if let feedback, let resumed = welcome.resumeFrom {
            let dir = (resumed as NSString).deletingLastPathComponent
            do {
                feedback.restoreErrorFeedback(try ResidualFile.load(directory: dir, step: trainer.step, rank: rank, worldSize: world, count: count),
                                              count: count)
                log("rank \(rank): error-feedback residual restored from \(ResidualFile.path(directory: dir, step: trainer.step, rank: rank))")
            } catch {
                log("rank \(rank): warning: \(error); its error-feedback residual starts from zero")
            }
        }
        let plan = bucketPlan(layerRanges: trainer.network.layerRanges, bucketBytes: welcome.bucketBytes)
        let reducer = BucketedReducer(reducer: allReducer, plan: plan)
        reducer.shareWeight = shareWeight(rank: rank, of: world, globalBatch: welcome.config.batchSize)
        reducer.tracer = tracer
        return (reducer, feedback)
    }

    /// Waits for the message `match` accepts; an abort or reject ends the wait with an error, and so does
    /// a signal to this process (when `interruptible`) or a refused handshake.
    /// A halt of membership epoch `halts` (already answered: nil) is passed over; any other halt throws `Halted`.
    private func expect<T>(_ channel: any ControlClientChannel, timeout: Duration, waitingFor what: String,
                           interruptible: Bool = true, halts: Int? = nil, _ match: (ControlMessage) -> T?) throws -> T {
        let deadline = clock.now + timeout
        while clock.now < deadline {
            if interruptible, let reason = signals.reason { throw Interrupted(reason: "\(reason) while waiting for \(what)", signal: signals.signal) }
            if let failure = channel.handshakeFailure {
                throw ClusterError("authentication failed: \(failure). Give every process of the run the same --key-file (or --insecure to all)")
            }
            guard let message = try channel.receiveMessage(timeout: min(.milliseconds(200), deadline - clock.now), from: coordinator) else { continue }
            if let value = match(message) { return value }
            switch message {
            case .reject(let r): throw ClusterError("the coordinator at \(coordinator) refused this worker: \(r.reason)")
            case .abort(let a): throw ClusterError("the coordinator aborted the run: \(a.reason)")
            case .halt(let h) where h.epoch != halts: throw Halted(reason: h.reason)
            default: continue
            }
        }
        throw ClusterError("no word from the coordinator at \(coordinator) for \(timeout) while waiting for \(what)")
    }
}

/// The step in flight was given up because the coordinator halted the run (an elastic run lost a member).
struct Halted: Error, CustomStringConvertible {
    var reason: String
    var description: String { "halted: \(reason)" }
}

/// What survivors at the same step must agree on after a halt: FNV-1a-64 over the parameters, then
/// over the momentum (what the all-reduce keeps equal on every rank; BatchNorm's running statistics
/// are each rank's own, as in DDP).
func stateChecksum(_ trainer: Trainer) -> String {
    parametersChecksum(UnsafeBufferPointer(trainer.network.parameters.valueBuffer)) + "-"
        + parametersChecksum(UnsafeBufferPointer(start: trainer.optimizer.velocity.pointer, count: trainer.optimizer.count))
}

extension Welcome {
    var timeout: Duration { .milliseconds(Int(timeoutSeconds * 1000)) }
}

/// A membership epoch as a worker trains it: its number, the welcome as it stands for it (rank, world
/// size, data-plane salt), and the state transfer before its first step (nil: nobody receives one).
struct WorkerEpoch {
    var number: Int
    var welcome: Welcome
    var transfer: StateTransfer?
}

/// Values of a rank's own (its error-feedback residual, BatchNorm's running statistics) as it held them
/// when its membership epoch was halted, and as they were before the step then in flight (nil: not recorded).
struct HaltedValues {
    var current: [Float]
    var atStepStart: (step: Int, values: [Float])?

    /// The values to go on with from `step`: those from before it if this rank abandoned it in flight
    /// (it recorded them at that step and receives no state), else the ones it held.
    func kept(at step: Int, receives: Bool) -> (values: [Float], abandoned: Bool) {
        if !receives, let start = atStepStart, start.step == step { return (start.values, true) }
        return (current, false)
    }
}

/// What an elastic worker held of its own when its membership epoch of `worldSize` ranks was halted
/// (`Worker.carryHalted`).
struct HaltedState {
    var residual: HaltedValues?
    var buffers: HaltedValues?
    var worldSize: Int
}

/// A worker's model and data, ready to train.
struct WorkerModel {
    let trainer: Trainer
    let testSet: CIFAR10?
    /// This rank's share of the test set: every N-th image from its rank.
    var testShard: [Int] { Array(stride(from: trainer.rank, to: testSet?.count ?? 0, by: trainer.worldSize)) }
    let dataDirectory: String
    let checksum: String
}

/// A worker's side of the training loop: a report per step (with its bytes and times), its share
/// of the test set at epoch ends, checkpoints (rank 0; every rank its error-feedback residual), the
/// coordinator's messages (abort, stop after a step) and its silence.
final class WorkerHooks: TrainingLoopHooks {
    let welcome: Welcome, model: WorkerModel
    let channel: any ControlClientChannel, transport: any DataPlaneTransport
    let reducer: BucketedReducer, feedback: (any ErrorFeedbackReducer)?
    let heartbeat: HeartbeatSender, stop: StopToken, signals: StopToken, clock: any ClusterClock, timeout: Duration, coordinator: String
    let events: (ClusterEvent) -> Void, log: (String) -> Void, stepStarted: (Int) -> Void
    private var forwardedSignal = false
    /// An elastic run's membership epoch and the interruption its halt sets (nil: never halted).
    var halt: (epoch: Int, interruption: Interruption)?
    /// An elastic run with error feedback: the residual before the step in flight (`Worker.carryHalted`).
    private(set) var residualAtStepStart: (step: Int, values: [Float])?
    /// An elastic run with BatchNorm: its running statistics before the step in flight, whose forward pass
    /// updates them (`Worker.carryHalted`).
    private(set) var buffersAtStepStart: (step: Int, values: [Float])?
    private var trainer: Trainer { model.trainer }
    private var rank: Int { welcome.rank }
    private var heardFromCoordinator: ContinuousClock.Instant
    private var lastEnd = DispatchTime.now().uptimeNanoseconds
    private var before = ByteCounters(), controlBefore = 0, waitBefore = 0.0
    private var report: StepReport?
    /// Who held the checkpoint directory's lock when training began: this run's coordinator.
    private let owner: DirectoryLock.Holder?

    init(welcome: Welcome, model: WorkerModel, channel: any ControlClientChannel, transport: any DataPlaneTransport,
         reducer: BucketedReducer, feedback: (any ErrorFeedbackReducer)?, heartbeat: HeartbeatSender, stop: StopToken,
         signals: StopToken, clock: any ClusterClock, timeout: Duration, coordinator: String, events: @escaping (ClusterEvent) -> Void,
         log: @escaping (String) -> Void, stepStarted: @escaping (Int) -> Void) {
        self.welcome = welcome; self.model = model; self.channel = channel; self.transport = transport; self.reducer = reducer
        self.feedback = feedback; self.heartbeat = heartbeat; self.stop = stop; self.signals = signals; self.clock = clock; self.timeout = timeout
        self.coordinator = coordinator; self.events = events; self.log = log; self.stepStarted = stepStarted
        heardFromCoordinator = clock.now
        owner = welcome.checkpointDirectory.flatMap { DirectoryLock.holder(in: $0) }
    }

    func willStep(_ step: Int, loader: BatchLoader) {
        stepStarted(step)
        if welcome.elastic == true {
            if let feedback { residualAtStepStart = (step, feedback.errorFeedback(count: trainer.network.parameters.count)) }
            if trainer.network.buffers.count > 0 { buffersAtStepStart = (step, trainer.network.buffers.copyValues()) }
        }
        heartbeat.step = step
        reducer.step = step
        before = transport.counters
        controlBefore = channel.bytesSent + channel.bytesReceived
        waitBefore = loader.waitSeconds
    }

    func didStep(_ r: StepResult, epochEnded: Bool, loader: BatchLoader) throws {
        let after = transport.counters
        let now = DispatchTime.now().uptimeNanoseconds
        func overhead(_ c: ByteCounters) -> Int { c.controlBytesSent + c.controlBytesReceived + c.framingBytesSent + c.framingBytesReceived }
        var report = StepReport(
            step: r.step, epoch: r.epoch, rank: rank, loss: r.loss, correct: r.correct, images: r.images,
            learningRate: r.learningRate,
            allreduceBytesSent: after.payloadBytesSent - before.payloadBytesSent,
            allreduceBytesReceived: after.payloadBytesReceived - before.payloadBytesReceived,
            controlBytes: overhead(after) - overhead(before) + channel.bytesSent + channel.bytesReceived - controlBefore,
            allreduceSeconds: reducer.busySeconds, computeSeconds: r.computeSeconds,
            stepSeconds: Double(now - lastEnd) * 1e-9, dataWaitSeconds: loader.waitSeconds - waitBefore)
        lastEnd = now
        if let testSet = model.testSet, epochEnded {
            // Every rank evaluates its share of the test set at once, so nobody waits for one evaluator.
            let e = trainer.evaluate(testSet, indices: model.testShard)
            report.testCorrect = Int((e.accuracy * Double(e.images)).rounded())
            report.testImages = e.images
            lastEnd = DispatchTime.now().uptimeNanoseconds
        }
        self.report = report
    }

    func checkpoint(reason: String) throws {
        guard let dir = welcome.checkpointDirectory else { return }
        // Nothing more goes into a directory this run no longer owns (its coordinator has ended).
        do { try owner.map { try DirectoryLock.requireHeld(dir, by: $0) } } catch {
            throw ClusterError("rank \(rank): not writing the checkpoint at step \(trainer.step): \(error)")
        }
        // The gradient mass compression has not sent yet differs between ranks: each writes its own.
        if let feedback {
            try ResidualFile.save(feedback.errorFeedback(count: trainer.network.parameters.count), count: trainer.network.parameters.count,
                                  directory: dir, step: trainer.step,
                                  rank: rank, worldSize: welcome.worldSize, compression: welcome.compression.description,
                                  keep: welcome.keepCheckpoints)
        }
        // One writer for the rest: after the all-reduce every rank holds the same parameters and momentum.
        guard rank == 0 else { return }
        let path = try Checkpoint(trainer: trainer, worldSize: welcome.worldSize).save(directory: dir, keep: welcome.keepCheckpoints)
        log("rank 0: checkpoint at step \(trainer.step): \(path)")
        events(ClusterEvent(.checkpoint, step: trainer.step, path: path))
    }

    func stepFinished(_ r: StepResult) throws {
        if let report { try channel.send(.stepReport(report)) }
        if let reason = halt?.interruption.reason { throw Halted(reason: reason) }
        if !forwardedSignal, let reason = signals.reason {
            // The coordinator picks the step every rank stops after (and rank 0 checkpoints there).
            forwardedSignal = true
            log("rank \(rank): \(reason): asking the coordinator to stop the run")
            try channel.send(.stop(Stop(reason: reason)))
        }
        // At the last step the coordinator's next word is the final stop, read after the loop.
        if trainer.isFinished || stop.stopStep(current: trainer.step) == trainer.step { return }
        while let message = try channel.receiveMessage(timeout: .zero, from: coordinator) {
            heardFromCoordinator = clock.now
            switch message {
            case .abort(let a): throw ClusterError("rank \(rank): the coordinator aborted the run: \(a.reason)")
            case .halt(let h) where h.epoch == halt?.epoch:
                halt?.interruption.interrupt(h.reason)
                throw Halted(reason: h.reason)
            case .stop(let s):
                guard let after = s.afterStep else { throw ClusterError("rank \(rank): the coordinator stopped the run early: \(s.reason)") }
                log("rank \(rank): stopping after step \(after) (\(s.reason))")
                stop.request(afterStep: after, reason: s.reason)
                if trainer.step >= after { return }
            default: break
            }
        }
        let silence = clock.now - heardFromCoordinator
        if silence > timeout { throw ClusterError(silent(silence) + "; stopping after step \(trainer.step)") }
    }

    private func silent(_ silence: Duration) -> String {
        "rank \(rank): the coordinator at \(coordinator) has been silent for \(Int(silence.components.seconds)) s (timeout \(timeout))"
    }

    /// A step that failed because the coordinator died looks like a dead peer; says which it was.
    func explain(_ error: Error) -> Error {
        while (try? channel.receiveMessage(timeout: .zero, from: coordinator)) != nil { heardFromCoordinator = clock.now }
        let silence = clock.now - heardFromCoordinator
        guard silence > timeout, !(error is ClusterError) else { return error }
        return ClusterError(silent(silence) + "; step \(trainer.step) failed: \(error)")
    }
}

/// Sends a heartbeat every `interval` from its own thread and channel, so a long step never looks like
/// silence; and reads that channel, where an elastic run's coordinator sends its halts: a halt of the
/// membership epoch being trained sets its `Interruption`, which ends the step's blocked receives.
final class HeartbeatSender: @unchecked Sendable {
    // @unchecked Sendable: `running`, `current`, `currentRank` and `watched` are guarded by `lock`; the channel is used by the thread only.
    private let lock = NSLock()
    private var running = true
    private var current = 0, currentRank: Int
    private var watched: (epoch: Int, interruption: Interruption)?

    /// The step the worker is on (sent with the next heartbeat).
    var step: Int {
        get { lock.withLock { current } }
        set { lock.withLock { current = newValue } }
    }

    /// The rank the worker holds (an elastic run renumbers it).
    var rank: Int {
        get { lock.withLock { currentRank } }
        set { lock.withLock { currentRank = newValue } }
    }

    init(channel: any ControlClientChannel, rank: Int, interval: Duration) throws {
        currentRank = rank
        let box = ChannelBox(channel)
        Thread {
            var next = ContinuousClock.now
            while self.lock.withLock({ self.running }) {
                if ContinuousClock.now >= next {
                    box.channel.trySend(ControlMessage.heartbeat(Heartbeat(rank: self.rank, step: self.step)).encoded())
                    next = ContinuousClock.now + interval
                }
                // Short waits: a halt acts within one, and `stop()` closes the channel at once (the ZeroMQ
                // context, and so the process exit, waits for that).
                if let frame = try? box.channel.receive(timeout: min(Interruption.pollInterval, interval)),
                   case .halt(let h)? = try? frame.withUnsafeBytes({ try ControlMessage.decode($0, from: "the coordinator") }) {
                    self.lock.withLock { self.watched }.map { if $0.epoch == h.epoch { $0.interruption.interrupt(h.reason) } }
                }
            }
            box.channel.close()
        }.start()
    }

    /// From now on a halt of membership epoch `epoch` sets `interruption`.
    func watch(epoch: Int, _ interruption: Interruption) { lock.withLock { watched = (epoch, interruption) } }

    func stop() { lock.withLock { running = false } }
}

/// Hands a channel to the one thread that will use it.
private final class ChannelBox: @unchecked Sendable {
    // @unchecked Sendable: moved to one thread at its start (a full barrier) and used only there.
    let channel: any ControlClientChannel
    init(_ channel: any ControlClientChannel) { self.channel = channel }
}

/// The local IP address the kernel would use to reach the host of `endpoint` (tcp://HOST:PORT).
/// For ipc:// endpoints, 127.0.0.1.
public func localAddress(towards endpoint: String) throws -> String {
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
