import Foundation
import SqueezeCollectives
import SqueezeTransport
import SqueezeEngine
import SqueezeSystem
import SqueezeTraining

/// How the coordinator runs a cluster. Codable: `launch` hands it to its coordinator process in a file
/// (`CoordinatorProcess`); the tracer is the process's own.
public struct CoordinatorOptions: Codable, Sendable {
    public var bind: String
    public var workers: Int
    public var config: TrainingConfig
    /// Records in the training set (sizes an epoch for the progress display).
    public var trainingRecords = 50_000
    public var algorithm: AllReduceAlgorithm = .ring
    public var compression: GradientCompression = .none
    public var bucketBytes = 1 << 20
    /// Payload bytes per data-plane message, sent to every worker in the welcome.
    public var chunkBytes = CollectiveOptions.defaultChunkBytes
    public var transport = DataTransportKind.tcp
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
    /// Delete the checkpoints already in `checkpointDirectory` and start at step 0.
    public var startOver = false
    public var quiet = false
    /// An elastic run (`--elastic`): a lost worker is removed and the others go on from the last
    /// completed step; below `minWorkers` the run checkpoints and stops (docs/cluster.md).
    public var elastic = false
    public var minWorkers = 1
    /// With `elastic`: the most workers, joiners included (nil: `workers`); a joiner beyond it is refused.
    public var maxWorkers: Int?
    /// The star hub's timeline (nil: not traced; a ring has no hub).
    public var tracer: Tracer?
    public init(bind: String, workers: Int, config: TrainingConfig) {
        self.bind = bind; self.workers = workers; self.config = config
    }
    enum CodingKeys: String, CodingKey {
        case bind, workers, config, trainingRecords, algorithm, compression, bucketBytes, transport, timeout, joinTimeout, metricsPath
        case initWeights, saveWeights, evaluate, checkpointDirectory, checkpointEvery, keepCheckpoints, resume, startOver, quiet
        case elastic, minWorkers, maxWorkers
    }
}

/// Per-rank totals for the summary table.
public struct RankTraffic: Sendable {
    public var steps = 0
    public var bytesSent = 0, bytesReceived = 0, controlBytes = 0
    public var allreduceSeconds = 0.0, stepSeconds = 0.0, computeSeconds = 0.0
    /// The theory's bytes summed over the steps (they differ from step to step during DGC's sparsity warm-up).
    public var theoryBytesSent = 0.0
}

public struct ClusterSummary: Sendable {
    public var steps: Int
    public var seconds: Double
    public var imagesPerSecond: Double
    public var perRank: [RankTraffic]
    public var theoryBytesPerWorker: Double
    /// Each rank's own theory (the tree's roles differ; ring and star: `theoryBytesPerWorker` for all).
    public var theoryBytesPerRank: [Double]
    public var hubBytesSent: Int, hubBytesReceived: Int
    public var testAccuracy: Double?
    /// The signal that stopped the run early (after a checkpoint), if any.
    public var interruptedBy: Int32?
    public var finalStep = 0
    /// Why the run stopped before its last step (a signal, a stop request), if it did.
    public var stoppedEarly: String?
    /// The membership epochs (one unless an elastic run lost workers) and who left.
    public var epochs = [MembershipEpoch]()
    public var departures = [Departure]()
}

/// Owns a run: rendezvous, ranks, configuration and the initial-weights checksum, metrics from
/// every worker, failure detection (heartbeats) and the end of the run. For `star` it is also the
/// hub that averages every worker's gradients.
///
/// Event-driven: `prepare()`, then `poll(timeout:)` until `isFinished`, then `finish()` (what
/// `run()` does). Each poll handles at most one message and then checks time (`clock`): the
/// rendezvous deadline, heartbeats, silent workers, and a stop requested through `stop`. Tests
/// drive it step by step over an `InProcessControlPlane` with a clock they advance by hand.
public final class Coordinator {
    /// An elastic run that lost a member is `recovering` (waiting for the survivors' positions), then
    /// `reforming` (waiting for their new data planes), or `stopping` (too few: a checkpoint is written).
    public enum Phase: Sendable { case created, rendezvous, training, recovering, reforming, stopping, finished }

    let options: CoordinatorOptions
    let log: (String) -> Void
    let channel: any ControlServerChannel
    let dataPlane: any DataPlaneFactory
    let stop: StopToken
    let clock: any ClusterClock
    let events: (ClusterEvent) -> Void
    private var metrics: MetricsSink?
    public private(set) var phase = Phase.created

    // Fixed by `prepare()`.
    private var checksum = "", parameterCount = 0, forwardMACs = 0, plan = [Range<Int>](), startStep = 0
    private var resumeFrom: String?
    /// Drawn at every rendezvous (every coordinator start, so every restart): the data plane's keys derive from it.
    private var dataPlaneSalt = [UInt8]()
    /// The checkpoint directory's lock, held from `prepare()` for as long as this coordinator exists.
    private var directoryLock: DirectoryLock?
    /// The star's hub (nil: ring or tree): a data plane, and its reduce loop while a membership epoch trains.
    private var hub: (any DataPlaneTransport)?
    private var hubThread: HubThread?
    /// Ends the hub's blocked receives when its membership epoch is halted.
    private var hubInterruption: Interruption?
    /// Payload bytes of the hubs of earlier membership epochs (an elastic star has one per epoch).
    private var retiredHubBytes = (sent: 0, received: 0)
    // Rendezvous. These arrays are indexed by member (`MemberID`: the rank each held when training began).
    private var identities = [[UInt8]?]()
    private var names = [String]()
    private var endpoints = [String?]()
    private var joinDeadline = ContinuousClock.Instant.now
    /// Messages dropped: from peers that hold no rank, or that speak for a rank they do not hold.
    public private(set) var droppedMessages = 0
    private lazy var dropLog = RateLimitedLog(interval: .seconds(5)) { [log] in log($0) }
    // Training.
    private var progress: Progress!
    private var lastHeard = [ContinuousClock.Instant]()
    private var lastStep = [Int]()
    private var lastBeat = ContinuousClock.Instant.now
    // Membership (every run has one epoch; an elastic run one more after each loss).
    private var membership: Membership!
    /// The survivors' positions during a recovery, by member.
    private var positions = [Int: Position]()
    /// When the recovery under way began (the first loss), in the run's seconds.
    private var lostSeconds = 0.0
    /// While stopping: why, and how long the checkpoint may take.
    private var stopping: (error: String, deadline: ContinuousClock.Instant)?
    /// Joiners that found the run full, waiting (until `until`) for a member's loss to be seen.
    private var parked = [(hello: Hello, id: [UInt8], until: ContinuousClock.Instant)]()
    /// The last membership epoch that trained (one formed and halted again before its start never did).
    private var trainedEpoch = 0

