import Testing
@testable import SqueezeCluster

/// The elastic membership state machine (issue 29), driven through losses, hangs, joins and refusals.
@Suite("Elastic membership")
struct MembershipTests {
    func ids(_ values: Int...) -> [MemberID] { values.map(MemberID.init) }

    func membership(_ workers: Int, min: Int = 1, max: Int = 8, startStep: Int = 0) throws -> Membership {
        try Membership(rules: try MembershipRules(minWorkers: min, maxWorkers: max, globalBatch: 64), workers: workers, startStep: startStep)
    }

    /// Reports every survivor's completed steps; returns the last report's answer (the others must be nil).
    func report(_ m: inout Membership, _ positions: [(Int, Int)]) throws -> Reconfiguration? {
        var answer: Reconfiguration?
        for (i, (member, steps)) in positions.enumerated() {
            answer = try m.report(MemberID(member), completedSteps: steps)
            #expect((answer == nil) == (i < positions.count - 1), "answer after \(i + 1) of \(positions.count) reports")
        }
        return answer
    }

    @Test func aLossRenumbersTheSurvivorsDenselyAndGoesOnFromTheirStep() throws {
        var m = try membership(4, startStep: 5)
        #expect(m.current == MembershipEpoch(number: 0, fromStep: 5, members: ids(0, 1, 2, 3)))
        #expect(m.lose(MemberID(1), completedSteps: 10, reason: "its connections dropped") == nil)
        #expect(m.phase == .recovering(awaiting: ids(0, 2, 3)))
        #expect(m.current.number == 0)  // the epoch that was training, until the survivors have answered
        // Nobody finished step 10 (0-based): it is discarded everywhere and trained again by three ranks.
        let answer = try report(&m, [(3, 10), (0, 10), (2, 10)])
        let epoch = MembershipEpoch(number: 1, fromStep: 10, members: ids(0, 2, 3))
        #expect(answer == .reform(epoch: epoch, donor: MemberID(0), receivers: []))
        #expect(m.phase == .training && m.current == epoch && m.epochs.count == 2)
        #expect(m.current.rank(of: MemberID(3)) == 2 && m.current.rank(of: MemberID(1)) == nil)
        #expect(m.departures == [Departure(member: MemberID(1), rank: 1, epoch: 0, completedSteps: 10, reason: "its connections dropped")])
    }

