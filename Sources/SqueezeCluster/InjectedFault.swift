// A crash on purpose, for the tests of elastic membership (issue 29), at a chosen point of a step:
// `SQUEEZETRAIN_FAULT=kill:RANK:STEP:PHASE` makes the worker given rank RANK SIGKILL itself in step
// STEP: `forward` (as the step begins), `backward` (once backward has finished the first gradient
// bucket, the rest still computing) or `allreduce` (once the first bucket's all-reduce has
// completed, the others still to go).

import Foundation

public struct InjectedFault: Equatable, Sendable {
    public enum Phase: String, Sendable, CaseIterable { case forward, backward, allreduce }
    public static let variable = "SQUEEZETRAIN_FAULT"
    public var rank: Int, step: Int, phase: Phase

    public init(rank: Int, step: Int, phase: Phase) { self.rank = rank; self.step = step; self.phase = phase }

    /// The fault `environment` asks for (nil: none); a value that does not parse is an error naming it.
    public static func from(environment: [String: String] = ProcessInfo.processInfo.environment) throws -> InjectedFault? {
        guard let value = environment[variable] else { return nil }
        let parts = value.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        guard parts.count == 4, parts[0] == "kill", let rank = Int(parts[1]), rank >= 0, let step = Int(parts[2]), step >= 0,
              let phase = Phase(rawValue: parts[3]) else {
            throw ClusterError("\(variable)=\(value): expected kill:RANK:STEP:PHASE with PHASE one of "
                               + Phase.allCases.map(\.rawValue).joined(separator: ", ") + " (a crash on purpose, for tests)")
        }
        return InjectedFault(rank: rank, step: step, phase: phase)
    }

    /// SIGKILLs this process (no cleanup: as a crash or the OOM killer would) when it is at `phase` of `step`.
    public func strike(step: Int, phase: Phase) {
        guard step == self.step && phase == self.phase else { return }
        kill(getpid(), SIGKILL)
    }
}