    /// `metrics` overrides `options.metricsPath`; `events` gets `listening` and `ready`.
    public init(options: CoordinatorOptions, channel: any ControlServerChannel, dataPlane: any DataPlaneFactory,
                stop: StopToken = StopToken(), clock: any ClusterClock = SystemClock(), metrics: MetricsSink? = nil,
                events: @escaping (ClusterEvent) -> Void = { _ in }, log: @escaping (String) -> Void) {
        self.options = options; self.channel = channel; self.dataPlane = dataPlane; self.stop = stop; self.clock = clock
        self.metrics = metrics; self.events = events; self.log = log
    }

    public var isFinished: Bool { phase == .finished }

    /// The whole run: rendezvous, training, the end. On failure every worker gets an `abort`.
    public func run() throws -> ClusterSummary {
        do {
            try prepare()
            while !isFinished { try poll(timeout: .milliseconds(100)) }
            return finish()
        } catch {
            abort(error)
            throw error
        }
    }

    /// Builds the reference model (from the seed, initial weights or a checkpoint) and its
    /// checksum, opens the metrics and, for `star`, the hub's data plane; then waits for workers.
    public func prepare() throws {
        directoryLock = try DirectoryLock.acquire(options.checkpointDirectory, log: log)  // before any other work
        let n = options.workers, config = options.config
        if let refusal = options.algorithm.refusal(options.compression) ?? config.dgc?.refusal(options.compression) { throw ClusterError(refusal) }
        do {
            membership = try Membership(rules: MembershipRules(minWorkers: options.minWorkers, maxWorkers: options.maxWorkers ?? n,
                                                               globalBatch: config.batchSize), workers: n)
        } catch { throw ClusterError("\(error)") }
        guard options.chunkBytes >= MemoryLayout<Float>.size else { throw ClusterError("data-plane chunks of \(options.chunkBytes) bytes: at least one Float (4 bytes)") }
        let reference = Network(config: config.model, seed: config.seed)
        if let path = options.initWeights { try reference.loadWeights(from: path) }
        if let found = try Resume.start(directory: options.checkpointDirectory, resume: options.resume, startOver: options.startOver, log: log) {
            do { try found.checkCompatible(with: config) } catch { throw ClusterError("\(error)") }
            try found.copyWeights(into: reference)
            startStep = found.step
            resumeFrom = found.path
            log("resuming from \(found.path!) at step \(found.step) (written by \(found.worldSize) worker(s))")
        }
        checksum = parametersChecksum(UnsafeBufferPointer(reference.parameters.valueBuffer))
        parameterCount = reference.parameters.count
        forwardMACs = reference.forwardMACs(inputSize: config.model.inputSize)
        plan = bucketPlan(layerRanges: reference.layerRanges, bucketBytes: options.bucketBytes)
        dataPlaneSalt = try DataPlaneSeal.randomSalt()
        if metrics == nil { metrics = try options.metricsPath.map { try MetricsWriter(path: $0, append: options.resume) } }
        try makeHub(workers: n, salt: dataPlaneSalt)
        identities = Array(repeating: nil, count: n)
        names = Array(repeating: "", count: n)
        endpoints = Array(repeating: nil, count: n)
        lastHeard = Array(repeating: clock.now, count: n)
        joinDeadline = clock.now + options.joinTimeout
        phase = .rendezvous
        events(ClusterEvent(.listening, endpoint: channel.endpoint, workers: n))
        log("coordinator at \(channel.endpoint): waiting for \(n) worker(s); \(config.model.architecture.rawValue), "
            + "\(parameterCount) parameters, \(options.algorithm.rawValue) all-reduce in \(plan.count) bucket(s)"
            + (options.compression == .none ? "" : ", --compress \(options.compression)"))
    }

    /// Handles at most one message (waiting up to `timeout` for it), then checks time and the stop token.
    /// Connections dropped meanwhile are handled first: a worker that died before the message was sent
    /// is gone before it is read (its replacement's hello must find its place free).
    public func poll(timeout: Duration) throws {
        let received = try channel.receive(timeout: timeout)
        try loseDroppedPeers()
        if let (id, frame) = received { try handle(frame, from: id) }
        try tick()
    }

    /// An elastic run's workers whose control connections dropped (their process exited or was killed) are lost.
    private func loseDroppedPeers() throws {
        guard options.elastic, [.training, .recovering, .reforming, .stopping].contains(phase) else { return }
        for peer in channel.droppedPeers() {
            if let member = holder(peer)?.member { try lose(member, reason: "dropped its connection (its process exited or was killed)") }
        }
    }

    /// After the last step: tells the workers the run is over and sums it up.
    public func finish() -> ClusterSummary {
        for id in identities { if let id { channel.send(.stop(Stop(reason: "run complete")), to: id) } }
        for p in parked { channel.send(.reject(Reject(reason: "the run is complete; it admits no one")), to: p.id) }
        hubThread?.join()
        retireHub()
        var summary = progress.summary(startStep: startStep, stop: stop)
        summary.epochs = membership.epochs
        summary.departures = membership.departures
        (summary.hubBytesSent, summary.hubBytesReceived) = retiredHubBytes
        return summary
    }

