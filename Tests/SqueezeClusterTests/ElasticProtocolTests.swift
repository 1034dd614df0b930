import Foundation
import Testing
import SqueezeEngine
import SqueezeTraining
import SqueezeTransport
@testable import SqueezeCluster

/// An elastic run's joiners, the coordinator driven message by message (issue 29): admission at a
/// step boundary, the state's receivers and checksum in the reform, refusals that name the reason.
@Suite("Elastic joiners (in process, deterministic)")
struct ElasticProtocolTests {
    /// Two members training, up to three workers.
    func training() throws -> (Harness, [FakeWorker]) {
        let h = try Harness(workers: 2, steps: 100) { $0.elastic = true; $0.maxWorkers = 3 }
        let members = try h.join(2)
        for m in members { _ = try m.received() }
        return (h, members)
    }

    /// A joiner's `ready`: its model built and checked (no data plane yet).
    func ready(_ h: Harness, rank: Int = 0, parameterCount: Int? = nil, endpoint: String = "") -> ControlMessage {
        .ready(Ready(rank: rank, model: h.options.config.model, parameterCount: parameterCount ?? Network(config: h.options.config.model).parameters.count,
                     parametersChecksum: checksum(h.options.config), dataEndpoint: endpoint))
    }

    func halts(_ messages: [ControlMessage]) -> [Halt] { messages.compactMap { if case .halt(let h) = $0 { h } else { nil } } }
    func reforms(_ messages: [ControlMessage]) -> [Reform] { messages.compactMap { if case .reform(let r) = $0 { r } else { nil } } }