    /// A member dies in the all-gather of step 10: ranks that received everything completed it, the others
    /// abandoned it half-reduced. The run goes on from the furthest, whose state the others receive.
    @Test func survivorsBehindReceiveTheStateOfTheFurthest() throws {
        var m = try membership(4)
        m.lose(MemberID(0), completedSteps: 10, reason: "process exited")
        let answer = try report(&m, [(1, 10), (2, 11), (3, 11)])
        #expect(answer == .reform(epoch: MembershipEpoch(number: 1, fromStep: 11, members: ids(1, 2, 3)),
                                  donor: MemberID(2), receivers: ids(1)))
        // Two steps apart cannot happen (no rank completes a step before every rank sent its part): the run stops.
        var n = try membership(3)
        n.lose(MemberID(2), completedSteps: 7, reason: "process exited")
        guard case .stop(let error, let checkpoint)? = try report(&n, [(0, 7), (1, 9)]) else { Issue.record("no stop"); return }
        #expect(error.description.contains("member #0 completed 7 steps and member #1 9"), "\(error)")
        #expect(checkpoint?.member == MemberID(1) && checkpoint?.step == 9)
    }

    @Test func twoOfFourLostAtOnceAndOneDuringTheRecovery() throws {
        var m = try membership(4)
        m.lose(MemberID(1), completedSteps: 3, reason: "process exited")
        m.lose(MemberID(2), completedSteps: 3, reason: "process exited")
        #expect(m.phase == .recovering(awaiting: ids(0, 3)))
        #expect(try m.report(MemberID(0), completedSteps: 3) == nil)
        // The last survivor awaited is lost too, after the first reported: the recovery ends with rank 0 alone.
        let answer = m.lose(MemberID(3), completedSteps: 3, reason: "hung: no heartbeat for 10 s")
        #expect(answer == .reform(epoch: MembershipEpoch(number: 1, fromStep: 3, members: ids(0)), donor: MemberID(0), receivers: []))
        // The ranks each held in the epoch that was training.
        #expect(m.departures.map(\.rank) == [1, 2, 3] && m.departures.allSatisfy { $0.epoch == 0 })
    }

    /// A hung member is removed; when it wakes up, its reports are refused naming why, and it may only
    /// come back as a new member.
    @Test func aHungMemberThatWakesUpIsRefused() throws {
        var m = try membership(3)
        m.lose(MemberID(2), completedSteps: 4, reason: "hung: no heartbeat for 10 s")
        _ = try report(&m, [(0, 4), (1, 4)])
        let refused = #expect(throws: MembershipError.self) { try m.report(MemberID(2), completedSteps: 4) }
        #expect(refused?.description == "member #2 is no longer in the run: it was lost as rank 2 (member #2, hung: no heartbeat for 10 s) after step 4")
        #expect(m.lose(MemberID(2), completedSteps: 5, reason: "again") == nil && m.departures.count == 1)  // already gone: ignored
        #expect(try m.requestJoin() == MemberID(3))  // a new identity, never #2 again
        let stray = #expect(throws: MembershipError.self) { try m.report(MemberID(0), completedSteps: 4) }
        #expect(stray?.description.contains("none was asked of it") == true)
    }

    @Test func joinersAreAdmittedAtAStepBoundaryWithTheNextRanks() throws {
        var m = try membership(2, max: 4)
        let a = try m.requestJoin(), b = try m.requestJoin()
        #expect([a, b] == ids(2, 3) && m.waiting == ids(2, 3) && m.current.worldSize == 2)
        let full = #expect(throws: MembershipError.self) { try m.requestJoin() }
        #expect(full?.description == "the run already has 4 worker(s) (2 of them waiting to join), its --max-workers 4")
        m.withdraw(b)  // refused (another model) or gone before its admission
        let early = #expect(throws: MembershipError.self) { try m.beginAdmission() }  // still loading its data
        #expect(early?.description == "no joiner is ready to be admitted")
        m.joinerIsReady(a)
        m.joinerIsReady(b)  // withdrawn: ignored
        #expect(m.readyJoiners == [a])
        try m.beginAdmission()
        #expect(m.phase == .recovering(awaiting: ids(0, 1)) && m.current.number == 0)
        // Member #1 had completed step 6 when the members were halted, #0 abandoned it: both receive #1's state.
        let answer = try report(&m, [(0, 6), (1, 7)])
        #expect(answer == .reform(epoch: MembershipEpoch(number: 1, fromStep: 7, members: ids(0, 1, 2)), donor: MemberID(1), receivers: ids(0) + [a]))
        #expect(m.waiting.isEmpty && m.phase == .training && m.departures.isEmpty)
        let none = #expect(throws: MembershipError.self) { try m.beginAdmission() }
        #expect(none?.description == "no joiner is ready to be admitted")
    }

    /// Joiners ready when a member is lost are admitted when the recovery ends, and count towards the
    /// minimum; one still loading its data waits for the next change.
    @Test func aRecoveryAdmitsTheReadyJoiners() throws {
        var m = try membership(2, min: 2)
        let joiner = try m.requestJoin(), loading = try m.requestJoin()
        m.joinerIsReady(joiner)
        m.lose(MemberID(0), completedSteps: 20, reason: "process exited")
        let late = #expect(throws: MembershipError.self) { try m.beginAdmission() }
        #expect(late?.description.contains("not now") == true)
        let answer = try m.report(MemberID(1), completedSteps: 20)
        #expect(answer == .reform(epoch: MembershipEpoch(number: 1, fromStep: 20, members: [MemberID(1), joiner]),
                                  donor: MemberID(1), receivers: [joiner]))
        #expect(m.waiting == [loading] && m.readyJoiners.isEmpty)
    }

    @Test func belowTheMinimumTheRunCheckpointsAndStopsNamingTheLostRanks() throws {
        var m = try membership(4, min: 3)
        m.lose(MemberID(1), completedSteps: 8, reason: "process exited")
        _ = try report(&m, [(0, 8), (2, 9), (3, 9)])
        #expect(m.current.members == ids(0, 2, 3))
        m.lose(MemberID(3), completedSteps: 12, reason: "hung: no heartbeat for 10 s")  // rank 2 now
        guard case .stop(let error, let checkpoint)? = try report(&m, [(0, 12), (2, 12)]) else { Issue.record("no stop"); return }
        #expect(error.description == "2 worker(s) remain, below --min-workers 3; lost: rank 1 (member #1, process exited) after step 8; "
                + "rank 2 (member #3, hung: no heartbeat for 10 s) after step 12")
        #expect(checkpoint?.member == MemberID(0) && checkpoint?.step == 12)
        #expect(m.phase == .stopped(error))
        let closed = #expect(throws: MembershipError.self) { try m.requestJoin() }
        #expect(closed?.description.contains("admits no one") == true)
        #expect(m.lose(MemberID(0), completedSteps: 12, reason: "late") == nil && m.departures.count == 2)
    }

    @Test func losingEveryWorkerStopsWithoutACheckpoint() throws {
        var m = try membership(1)
        _ = try m.requestJoin()  // a joiner has no state to go on from
        guard case .stop(let error, let checkpoint)? = m.lose(MemberID(0), completedSteps: 2, reason: "process exited") else {
            Issue.record("no stop"); return
        }
        #expect(checkpoint == nil && error.description.contains("every worker was lost (rank 0 (member #0, process exited) after step 2)"))
    }

    @Test func rulesNameTheFlagToFix() throws {
        #expect(throws: MembershipError("--min-workers 0: a run needs at least 1 worker")) {
            try MembershipRules(minWorkers: 0, maxWorkers: 2, globalBatch: 8)
        }
        #expect(throws: MembershipError("--max-workers 2 is below --min-workers 3; raise --max-workers or lower --min-workers")) {
            try MembershipRules(minWorkers: 3, maxWorkers: 2, globalBatch: 8)
        }
        let batch = #expect(throws: MembershipError.self) { try MembershipRules(maxWorkers: 9, globalBatch: 8) }
        #expect(batch?.description.contains("--max-workers 9 is more than --batch-size 8") == true)
        let rules = try MembershipRules(minWorkers: 2, maxWorkers: 4, globalBatch: 8)
        #expect(throws: MembershipError("--workers 5 is outside --min-workers 2 … --max-workers 4")) { try Membership(rules: rules, workers: 5) }
        #expect(throws: MembershipError.self) { try Membership(rules: rules, workers: 1) }
    }
}