    /// Tells every worker the run failed; stops the hub.
    public func abort(_ error: Error) {
        for id in identities { if let id { channel.send(.abort(Abort(reason: String(describing: error))), to: id) } }
        retireHub()
        phase = .finished
    }

    private func memberOf(_ id: [UInt8]) -> Int? { identities.firstIndex { $0 == id } }

    /// The member that sent `id`'s frames: from its main connection, or its heartbeat connection.
    private func holder(_ id: [UInt8]) -> (member: Int, heartbeat: Bool)? {
        if let member = memberOf(id) { return (member, false) }
        return ControlIdentity.mainIdentity(ofHeartbeat: id).flatMap(memberOf).map { ($0, true) }
    }

    /// The rank `member` holds in the current membership epoch.
    private func rank(of member: Int) -> Int { membership.current.rank(of: MemberID(member)) ?? member }

    private func handle(_ frame: [UInt8], from id: [UInt8]) throws {
        let holder = holder(id)
        if let holder { lastHeard[holder.member] = clock.now }
        guard let holder else {
            // A peer without a rank may only ask for one; anything else is dropped (it cannot stop the run).
            let message: ControlMessage
            do { message = try frame.withUnsafeBytes { try ControlMessage.decode($0, from: "a peer that holds no rank") } } catch {
                channel.send(.reject(Reject(reason: String(describing: error))), to: id)  // e.g. another protocol version
                return drop("\(error)")
            }
            guard case .hello(let h) = message else { return drop("a \(message.kind) message from a peer that holds no rank") }
            if phase == .rendezvous { return welcome(h, id: id) }
            return options.elastic ? welcomeJoiner(h, id: id)
                : channel.send(.reject(Reject(reason: "the run is already training with \(options.workers) worker(s)")), to: id)
        }
        let sender = (rank: rank(of: holder.member), heartbeat: holder.heartbeat), member = holder.member
        let peer = phase == .rendezvous ? "worker rank \(sender.rank) (\(names[member]))" : "worker rank \(sender.rank)"
        guard let message = decodeOrReject(frame, from: peer, id: id) else { return }
        // Heartbeats may come from the heartbeat connection; everything else from the main one.
        switch message {
        case .heartbeat(let h):
            guard h.rank == sender.rank || membership.current.rank(of: MemberID(member)) == nil else { return drop("a heartbeat for rank \(h.rank) from rank \(sender.rank)'s holder") }
            if phase == .training { lastStep[member] = max(lastStep[member], h.step) }
            return
        default:
            guard !sender.heartbeat else { return drop("a \(message.kind) message on rank \(sender.rank)'s heartbeat connection") }
        }
        if case .ready(let r) = message, membership.waiting.contains(MemberID(member)), !membership.readyJoiners.contains(MemberID(member)) {
            return try joinerReady(r, member: member)  // a joiner's first: its model is built
        }
        switch phase {
        case .rendezvous: try rendezvous(message, rank: sender.rank, id: id)
        case .training: try training(message, rank: sender.rank, member: member)
        case .recovering, .reforming, .stopping: try recovering(message, rank: sender.rank, member: member)
        case .created, .finished: break
        }
    }

    /// Counts a message that is not acted on, and says so at a bounded rate.
    private func drop(_ what: String) {
        droppedMessages += 1
        dropLog.line("dropped \(what) (\(droppedMessages) dropped so far)")
    }

    /// A valid message, or nil after logging the problem and sending the peer a `reject` (the run goes on).
    private func decodeOrReject(_ frame: [UInt8], from peer: String, id: [UInt8]) -> ControlMessage? {
        do {
            return try frame.withUnsafeBytes { try ControlMessage.decode($0, from: peer) }
        } catch {
            log("\(error)")
            channel.send(.reject(Reject(reason: String(describing: error))), to: id)
            return nil
        }
    }

    // MARK: Rendezvous

    private func rendezvous(_ message: ControlMessage, rank: Int, id: [UInt8]) throws {
        switch message {
        case .ready(let r): try ready(r, id: id)
        case .failure(let f) where f.rank == rank: throw ClusterError("worker rank \(rank) failed before training: \(f.message)")
        case .stop(let s): throw Interrupted(reason: "worker rank \(rank) was stopped before training (\(s.reason))")
        default: drop("a \(message.kind) message from rank \(rank) during the rendezvous")
        }
    }

    /// Gives a new peer the rank it asked for if free, else the lowest free one, and the run's configuration.
    private func welcome(_ h: Hello, id: [UInt8]) {
        let n = options.workers
        guard memberOf(id) == nil else { return }
        let free = (0..<n).filter { identities[$0] == nil }
        guard let rank = h.requestedRank.flatMap({ free.contains($0) ? $0 : nil }) ?? free.first else {
            let reason = "the run already has its \(n) worker(s)"
            log("refused \(h.host) pid \(h.pid): \(reason)")
            channel.send(.reject(Reject(reason: reason)), to: id)
            return
        }
        if let r = h.requestedRank, r != rank { log("\(h.host) pid \(h.pid) asked for rank \(r), which is taken or out of range; gave rank \(rank)") }
        identities[rank] = id
        names[rank] = "\(h.host) pid \(h.pid)"
        lastHeard[rank] = clock.now
        channel.send(.welcome(welcomeMessage(rank: rank)), to: id)
        log("worker \(names[rank]) joined as rank \(rank)")
    }

    /// The run's configuration for rank `rank` of the workers it starts with (a joiner: rank 0, `joining`).
    private func welcomeMessage(rank: Int, joining: Bool = false) -> Welcome {
        Welcome(rank: rank, worldSize: options.workers, config: options.config, algorithm: options.algorithm,
                compression: options.compression, bucketBytes: options.bucketBytes,
                chunkBytes: options.chunkBytes, transport: options.transport,
                timeoutSeconds: seconds(options.timeout), parametersChecksum: checksum,
                initWeights: options.initWeights, saveWeights: options.saveWeights,
                evaluate: options.evaluate, checkpointDirectory: options.checkpointDirectory,
                checkpointEvery: options.checkpointEvery, keepCheckpoints: options.keepCheckpoints,
                resumeFrom: resumeFrom, dataPlaneSalt: DataPlaneSeal.hex(dataPlaneSalt),
                elastic: options.elastic ? true : nil, joining: joining ? true : nil)
    }

