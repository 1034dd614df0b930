// Who trains in an elastic run, and from which step (issue 29): a value type the coordinator drives
// with what it learns (a loss, a survivor's position, a joiner), which answers with what to do next.

/// A worker of an elastic run by a stable identity: the order in which the coordinator admitted it
/// (0, 1, 2, …, never reused). Its rank is its place among the current members, so it changes when a
/// member before it leaves.
public struct MemberID: Hashable, Comparable, Codable, Sendable, CustomStringConvertible {
    public let value: Int
    public init(_ value: Int) { self.value = value }
    public static func < (a: Self, b: Self) -> Bool { a.value < b.value }
    public var description: String { "member #\(value)" }
}

/// A membership epoch: which members train, in rank order (`members[r]` holds rank r), from which step.
public struct MembershipEpoch: Codable, Equatable, Sendable {
    /// 0 for the members the run started with, one more at each change.
    public var number: Int
    /// The first step (0-based, over the whole run) these members train.
    public var fromStep: Int
    public var members: [MemberID]
    public var worldSize: Int { members.count }
    public func rank(of member: MemberID) -> Int? { members.firstIndex(of: member) }
}

/// A member that left the run: which rank it held, in which membership epoch, how many steps the run
/// had completed, and why (its connections dropped, its process exited, it fell silent).
public struct Departure: Codable, Equatable, Sendable, CustomStringConvertible {
    public var member: MemberID
    public var rank: Int
    public var epoch: Int
    public var completedSteps: Int
    public var reason: String
    public var description: String { "rank \(rank) (\(member), \(reason)) after step \(completedSteps)" }
}

public struct MembershipError: Error, CustomStringConvertible, Equatable, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// `--min-workers` and `--max-workers`.
public struct MembershipRules: Equatable, Sendable {
    public let minWorkers: Int
    public let maxWorkers: Int

    /// Throws unless 1 ≤ minWorkers ≤ maxWorkers ≤ globalBatch (every worker needs an image per step).
    public init(minWorkers: Int = 1, maxWorkers: Int, globalBatch: Int) throws {
        guard minWorkers >= 1 else { throw MembershipError("--min-workers \(minWorkers): a run needs at least 1 worker") }
        guard maxWorkers >= minWorkers else {
            throw MembershipError("--max-workers \(maxWorkers) is below --min-workers \(minWorkers); raise --max-workers or lower --min-workers")
        }
        guard maxWorkers <= globalBatch else {
            throw MembershipError("--max-workers \(maxWorkers) is more than --batch-size \(globalBatch) (the global batch): "
                                  + "every worker needs at least one image per step; lower --max-workers")
        }
        self.minWorkers = minWorkers; self.maxWorkers = maxWorkers
    }
}

/// What the coordinator does next after a change of members.
public enum Reconfiguration: Equatable, Sendable {
    /// Train on with `epoch`'s members from `epoch.fromStep`. First `donor`, a member holding the state
    /// of that step, sends it to each of `receivers`: the joiners, and survivors one step behind (whose
    /// all-reduce of the step in flight was discarded, as the ones ahead of them had it complete).
    case reform(epoch: MembershipEpoch, donor: MemberID, receivers: [MemberID])
    /// Fewer than `--min-workers` remain: `checkpoint`'s member, if any survived, writes the checkpoint
    /// of its step, then the run stops with `error` (which names the lost ranks).
    case stop(error: MembershipError, checkpoint: (member: MemberID, step: Int)?)

    public static func == (a: Self, b: Self) -> Bool {
        switch (a, b) {
        case let (.reform(e1, d1, r1), .reform(e2, d2, r2)): return e1 == e2 && d1 == d2 && r1 == r2
        case let (.stop(e1, c1), .stop(e2, c2)): return e1 == e2 && c1?.member == c2?.member && c1?.step == c2?.step
        default: return false
        }
    }
}