    @Test func aJoinerIsAdmittedAtTheNextStepBoundaryAndTheMembersBehindReceiveTheStateWithIt() throws {
        let (h, members) = try training()
        let joiner = h.worker()
        joiner.hello(rank: 1)  // a requested rank means nothing to a joiner
        try h.pump()
        guard case .welcome(let welcome)? = try joiner.received().first else { Issue.record("no welcome"); return }
        // The sampler's layout is the one of the run's first members: rank 0 of 2, until the reform.
        #expect(welcome.joining == true && welcome.elastic == true && welcome.rank == 0 && welcome.worldSize == 2)
        // Beyond --max-workers a joiner waits a moment for a place (a member's loss may not be seen yet), then is refused.
        let extra = h.worker()
        extra.hello()
        try h.pump()
        #expect(try extra.received().isEmpty)
        h.clock.advance(by: Coordinator.placeWait)
        try h.pump()
        #expect(reasons(try extra.received()) == ["the run already has 3 worker(s) (1 of them waiting to join), its --max-workers 3"])
        // Nothing changes while the joiner loads its data and builds its model.
        h.report(members[0], rank: 0, step: 0)
        h.report(members[1], rank: 1, step: 0)
        try h.pump()
        #expect(halts(try members[0].received()).isEmpty)
        #expect(h.coordinator.phase == .training)

        joiner.send(ready(h))
        try h.pump()
        #expect(h.coordinator.phase == .recovering)
        for m in members { #expect(halts(try m.received()).map(\.epoch) == [0]) }
        // Rank 1 completed step 1 before the halt reached it, rank 0 abandoned it: the run goes on from
        // step 2, and rank 0 receives rank 1's state with the joiner, checked against rank 1's checksum.
        members[0].send(.position(Position(rank: 0, completedSteps: 1, checksum: "state-1")))
        members[1].send(.position(Position(rank: 1, completedSteps: 2, checksum: "state-2")))
        try h.pump()
        #expect(h.coordinator.phase == .reforming)
        let all = members + [joiner]
        var salts = Set<String>()
        for (rank, worker) in all.enumerated() {
            let got = reforms(try worker.received())
            try #require(got.count == 1, "rank \(rank)")
            let r = got[0]
            #expect(r.epoch == 1 && r.step == 2 && r.rank == rank && r.worldSize == 3, "\(r)")
            #expect(r.receivers == [0, 2] && r.stateChecksum == "state-2", "\(r)")
            salts.insert(r.dataPlaneSalt ?? "none")
        }
        // One fresh salt for the new data plane: its frame counters start again, so its keys must be new.
        #expect(salts.count == 1 && salts.first != welcome.dataPlaneSalt && salts.first?.count == 64)
        for (rank, worker) in all.enumerated() { worker.send(ready(h, rank: rank, endpoint: "inproc://epoch1-rank\(rank)")) }
        try h.pump()
        #expect(h.coordinator.phase == .training)
        guard case .start(let start)? = try joiner.received().last else { Issue.record("no start for the joiner"); return }
        #expect(start.step == 2 && start.endpoints == (0..<3).map { "inproc://epoch1-rank\($0)" })
        let change = try #require(h.metrics.lines.first { $0.contains("\"event\":\"membership\"") })
        #expect(change.contains("\"world_size\":3") && change.contains("\"lost_ranks\":[]") && change.contains("\"joined_ranks\":[2]"), "\(change)")
        #expect(h.log.text.contains("membership epoch 1: 3 worker(s) from step 2 (lost: none; joined: rank 2 (test pid 1))"), "\(h.log.text)")
    }

    /// A scheduler's replacement that connects before the loss of the rank it replaces is seen waits for
    /// the place instead of being refused.
    @Test func aJoinerThatFindsTheRunFullGetsThePlaceOfAMemberLostMeanwhile() throws {
        let h = try Harness(workers: 2, steps: 100) { $0.elastic = true }
        let members = try h.join(2)
        for m in members { _ = try m.received() }
        let joiner = h.worker()
        joiner.hello()
        try h.pump()
        #expect(try joiner.received().isEmpty)
        members[1].send(.failure(Failure(rank: 1, step: 0, message: "killed")))
        try h.pump()
        guard case .welcome(let welcome)? = try joiner.received().first else { Issue.record("no welcome for the joiner"); return }
        #expect(welcome.joining == true)
        #expect(h.log.text.contains("asks to join the running run"), "\(h.log.text)")
    }

    @Test func aJoinerWithAnotherModelIsRefusedNamingTheDifferenceAndTheRunGoesOn() throws {
        let (h, members) = try training()
        let joiner = h.worker()
        joiner.hello()
        try h.pump()
        _ = try joiner.received()
        joiner.send(ready(h, parameterCount: 5))
        try h.pump()
        let count = Network(config: h.options.config.model).parameters.count
        #expect(reasons(try joiner.received()) == ["the joiner test pid 1 is refused: it has 5 parameters, the run \(count)"])
        #expect(h.coordinator.phase == .training)
        #expect(halts(try members[0].received()).isEmpty)
        // Its place is free again: another joiner is welcomed.
        let next = h.worker()
        next.hello()
        try h.pump()
        #expect(try next.received().contains { if case .welcome(let w) = $0 { w.joining == true } else { false } })
    }
}

/// Who sends the state to whom: along the topology's edges, from a rank that holds it or has received it.
@Suite struct StateTransferTests {
    @Test func receiversGetTheStateAlongTheRingAndTheTree() {
        // A ring of 5: joiners 3 and 4 after holders 0…2 (3 from 2, 4 from 3 once it has it); a survivor
        // behind at rank 0 gets it from rank 4, the last of the ring, after 4 has it.
        #expect(StateTransfer.sources(topology: .ring, worldSize: 5, receivers: [3, 4]) == [3: 2, 4: 3])
        #expect(StateTransfer.sources(topology: .ring, worldSize: 5, receivers: [0, 3, 4]) == [3: 2, 4: 3, 0: 4])
        // A tree of 6 (0 → 1, 2; 1 → 3, 4; 2 → 5): the root behind gets it from a child, a leaf from its parent.
        #expect(StateTransfer.sources(topology: .tree, worldSize: 6, receivers: [0, 5]) == [0: 1, 5: 2])
        #expect(StateTransfer.sources(topology: .tree, worldSize: 6, receivers: [1, 3, 4]) == [1: 0, 3: 1, 4: 1])
        // Nobody holds it: nobody can send it.
        #expect(StateTransfer.sources(topology: .ring, worldSize: 2, receivers: [0, 1]) == nil)
    }

    /// An elastic star's epoch with a state transfer: every worker keeps its link to the hub and gains its
    /// neighbours on a ring of the workers (the hub skipped), over which the state goes round; the hub's
    /// links are the star's.
    @Test func anElasticStarHandsTheStateRoundARingOfItsWorkers() {
        let topology = Topology.starAndRing(hub: 4)
        #expect(topology.outboundPeers(rank: 0, worldSize: 5) == [1, 4])
        #expect(topology.inboundPeers(rank: 0, worldSize: 5) == [3, 4])
        #expect(topology.outboundPeers(rank: 3, worldSize: 5) == [0, 4])
        #expect(topology.outboundPeers(rank: 4, worldSize: 5) == [0, 1, 2, 3])
        #expect(topology.inboundPeers(rank: 4, worldSize: 5) == [0, 1, 2, 3])
        #expect(Topology.starAndRing(hub: 1).outboundPeers(rank: 0, worldSize: 2) == [1])  // one worker: no ring
        // The transfer's own walk spans the workers only: a joiner at rank 3 gets the state from rank 2, not from the hub.
        #expect(StateTransfer.sources(topology: .ring, worldSize: 4, receivers: [3]) == [3: 2])
    }