    /// Accepts a worker whose model and initial parameters match the run's; training starts when all have.
    private func ready(_ r: Ready, id: [UInt8]) throws {
        guard let rank = memberOf(id), rank == r.rank else { return }
        let problems = readyProblems(r)
        guard problems.isEmpty else {
            let reason = "worker rank \(rank) (\(names[rank])) rejected: " + problems.joined(separator: "; ")
            log(reason)
            channel.send(.reject(Reject(reason: reason)), to: id)
            identities[rank] = nil  // the rank is free again for a correct worker
            return
        }
        endpoints[rank] = r.dataEndpoint
        if !endpoints.contains(where: { $0 == nil }) { try beginTraining() }
    }

    /// How a worker's model differs from the run's (empty: it may train).
    private func readyProblems(_ r: Ready) -> [String] {
        var problems = [String]()
        if r.model != options.config.model { problems.append("its model configuration differs from the run's") }
        if r.parameterCount != parameterCount { problems.append("it has \(r.parameterCount) parameters, the run \(parameterCount)") }
        if r.parametersChecksum != checksum { problems.append("its initial parameters' checksum \(r.parametersChecksum) is not \(checksum)") }
        return problems
    }

    private func beginTraining() throws {
        let n = options.workers, config = options.config
        let all = try startHub(endpoints: endpoints.map { $0! }, fromStep: startStep)
        for id in identities { channel.send(.start(Start(step: startStep, endpoints: all)), to: id!) }
        progress = Progress(options: options, plan: plan, startStep: startStep, forwardMACs: forwardMACs, metrics: metrics)
        lastHeard = Array(repeating: clock.now, count: n)
        lastStep = Array(repeating: 0, count: n)
        lastBeat = clock.now
        phase = progress.isComplete ? .finished : .training  // resumed at the last step: nothing left to train
        events(ClusterEvent(.ready, step: startStep, workers: n))
        log("all \(n) worker(s) ready; training \(config.totalSteps) steps of \(config.batchSize) images (\(config.batchSize / n) per worker)")
    }

    // MARK: Training

    private func training(_ message: ControlMessage, rank: Int, member: Int) throws {
        switch message {
        case .stepReport(let r) where r.rank == rank:
            lastStep[member] = r.step
            progress.add(r)
            if progress.isComplete { phase = .finished }
        case .failure(let f) where f.rank == rank:
            try lose(member, reason: "failed at step \(f.step): \(f.message)")
        case .stop(let s):
            if progress.stopRequest == nil { requestStop("worker rank \(rank) asks to stop (\(s.reason))") }
        default:
            drop("a \(message.kind) message from rank \(rank) that it may not send now")
        }
    }

    /// What time and the stop token decide: the rendezvous deadline; heartbeats to the workers
    /// (they watch for our silence as we watch for theirs); a requested stop; silent workers.
    private func tick() throws {
        let now = clock.now
        switch phase {
        case .rendezvous:
            if let reason = stop.reason { throw Interrupted(reason: "\(reason) while waiting for workers", signal: stop.signal) }
            // A rank whose holder went silent before it was ready is free again for another worker.
            for rank in identities.indices where identities[rank] != nil && endpoints[rank] == nil && now - lastHeard[rank] > options.timeout {
                log("worker rank \(rank) (\(names[rank])) went silent before it was ready; the rank is free again")
                identities[rank] = nil
            }
            guard now >= joinDeadline else { return }
            let n = options.workers
            let joined = (0..<n).filter { identities[$0] != nil }
            let missing = (0..<n).filter { endpoints[$0] == nil }
            throw ClusterError("rendezvous timed out after \(options.joinTimeout): \(joined.count) of \(n) worker(s) joined; "
                               + "rank(s) still missing: \(missing.map(String.init).joined(separator: ", "))")
        case .training, .recovering, .reforming, .stopping:
            if now - lastBeat > options.timeout / 4 {
                for id in identities { if let id { channel.send(.heartbeat(Heartbeat(rank: -1, step: progress.completed)), to: id) } }
                lastBeat = now
            }
            if phase == .training, let reason = stop.reason, progress.stopRequest == nil { requestStop(reason) }
            retryParkedJoiners()
            if let failure = hubThread?.failure { throw ClusterError("the star hub failed: \(failure)") }
            if let stopping, now > stopping.deadline { throw ClusterError(stopping.error + " (the checkpoint was not confirmed within \(options.timeout))") }
            for member in identities.indices where identities[member] != nil && now - lastHeard[member] > options.timeout {
                try lose(member, reason: "stopped answering at step \(lastStep[member]) (no message for \(seconds(now - lastHeard[member]).formatted(.number.precision(.fractionLength(1)))) s)")
            }
        case .created, .finished:
            break
        }
    }

    /// Stops two steps past the furthest report, so no rank is already inside the stop step's all-reduce.
    private func requestStop(_ reason: String) {
        let stopAfter = progress.requestStop(reason)
        log("\(reason): stopping after step \(stopAfter)" + (options.checkpointDirectory != nil ? " (rank 0 writes a checkpoint there)" : ""))
        for id in identities { if let id { channel.send(.stop(Stop(reason: reason, afterStep: stopAfter)), to: id) } }
        if progress.isComplete { phase = .finished }
    }
}

// MARK: Membership (an elastic run's losses and joiners)

