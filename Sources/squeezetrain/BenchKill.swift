// `bench cluster --kill-worker-at STEP`: what losing a worker costs a running cluster (issue 29),
// with elastic membership (and a new worker joining, `--rejoin`) or restarting every process from
// the newest checkpoint (`--restart-all-every K`, as `launch --max-restarts` does).

import Foundation
import SqueezeCluster

/// What a kill cost, from the run's metrics lines as they were written.
struct KillFigures: Encodable {
    var killedAfterStep: Int
    /// The first step trained after the change (the elastic run's `from_step`, the restart's checkpoint step).
    var resumedFromStep: Int
    /// Steps whose lines were written before the kill and that were trained again.
    var stepsRedone: Int
    /// From the SIGKILL to the first step line written after the change of members (or the restart).
    var stallSeconds: Double
    /// `--rejoin`: from the new worker's start to the first step line of the epoch it joined.
    var joinerSeconds: Double?
}

/// Reads a metrics file as it grows, SIGKILLs a process once a step's lines are written, and times
/// what follows. Runs on a thread of its own, polling every 10 ms (the figures' resolution).
final class KillWatcher: @unchecked Sendable {
    // @unchecked Sendable: `figures`, `joinerStart`, `victim`, `ended` and `watching` are guarded by `lock`; the rest is the thread's.
    private let path: String, killAt: Int, rejoin: Bool
    private let lock = NSLock()
    private var figures: KillFigures?
    private var joinerStart: Date?
    private var victim: pid_t?
    private var ended = false, watching = false
    private let done = DispatchSemaphore(value: 0)
    private var offset: UInt64 = 0, partial = Data()
    /// Lines read so far: (when this watcher read it, the parsed line).
    private var lines = [(seen: Date, line: [String: Any])]()

    init(metrics path: String, killAt: Int, rejoin: Bool) {
        self.path = path; self.killAt = killAt; self.rejoin = rejoin
    }

    /// Starts watching; `pid` is the process to kill.
    func start(killing pid: pid_t) {
        lock.withLock { victim = pid; watching = true }
        Thread { self.watch(); self.done.signal() }.start()
    }

    /// The new worker was started now (the process group's "started joiner" line).
    func joinerStarted() { lock.withLock { if joinerStart == nil { joinerStart = Date() } } }

    /// Once the run has ended: what was measured (nil: the kill or the change never came).
    func result() -> KillFigures? {
        guard lock.withLock({ ended = true; return watching }) else { return nil }
        done.wait()
        return lock.withLock { figures }
    }

    private func watch() {
        /// Reads on until `found` finds a line (its index), or the run has ended and nothing more comes.
        func next(_ found: () -> Int?) -> Int? {
            while true {
                let last = lock.withLock { ended }
                read()
                if let i = found() { return i }
                if last { return nil }
                usleep(10_000)
            }
        }
        func step(_ l: [String: Any]) -> Int? { l["rank"] != nil ? l["step"] as? Int : nil }
        guard next({ lines.lastIndex { (step($0.line) ?? -1) >= killAt } }) != nil, let pid = lock.withLock({ victim }) else { return }
        let lastBefore = lines.compactMap { step($0.line) }.max()!
        kill(pid, SIGKILL)
        let killed = Date(), mark = lines.count
        func isChange(_ l: [String: Any]) -> Bool { ["membership", "restart"].contains(l["event"] as? String ?? "") }
        guard let change = next({ lines.indices.first { $0 >= mark && isChange(lines[$0].line) } }),
              let first = next({ lines.indices.first { $0 > change && step(lines[$0].line) != nil } }) else { return }
        let resumed = step(lines[first].line)!
        var result = KillFigures(killedAfterStep: lastBefore, resumedFromStep: resumed, stepsRedone: max(0, lastBefore + 1 - resumed),
                                 stallSeconds: lines[first].seen.timeIntervalSince(killed))
        // The joiner may have been admitted by the change itself (ready before the recovery ended), or later.
        if rejoin, let grown = next({ lines.indices.first { $0 >= change && (lines[$0].line["joined_ranks"] as? [Int])?.isEmpty == false } }),
           let trained = next({ lines.indices.first { $0 > grown && step(lines[$0].line) != nil } }), let started = lock.withLock({ joinerStart }) {
            result.joinerSeconds = lines[trained].seen.timeIntervalSince(started)
        }
        lock.withLock { figures = result }
    }

    /// Parses the lines appended since the last read.
    private func read() {
        guard let handle = FileHandle(forReadingAtPath: path) else { return }
        defer { try? handle.close() }
        try? handle.seek(toOffset: offset)
        let data = handle.readDataToEndOfFile()
        offset += UInt64(data.count)
        partial.append(data)
        let now = Date()
        while let end = partial.firstIndex(of: 10) {
            let line = partial[partial.startIndex..<end]
            partial = Data(partial[(end + 1)...])
            if let object = try? JSONSerialization.jsonObject(with: line) as? [String: Any] { lines.append((now, object)) }
        }
    }
}