/// The members of an elastic run and their history.
///
/// - A loss (`lose`) removes the member at once; the survivors keep their order and are renumbered
///   densely. The step in flight is abandoned: each survivor says how many steps it completed
///   (`report`). After each all-reduce every rank holds the same state, and a rank completes a step
///   only once every rank has sent its part, so survivors are at most one step apart: the run goes on
///   from the furthest (nothing completed is lost), the ones behind receiving its state.
/// - A joiner (`requestJoin`) waits until it is ready (`joinerIsReady`: its model built and checked),
///   then is admitted with the highest ranks at the end of a recovery: one that a loss began, or one
///   the coordinator begins for it (`beginAdmission`).
/// - Below `minWorkers` the run stops, naming every lost rank; at most `maxWorkers` members and
///   waiting joiners together.
/// - A lost member never comes back under its identity (one that hung and wakes up is refused,
///   `departure(of:)` says why); it may join again as a new member.
public struct Membership: Sendable {
    public enum Phase: Equatable, Sendable {
        case training
        /// A member was lost: waiting for these survivors' positions (`report`).
        case recovering(awaiting: [MemberID])
        case stopped(MembershipError)
    }

    public let rules: MembershipRules
    /// Every membership epoch so far; the last is the current one (during a recovery: the one that was training).
    public private(set) var epochs: [MembershipEpoch]
    /// Joiners waiting for the next step boundary, in the order they asked.
    public private(set) var waiting = [MemberID]()
    /// The waiting joiners that are ready to train (admitted at the next recovery's end).
    private var ready = Set<MemberID>()
    public private(set) var departures = [Departure]()
    /// During a recovery: the members still in the run, in rank order, and the positions they reported.
    private var survivors: [MemberID]?
    private var positions = [MemberID: Int]()
    private var stopped: MembershipError?
    private var nextID: Int

    /// `workers` members (#0 … #workers−1, rank r for #r) from `startStep`.
    public init(rules: MembershipRules, workers: Int, startStep: Int = 0) throws {
        guard (rules.minWorkers...rules.maxWorkers).contains(workers) else {
            throw MembershipError("--workers \(workers) is outside --min-workers \(rules.minWorkers) … --max-workers \(rules.maxWorkers)")
        }
        self.rules = rules
        epochs = [MembershipEpoch(number: 0, fromStep: startStep, members: (0..<workers).map(MemberID.init))]
        nextID = workers
    }

    public var current: MembershipEpoch { epochs[epochs.count - 1] }

    public var phase: Phase {
        if let stopped { return .stopped(stopped) }
        if let survivors { return .recovering(awaiting: survivors.filter { positions[$0] == nil }) }
        return .training
    }

    /// Why `member` is no longer in the run, if it was lost.
    public func departure(of member: MemberID) -> Departure? { departures.last { $0.member == member } }

    /// `member` died or hung (`reason` says which) after the run completed `completedSteps` steps (the
    /// coordinator's count: every member reported them). Starts (or widens) a recovery; returns what to
    /// do once no survivor's position is awaited any more, else nil (then `report` each survivor's). A
    /// waiting joiner that is lost is only withdrawn; a member already lost is ignored.
    @discardableResult
    public mutating func lose(_ member: MemberID, completedSteps: Int, reason: String) -> Reconfiguration? {
        guard stopped == nil else { return nil }
        if waiting.contains(member) { withdraw(member); return nil }
        let alive = survivors ?? current.members
        guard alive.contains(member), let rank = current.rank(of: member) else { return nil }
        departures.append(Departure(member: member, rank: rank, epoch: current.number, completedSteps: completedSteps, reason: reason))
        survivors = alive.filter { $0 != member }
        positions[member] = nil
        return phase == .recovering(awaiting: []) ? resolve() : nil
    }

    /// Survivor `member` abandoned the step in flight with `completedSteps` steps done (nothing of the
    /// abandoned step applied). Throws, changing nothing, for a peer whose position is not awaited
    /// (naming why) or a position before the current epoch's first step.
    public mutating func report(_ member: MemberID, completedSteps: Int) throws -> Reconfiguration? {
        guard case .recovering(let awaiting) = phase, awaiting.contains(member) else {
            if let gone = departure(of: member) { throw MembershipError("\(member) is no longer in the run: it was lost as \(gone)") }
            throw MembershipError("\(member) reported its position, but none was asked of it")
        }
        guard completedSteps >= current.fromStep else {
            throw MembershipError("\(member) says it completed \(completedSteps) steps, fewer than the \(current.fromStep) its members started from")
        }
        positions[member] = completedSteps
        return awaiting.count == 1 ? resolve() : nil
    }