extension Coordinator {
    /// `member` is gone (`reason`: its connection dropped, it fell silent, it failed). Without
    /// `--elastic` the run fails. Otherwise it is removed and every survivor is halted: each abandons
    /// the step in flight and sends its position, and `reconfigure` acts once all have. A joiner not
    /// admitted yet is only forgotten.
    fileprivate func lose(_ member: Int, reason: String) throws {
        if membership.waiting.contains(MemberID(member)) {
            log("the joiner \(names[member]) \(reason) before it was admitted; the run goes on as it was")
            identities[member] = nil
            membership.withdraw(MemberID(member))
            return
        }
        let what = "worker rank \(rank(of: member)) \(reason)"
        guard options.elastic else { throw ClusterError(what) }
        log("\(what) (\(names[member])): removing it")
        identities[member] = nil
        let next = membership.lose(MemberID(member), completedSteps: progress.completed, reason: reason)
        if phase == .training || phase == .reforming { halt(what) }
        if let next { try reconfigure(next) }
    }

    /// Every member abandons the step in flight and sends its position (`why` tells them why).
    private func halt(_ why: String) {
        phase = .recovering
        retireHub()  // the step in flight is abandoned at the hub too
        lostSeconds = progress.elapsed
        positions = [:]
        let halt = ControlMessage.halt(Halt(epoch: membership.current.number, reason: why))
        for m in membership.current.members {
            guard let id = identities[m.value] else { continue }
            channel.send(halt, to: id)  // read between steps and while waiting
            channel.send(halt, to: ControlIdentity.heartbeatIdentity(ofMain: id))  // read at once, also inside a step
        }
    }

    /// How long a joiner that finds the run full waits for a place. A scheduler's replacement may
    /// connect before the loss of the rank it replaces is seen (the dropped connection is reported a
    /// moment later); a hung member takes `--timeout` to be lost, and its replacement is refused sooner.
    static let placeWait = Duration.seconds(2)

    /// A worker asks to join the running run: it gets the next member identity (beyond `--max-workers`
    /// it waits up to `placeWait` for a place, then is refused; refused at once when the run is ending)
    /// and the run's configuration; it is admitted once its model is built and checked (`joinerReady`).
    fileprivate func welcomeJoiner(_ h: Hello, id: [UInt8], waitUntil: ContinuousClock.Instant? = nil) {
        let name = "\(h.host) pid \(h.pid)"
        func refuse(_ reason: String) {
            log("refused the joiner \(name): \(reason)")
            channel.send(.reject(Reject(reason: reason)), to: id)
        }
        guard phase == .training || phase == .recovering || phase == .reforming else { return refuse("the run is ending; it admits no one") }
        if parked.contains(where: { $0.id == id }) { return drop("a second hello from the waiting joiner \(name)") }
        let until = waitUntil ?? clock.now + Self.placeWait
        // At most --max-workers wait: more cannot all get a place.
        if membership.isFull && clock.now < until && parked.count < (options.maxWorkers ?? options.workers) {
            parked.append((h, id, until))
            return
        }
        let member: MemberID
        do { member = try membership.requestJoin() } catch { return refuse("\(error)") }
        precondition(member.value == identities.count, "member identities are handed out in order")
        identities.append(id)
        names.append(name)
        endpoints.append(nil)
        lastHeard.append(clock.now)
        lastStep.append(progress.completed)
        channel.send(.welcome(welcomeMessage(rank: 0, joining: true)), to: id)
        log("worker \(name) asks to join the running run (\(member)); admitted at a step boundary once its model is ready")
    }

    /// A joiner's model is built and checked: refused if it differs from the run's, else admitted now
    /// (the members are halted at their step; the recovery that follows admits it) or at the end of the
    /// change under way.
    fileprivate func joinerReady(_ r: Ready, member: Int) throws {
        let problems = readyProblems(r)
        guard problems.isEmpty else {
            let reason = "the joiner \(names[member]) is refused: " + problems.joined(separator: "; ")
            log(reason)
            channel.send(.reject(Reject(reason: reason)), to: identities[member]!)
            return try lose(member, reason: "was refused")
        }
        membership.joinerIsReady(MemberID(member))
        admitReadyJoiners()
    }

    /// Joiners that found the run full: each asks again once there is a place, or when its wait is over
    /// (then it is refused, naming --max-workers).
    private func retryParkedJoiners() {
        let now = clock.now
        let due = parked.filter { !membership.isFull || now >= $0.until }
        parked.removeAll { p in due.contains { $0.id == p.id } }
        for p in due { welcomeJoiner(p.hello, id: p.id, waitUntil: p.until) }
    }

    /// While training, begins the admission of the waiting joiners whose models are ready.
    private func admitReadyJoiners() {
        let ready = membership.readyJoiners
        guard phase == .training, !ready.isEmpty, (try? membership.beginAdmission()) != nil else { return }
        halt("\(ready.map { names[$0.value] }.joined(separator: ", ")) join(s) the run")
    }

    /// While members change: positions, new data planes, the checkpoint's confirmation, losses.
    fileprivate func recovering(_ message: ControlMessage, rank: Int, member: Int) throws {
        switch message {
        case .position(let p) where phase == .recovering && p.rank == rank:
            positions[member] = p
            do {
                if let next = try membership.report(MemberID(member), completedSteps: p.completedSteps) { try reconfigure(next) }
            } catch let error as MembershipError { drop("the position of rank \(rank): \(error)") }
        case .position where phase == .stopping:
            throw ClusterError(stopping!.error)  // the checkpoint is written
        case .ready(let r) where phase == .reforming && r.rank == rank:
            endpoints[member] = r.dataEndpoint
            if membership.current.members.allSatisfy({ endpoints[$0.value] != nil }) { try startEpoch() }
        case .stepReport(let r) where r.rank == rank:
            progress.add(r)  // a step completed before the halt
        case .failure(let f) where f.rank == rank:
            try lose(member, reason: "failed at step \(f.step): \(f.message)")
        default:
            drop("a \(message.kind) message from rank \(rank) while the members change")
        }
    }