    /// A ring of 3 over in-process transports: rank 1 holds the state of step 2; rank 2 (a joiner) gets it
    /// from rank 1 and passes it on to rank 0 (a survivor behind). Both receivers end with the holder's
    /// parameters and momentum and report the bytes they received, rank 2 too although it also sent them.
    @Test func aReceiverThatPassesTheStateOnStillCountsWhatItReceived() throws {
        var config = TrainingConfig()
        config.batchSize = 8
        config.totalSteps = 4
        let trainers = try (0..<3).map { _ in try Trainer(config: config, trainSet: try smallTrainingSet()) }
        let loader = trainers[1].makeLoader()
        for _ in 0..<2 { _ = try trainers[1].trainStep(try #require(loader.next())) }
        loader.stop()
        let agreed = stateChecksum(trainers[1])
        let transfer = StateTransfer(receivers: [0, 2], checksum: agreed, step: 2)
        let group = InProcessGroup(worldSize: 3)
        let ranks = TransferRanks(trainers)
        DispatchQueue.concurrentPerform(iterations: 3) { rank in
            let outcome = Result {
                try transfer.run(rank: rank, topology: .ring, workers: 3, transport: group[rank], trainer: ranks.trainers[rank],
                                 chunkBytes: 1 << 20, timeout: .seconds(30))
            }
            ranks.lock.withLock { ranks.outcomes[rank] = outcome }
        }
        let received = try ranks.outcomes.map { try #require(try $0?.get()) }
        #expect(received[1] == 0 && received[0] > 1_000_000 && received[2] == received[0], "\(received)")
        for t in trainers { #expect(stateChecksum(t) == agreed && t.step == 2) }
    }

    /// The crash on purpose the process tests use: parsed, or refused naming the variable and the form.
    @Test func anInjectedFaultIsParsedOrRefusedNamingTheVariable() throws {
        #expect(try InjectedFault.from(environment: [:]) == nil)
        #expect(try InjectedFault.from(environment: ["SQUEEZETRAIN_FAULT": "kill:1:6:backward"]) == InjectedFault(rank: 1, step: 6, phase: .backward))
        for bad in ["kill:1:6", "kill:x:6:forward", "kill:1:-2:forward", "stop:1:6:forward", "kill:1:6:optimizer"] {
            #expect(throws: ClusterError.self, "\(bad)") { try InjectedFault.from(environment: ["SQUEEZETRAIN_FAULT": bad]) }
            do { _ = try InjectedFault.from(environment: ["SQUEEZETRAIN_FAULT": bad]) } catch {
                #expect("\(error)".contains("SQUEEZETRAIN_FAULT=\(bad): expected kill:RANK:STEP:PHASE"), "\(error)")
            }
        }
    }

    @Test func aChunkHeaderRoundTripsAndAStrangersIsRefused() throws {
        let header = StateHeader(step: 41, total: 5_832_440, offset: 1 << 20)
        let decoded = try header.encoded.withUnsafeBytes { try StateHeader(decoding: $0, from: 1) }
        #expect(decoded == header)
        #expect(throws: CommError.self) { try [UInt8](repeating: 0, count: 32).withUnsafeBytes { try StateHeader(decoding: $0, from: 1) } }
    }
}

/// The flags of growing runs are refused before anything starts, naming the flag and the fix.
@Suite(.timeLimit(.minutes(10))) struct ElasticFlagTests {
    @Test(arguments: [
        (["launch", "--workers", "2", "--replace-workers", "1"], "--replace-workers needs --elastic"),
        (["launch", "--workers", "2", "--max-workers", "3"], "--max-workers 3 needs --elastic"),
        (["launch", "--workers", "3", "--batch-size", "24", "--elastic", "--max-workers", "2"], "--max-workers 2 is fewer than --workers 3"),
        (["launch", "--workers", "2", "--elastic", "--replace-workers=-1"], "--replace-workers must not be negative"),
        (["bench", "cluster", "--rejoin"], "--rejoin and --restart-all-every go with --kill-worker-at STEP"),
        (["bench", "cluster", "--workers", "1", "--batch-size", "8", "--kill-worker-at", "3"], "--kill-worker-at needs --workers 2 or more"),
        (["bench", "cluster", "--steps", "5", "--warmup", "0", "--kill-worker-at", "4"], "--kill-worker-at 4 must be a step before the last"),
    ])
    func growFlagsAreRefusedNamingTheFix(arguments: [String], message: String) throws {
        let output = try refusedBeforeStarting(arguments)
        #expect(output.contains(message), "\(arguments): \(output)")
    }
}

/// Trainers and outcomes shared with the rank threads of a state transfer; each rank uses its own entries.
final class TransferRanks: @unchecked Sendable {
    // @unchecked Sendable: a rank touches only its own trainer; `outcomes` is guarded by `lock`.
    let trainers: [Trainer]
    let lock = NSLock()
    var outcomes: [Result<Int, any Error>?]
    init(_ trainers: [Trainer]) { self.trainers = trainers; outcomes = Array(repeating: nil, count: trainers.count) }
}