    /// Members and the joiners already waiting.
    private var taken: Int { (survivors ?? current.members).count + waiting.count }

    /// Members and waiting joiners fill `--max-workers`: a joiner asking now would be refused.
    public var isFull: Bool { taken >= rules.maxWorkers }

    /// A worker asks to join: its new identity, admitted at the next boundary. Refused once stopped and
    /// when the members and the joiners already waiting reach `maxWorkers`.
    public mutating func requestJoin() throws -> MemberID {
        if let stopped { throw MembershipError("the run is stopping (\(stopped)); it admits no one") }
        let count = taken
        guard !isFull else {
            throw MembershipError("the run already has \(count) worker(s)" + (waiting.isEmpty ? "" : " (\(waiting.count) of them waiting to join)")
                                  + ", its --max-workers \(rules.maxWorkers)")
        }
        let id = MemberID(nextID)
        nextID += 1
        waiting.append(id)
        return id
    }

    /// A waiting joiner leaves before it is admitted (it was refused, or it went away).
    public mutating func withdraw(_ joiner: MemberID) {
        waiting.removeAll { $0 == joiner }
        ready.remove(joiner)
    }

    /// A waiting joiner has built and checked its model: the next recovery admits it.
    public mutating func joinerIsReady(_ joiner: MemberID) { if waiting.contains(joiner) { ready.insert(joiner) } }

    /// The waiting joiners that are ready, in the order they asked.
    public var readyJoiners: [MemberID] { waiting.filter(ready.contains) }

    /// The waiting joiners are ready to be admitted while the members train: every member abandons the
    /// step in flight and reports its position (`report`), as after a loss, and the recovery that
    /// follows admits the joiners (the ones behind the furthest receive its state with them).
    public mutating func beginAdmission() throws {
        guard phase == .training else { throw MembershipError("joiners are admitted while training, not now (\(phase))") }
        guard !readyJoiners.isEmpty else { throw MembershipError("no joiner is ready to be admitted") }
        survivors = current.members
        positions = [:]
    }

    /// Every survivor has reported: go on from the furthest position with the survivors and the waiting
    /// joiners, or stop (none survived, below the minimum, or survivors more than a step apart).
    private mutating func resolve() -> Reconfiguration {
        let alive = survivors ?? [], at = alive.map { positions[$0]! }
        survivors = nil
        positions = [:]
        guard let furthest = at.max() else {
            return stop("every worker was lost (\(departures.map(\.description).joined(separator: "; "))); "
                        + "the run stops, and resumes from its last checkpoint on disk", checkpoint: nil)
        }
        let donor = alive[at.firstIndex(of: furthest)!]
        if let lagging = at.firstIndex(where: { $0 < furthest - 1 }) {
            return stop("\(alive[lagging]) completed \(at[lagging]) steps and \(donor) \(furthest): survivors cannot be more than "
                        + "one step apart, so their states cannot be reconciled", checkpoint: (donor, furthest))
        }
        let joiners = readyJoiners
        guard alive.count + joiners.count >= rules.minWorkers else {
            return stop("\(alive.count) worker(s) remain" + (joiners.isEmpty ? "" : " and \(joiners.count) are ready to join")
                        + ", below --min-workers \(rules.minWorkers); lost: " + departures.map(\.description).joined(separator: "; "),
                        checkpoint: (donor, furthest))
        }
        waiting.removeAll(where: ready.contains)
        ready = []
        epochs.append(MembershipEpoch(number: current.number + 1, fromStep: furthest, members: alive + joiners))
        return .reform(epoch: current, donor: donor, receivers: zip(alive, at).filter { $0.1 < furthest }.map(\.0) + joiners)
    }

    private mutating func stop(_ message: String, checkpoint: (member: MemberID, step: Int)?) -> Reconfiguration {
        let error = MembershipError(message)
        stopped = error
        return .stop(error: error, checkpoint: checkpoint)
    }
}