    /// Every survivor has answered: go on with the new members (after checking that they hold the
    /// same state), or stop (too few: the furthest writes a checkpoint first).
    private func reconfigure(_ next: Reconfiguration) throws {
        switch next {
        case .stop(let error, let checkpoint):
            try stopRun(error.description, checkpoint: checkpoint?.member)
        case .reform(let epoch, _, let receivers):
            // The members at the furthest step hold its state; the others (joiners, survivors a step behind) receive it.
            let holders = epoch.members.filter { !receivers.contains($0) }
            let states = Dictionary(grouping: holders) { positions[$0.value]?.checksum ?? "none" }
            guard states.count == 1, let agreed = states.keys.first else {
                throw ClusterError("the survivors at step \(epoch.fromStep) hold different states: "
                                   + states.map { "\($0.value.map { "rank \(rank(of: $0.value))" }.joined(separator: ", ")) \($0.key)" }.joined(separator: "; "))
            }
            let receiving = epoch.members.indices.filter { receivers.contains(epoch.members[$0]) }
            let saltBytes = try DataPlaneSeal.randomSalt()  // the new data plane's keys: its frame counters start again
            let salt = DataPlaneSeal.hex(saltBytes)
            try makeHub(workers: epoch.worldSize, salt: saltBytes)
            progress.reform(workers: epoch.worldSize, fromStep: epoch.fromStep)
            for (rank, m) in epoch.members.enumerated() {
                endpoints[m.value] = nil
                channel.send(.reform(Reform(epoch: epoch.number, step: epoch.fromStep, rank: rank, worldSize: epoch.worldSize,
                                            receivers: receiving, stateChecksum: agreed, dataPlaneSalt: salt)), to: identities[m.value]!)
            }
            phase = progress.isComplete ? .finished : .reforming  // lost after the last step: nothing left to train
        }
    }

    /// Too few workers (or states that cannot be reconciled): `checkpoint`'s member, if any and if the
    /// run has a checkpoint directory, writes the checkpoint of its step; then the run fails with `error`.
    private func stopRun(_ error: String, checkpoint: MemberID?) throws {
        guard options.checkpointDirectory != nil, let member = checkpoint, let id = identities[member.value] else { throw ClusterError(error) }
        log("\(error); rank \(rank(of: member.value)) writes a checkpoint of its step first")
        channel.send(.save(Save(reason: error)), to: id)
        stopping = (error, clock.now + options.timeout)
        phase = .stopping
    }

    /// Every member of the new epoch has its data plane: they start, and the change is recorded.
    private func startEpoch() throws {
        let epoch = membership.current
        let all = try startHub(endpoints: epoch.members.map { endpoints[$0.value]! }, fromStep: epoch.fromStep)
        for m in epoch.members { channel.send(.start(Start(step: epoch.fromStep, endpoints: all)), to: identities[m.value]!) }
        for m in epoch.members { lastHeard[m.value] = clock.now }
        phase = .training
        let departed = membership.departures.filter { $0.epoch >= trainedEpoch }
        let lost = departed.map(\.description).joined(separator: "; ")
        let before = Set(membership.epochs[trainedEpoch].members)
        trainedEpoch = epoch.number
        let joined = epoch.members.indices.filter { !before.contains(epoch.members[$0]) }
        metrics?.record(MembershipEvent(epoch: epoch.number, fromStep: epoch.fromStep, worldSize: epoch.worldSize, lostRanks: departed.map(\.rank),
                                        lost: lost, lostSeconds: lostSeconds, resumedSeconds: progress.elapsed, joinedRanks: joined))
        events(ClusterEvent(.membership, step: epoch.fromStep, workers: epoch.worldSize))
        log("membership epoch \(epoch.number): \(epoch.worldSize) worker(s) from step \(epoch.fromStep) (lost: \(lost.isEmpty ? "none" : lost); "
            + "joined: \(joined.isEmpty ? "none" : joined.map { "rank \($0) (\(names[epoch.members[$0].value]))" }.joined(separator: ", ")))")
        admitReadyJoiners()  // those that became ready during the change
    }
}

// MARK: The star's hub

extension Coordinator {
    /// Star only: the hub's data plane for `n` workers (rank n of a group of n + 1), keyed by `salt`;
    /// the one of an earlier membership epoch is closed first.
    fileprivate func makeHub(workers n: Int, salt: [UInt8]) throws {
        guard options.algorithm == .star else { return }
        retireHub()
        let transport = try dataPlane.makeTransport(rank: n, worldSize: n + 1, kind: options.transport,
                                                    maxFrameBytes: dataFrameLimit(largestBucket: plan.map(\.count).max() ?? 0), salt: salt)
        let interruption = Interruption()
        transport.interruption = interruption
        (hub, hubInterruption) = (transport, interruption)
    }

    /// The data-plane endpoints of a membership epoch: the workers', then (star) the hub's, which is
    /// connected and starts reducing from `fromStep`.
    fileprivate func startHub(endpoints workers: [String], fromStep: Int) throws -> [String] {
        guard let hub else { return workers }
        let all = workers + [hub.boundEndpoint]
        try hub.connect(topology: .star(hub: workers.count), endpoints: all)
        var collective = CollectiveOptions(chunkBytes: options.chunkBytes, timeout: options.timeout)
        collective.dgc = options.config.dgcOptions
        hubThread = HubThread(hub: hub, options: collective, compression: options.compression,
                              plan: plan, steps: fromStep..<options.config.totalSteps, tracer: options.tracer)
        return all
    }

    /// Stops the hub's reduce loop (a receive it is blocked in ends within `Interruption.pollInterval`),
    /// then closes its data plane, keeping its byte counts. The transport is never closed under the thread.
    fileprivate func retireHub() {
        guard let hub else { return }
        if let hubThread {
            hubThread.cancel()
            hubInterruption?.interrupt("the hub is retired")
            hubThread.join()
        }
        retiredHubBytes.sent += hub.counters.payloadBytesSent
        retiredHubBytes.received += hub.counters.payloadBytesReceived
        hub.close(flushTimeout: .milliseconds(500))
        (self.hub, hubThread, hubInterruption) = (nil, nil, nil)
    }
}

/// The coordinator's view of training: reports gathered per step; a step completes when every
/// rank has reported it (in order), and then its metrics lines are written and progress shown.
final class Progress {
    let options: CoordinatorOptions
    let metrics: MetricsSink?
    let display = ProgressDisplay(prefix: "")
    /// Workers training now (an elastic run loses some): reports per step.
    private(set) var workers: Int
    /// Bytes a worker sends per step in theory with `workers`: the mean over ranks, and each rank's own figure.
    private(set) var theory = 0.0, theoryPerRank = [Double](), uncompressed = [Int]()
    let plan: [Range<Int>]
    let perEpoch: Int, epochs: Int, forwardMACs: Int
    private(set) var completed: Int
    private(set) var stopAfter: Int
    private(set) var stopRequest: String?
    private var pending = [Int: [StepReport]]()
    private(set) var traffic: [RankTraffic]
    private var testAccuracies = [Double]()
    private let start = ContinuousClock.now
    private var windowImages = 0, windowStart = ContinuousClock.now, lossSum = 0.0, correct = 0, images = 0

    init(options: CoordinatorOptions, plan: [Range<Int>], startStep: Int, forwardMACs: Int, metrics: MetricsSink?) {
        let n = options.workers, config = options.config
        self.options = options; self.metrics = metrics; self.forwardMACs = forwardMACs; self.plan = plan
        workers = n
        perEpoch = config.stepsPerEpoch(trainingRecords: options.trainingRecords, workers: n)
        epochs = (config.totalSteps + perEpoch - 1) / perEpoch
        completed = startStep
        stopAfter = config.totalSteps
        traffic = Array(repeating: RankTraffic(), count: n)
        expected = Self.traffic(options, plan: plan, workers: n)
        setTheory()
    }

    /// The theory of `workers` workers; `theory`, `theoryPerRank` and `uncompressed` are its figures.
    private var expected: TrafficTheory

    private static func traffic(_ options: CoordinatorOptions, plan: [Range<Int>], workers: Int) -> TrafficTheory {
        TrafficTheory(plan: plan, workers: workers, algorithm: options.algorithm, compression: options.compression, chunkBytes: options.chunkBytes)
    }

    private func setTheory() {
        expected = Self.traffic(options, plan: plan, workers: workers)
        theory = expected.bytesSent
        theoryPerRank = (0..<workers).map { expected.bytesSent(rank: $0) }
        uncompressed = (0..<workers).map { expected.uncompressedBytesSent(rank: $0) }
    }

    /// Rank `rank`'s theory at `step`: `theoryPerRank`, but during DGC's sparsity warm-up that step's top-k.
    private func theory(rank: Int, step: Int) -> Double {
        let atStep = expected.at(step: step, dgc: dgc)
        return atStep.compression == expected.compression ? theoryPerRank[rank] : atStep.bytesSent(rank: rank)
    }
    private lazy var dgc = options.config.dgcOptions

    /// Seconds since training began.
    var elapsed: Double { seconds(ContinuousClock.now - start) }

    /// An elastic run goes on with `workers` from step `fromStep`: a step before it that some rank
    /// had not reported when it was halted (it completed on the others) is written with the reports
    /// there are; reports of abandoned steps are dropped.
    func reform(workers n: Int, fromStep: Int) {
        while completed < fromStep { complete((pending.removeValue(forKey: completed) ?? []).sorted { $0.rank < $1.rank }) }
        pending = [:]
        workers = n
        if traffic.count < n { traffic += Array(repeating: RankTraffic(), count: n - traffic.count) }  // joiners beyond the first ranks
        setTheory()
    }

    var isComplete: Bool { completed >= stopAfter }

    /// The step to stop after: two past the furthest report.
    func requestStop(_ reason: String) -> Int {
        stopRequest = reason
        let furthest = max(completed, (pending.keys.max() ?? -1) + 1)
        stopAfter = min(furthest + 2, options.config.totalSteps)
        return stopAfter
    }

    func add(_ report: StepReport) {
        pending[report.step, default: []].append(report)
        while let reports = pending[completed], reports.count == workers {
            pending[completed] = nil
            complete(reports.sorted { $0.rank < $1.rank })
        }
    }

    private func complete(_ reports: [StepReport]) {
        for r in reports { record(r) }
        completed += 1
        let evaluated = reports.compactMap { r in r.testImages.map { (r.testCorrect ?? 0, $0) } }
        if evaluated.count == workers {
            let images = evaluated.reduce(0) { $0 + $1.1 }, right = evaluated.reduce(0) { $0 + $1.0 }
            let accuracy = Double(right) / Double(max(images, 1))
            metrics?.record(ClusterTestMetrics(step: completed - 1, epoch: reports[0].epoch, testAccuracy: accuracy, testImages: images,
                                               elapsedSeconds: (ContinuousClock.now - start) / .seconds(1),
                                               trainMacs: trainingMACs(steps: completed, batchSize: options.config.batchSize, forwardMACs: forwardMACs)))
            testAccuracies.append(accuracy)
            if !options.quiet { display.line(String(format: "epoch %d: test accuracy %.2f%% (%d images)", reports[0].epoch + 1, 100 * accuracy, images)) }
        }
        if !options.quiet { show(reports) }
    }

    private func record(_ r: StepReport) {
        metrics?.record(WorkerStepMetrics(
            step: r.step, epoch: r.epoch, rank: r.rank, worldSize: workers, loss: r.loss,
            accuracy: Double(r.correct) / Double(max(r.images, 1)), images: r.images, learningRate: r.learningRate,
            allreduceBytesSent: r.allreduceBytesSent, allreduceBytesReceived: r.allreduceBytesReceived,
            theoryBytesSent: theory(rank: r.rank, step: r.step), denseBytesSent: uncompressed[r.rank],
            compressionRatio: Double(uncompressed[r.rank]) / Double(max(r.allreduceBytesSent, 1)), controlBytes: r.controlBytes,
            allreduceSeconds: r.allreduceSeconds, computeSeconds: r.computeSeconds, stepSeconds: r.stepSeconds,
            dataWaitSeconds: r.dataWaitSeconds))
        traffic[r.rank].steps += 1
        traffic[r.rank].theoryBytesSent += theory(rank: r.rank, step: r.step)
        traffic[r.rank].bytesSent += r.allreduceBytesSent
        traffic[r.rank].bytesReceived += r.allreduceBytesReceived
        traffic[r.rank].controlBytes += r.controlBytes
        traffic[r.rank].allreduceSeconds += r.allreduceSeconds
        traffic[r.rank].computeSeconds += r.computeSeconds
        traffic[r.rank].stepSeconds += r.stepSeconds
        lossSum += Double(r.loss) * Double(r.images); correct += r.correct; images += r.images
        windowImages += r.images
    }

    private func show(_ reports: [StepReport]) {
        let config = options.config, n = workers
        let elapsed = seconds(ContinuousClock.now - windowStart)
        let rate = Double(windowImages) / max(elapsed, 1e-9)
        let sent = Double(reports.reduce(0) { $0 + $1.allreduceBytesSent }) / Double(n)
        let epoch = (completed - 1) / perEpoch
        let done = completed - epoch * perEpoch, total = min(perEpoch, config.totalSteps - epoch * perEpoch)
        display.update(epoch: epoch, epochs: epochs, done: done, total: total, loss: lossSum / Double(max(images, 1)),
                       accuracy: Double(correct) / Double(max(images, 1)), imagesPerSecond: rate,
                       etaSeconds: Double(config.totalSteps - completed) * Double(config.batchSize) / max(rate, 1e-9),
                       extra: "sent/worker/step \(megabytes(sent)) (theory \(megabytes(expected.at(step: completed - 1, dgc: dgc).bytesSent)))")
        if done == total { lossSum = 0; correct = 0; images = 0; windowImages = 0; windowStart = ContinuousClock.now }
    }

    func summary(startStep: Int, stop: StopToken) -> ClusterSummary {
        let total = seconds(ContinuousClock.now - start)
        // With DGC's sparsity warm-up the theory changes from step to step: the mean over the steps run.
        let warm = (dgc?.warmupEpochs ?? 0) > 0
        let perRank = !warm ? theoryPerRank : traffic.indices.map { r in
            traffic[r].steps > 0 ? traffic[r].theoryBytesSent / Double(traffic[r].steps) : (theoryPerRank.indices.contains(r) ? theoryPerRank[r] : 0)
        }
        return ClusterSummary(steps: completed - startStep, seconds: total,
                              imagesPerSecond: Double((completed - startStep) * options.config.batchSize) / max(total, 1e-9),
                              perRank: traffic, theoryBytesPerWorker: warm ? perRank.reduce(0, +) / Double(max(perRank.count, 1)) : theory,
                              theoryBytesPerRank: perRank, hubBytesSent: 0, hubBytesReceived: 0,
                              testAccuracy: testAccuracies.last, interruptedBy: stopRequest != nil ? stop.signal : nil,
                              finalStep: completed, stoppedEarly: completed < options.config.totalSteps ? stopRequest : nil)
    }
}

/// The star hub's reduce loop, on its own thread so the coordinator keeps watching the control plane.
final class HubThread: @unchecked Sendable {
    // @unchecked Sendable: the hub is used only by the thread; `isCancelled` and `error` are guarded by `lock`.
    private let done = DispatchSemaphore(value: 0)
    private let lock = NSLock()
    private var isCancelled = false
    private var error: Error?

    init(hub transport: any DataPlaneTransport, options: CollectiveOptions, compression: GradientCompression,
         plan: [Range<Int>], steps: Range<Int>, tracer: Tracer?) {
        let reduce = HubReduce(makeHubReduce(transport, options: options, compression: compression, tracer: tracer))
        Thread {
            // A cancelled loop (its membership epoch halted, or the run aborted) leaves the timeline to the next.
            defer { if !self.lock.withLock({ self.isCancelled }) { tracer?.endRecording() }; self.done.signal() }
            for step in steps {
                tracer?.beginStep(step)
                for (k, range) in plan.enumerated() {
                    if self.lock.withLock({ self.isCancelled }) { return }
                    do {
                        try traced(tracer, .allReduce, "allreduce", "all-reduce bucket \(k)",
                                   ["step": step, "bucket": k, "bytes": range.count * MemoryLayout<Float>.size]) {
                            try reduce.call(range, CollectiveTag(step: UInt32(step), bucket: UInt32(k)))
                        }
                    } catch {
                        // Cancelled (the run is over or failed elsewhere), or the hub's own failure to report.
                        self.lock.withLock { if !self.isCancelled { self.error = error } }
                        return
                    }
                }
            }
        }.start()
    }

    /// Why the hub stopped early, if it failed on its own.
    var failure: Error? { lock.withLock { error } }
    /// Waits for the loop to end; returns at once once it has (any number of calls).
    func join() { done.wait(); done.signal() }
    func cancel() { lock.withLock { isCancelled = true } }
}

/// Hands the hub's reduce to its thread.
private final class HubReduce: @unchecked Sendable {
    // @unchecked Sendable: moved to the hub thread at its start and used only there.
    let call: (Range<Int>, CollectiveTag) throws -> Void
    init(_ call: @escaping (Range<Int>, CollectiveTag) throws -> Void) { self.call = call }
}

/// The hub's reduce for a transport of any type (the collectives are generic over it).
private func makeHubReduce<T: Transport>(_ transport: T, options: CollectiveOptions, compression: GradientCompression, tracer: Tracer?)
    -> (Range<Int>, CollectiveTag) throws -> Void {
    let hub = StarAllReduceHub(transport: transport, options: options, compression: compression)
    hub.tracer = tracer
    return { try hub.reduce(range: $0, tag: $1) }
}

func seconds(_ d: Duration) -> Double { Double(d.components.seconds) + Double(d.components.attoseconds) * 1e-18 }

/// Bytes as "2.91 MB" (10⁶ bytes).
public func megabytes(_ bytes: Double) -> String { String(format: "%.2f MB", bytes / 1e6) }
