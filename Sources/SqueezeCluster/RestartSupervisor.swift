// `launch --max-restarts`: runs attempts of a local cluster until one ends without a failure,
// restarting every process from the newest checkpoint after a failure, at most a given number of times.

import Foundation
import SqueezeTraining

/// Decides and records restarts. An attempt's processes report their `ClusterEvent`s through
/// `handle` (the newest checkpoint; all workers ready again); SIGINT/SIGTERM of the launcher go
/// through `terminate`, which stops the current attempt and any restart.
public final class RestartSupervisor: @unchecked Sendable {
    // @unchecked Sendable: every mutable field is guarded by `lock`.
    public let maxRestarts: Int
    private let metricsPath: String?
    private let log: @Sendable (String) -> Void
    private let lock = NSLock()
    private var group: ProcessGroup?
    private var stop = false
    /// The restart to record once the restarted cluster is ready, and when its failure was seen.
    private var pending: (event: RestartEvent, failedAt: Date)?
    private var checkpointStep: Int?

    /// `metricsPath` (absolute) gets a `RestartEvent` line once a restarted cluster is training again.
    public init(maxRestarts: Int, metricsPath: String?, log: @escaping @Sendable (String) -> Void) {
        self.maxRestarts = maxRestarts; self.metricsPath = metricsPath; self.log = log
    }

    /// Runs `attempt(n)` (n = 0, 1, ...: start attempt n's processes, wait for them, return how they
    /// ended) until an attempt does not fail, a failure finds no restart left, or a signal stopped the
    /// run; returns that attempt's outcome.
    public func run(_ attempt: (Int) throws -> ProcessGroup.Outcome) rethrows -> ProcessGroup.Outcome {
        var restarts = 0
        while true {
            let outcome = try attempt(restarts)
            guard case .failed(let culprit, let description) = outcome, restarts < maxRestarts, !stopped else { return outcome }
            restarts += 1
            let failedAt = Date()
            let lastStep = metricsPath.flatMap(lastReportedStep)
            let resumeStep = lastCheckpoint ?? 0
            log("[launch] \(description); restart \(restarts) of \(maxRestarts): every process restarts from the checkpoint at step \(resumeStep)"
                + (lastStep.map { " (the run had reached step \($0))" } ?? "") + "\n")
            let event = RestartEvent(restart: restarts, process: culprit, reason: description, failedStep: lastStep ?? -1,
                                     resumeStep: resumeStep, recoverySeconds: 0)
            lock.withLock { pending = (event, failedAt) }
        }
    }

    /// The process group of the current attempt (for `terminate`).
    public func started(_ g: ProcessGroup) { lock.withLock { group = g } }
    /// Whether a signal has stopped the run.
    public var stopped: Bool { lock.withLock { stop } }
    /// The newest step a checkpoint holds: where an attempt started (a resume), or what rank 0 wrote since.
    public var lastCheckpoint: Int? { lock.withLock { checkpointStep } }

    /// Stops the run: the current attempt's processes get `signal`, and no restart follows.
    public func terminate(_ signal: Int32) {
        let g = lock.withLock { stop = true; return group }
        g?.terminate(signal: signal)
    }

    /// Takes an event of the current attempt's processes.
    public func handle(_ event: ClusterEvent) {
        switch event.event {
        case .ready:
            let restart = lock.withLock {
                if let s = event.step, s > 0 { checkpointStep = max(checkpointStep ?? 0, s) }
                defer { pending = nil }
                return pending
            }
            guard let restart, let metricsPath else { return }
            var line = restart.event
            line.recoverySeconds = Date().timeIntervalSince(restart.failedAt)
            (try? MetricsWriter(path: metricsPath, append: true))?.record(line)
        case .checkpoint:
            lock.withLock { if let s = event.step { checkpointStep = max(checkpointStep ?? 0, s) } }
        case .listening, .joining, .membership:
            break
        }
    }
}

/// The highest `step` among the per-worker lines of a metrics file.
func lastReportedStep(in path: String) -> Int? {
    guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
    let decoder = JSONDecoder()
    return text.split(separator: "\n").compactMap { line -> Int? in
        guard let header = try? decoder.decode(MetricsLineHeader.self, from: Data(line.utf8)), header.rank != nil else { return nil }
        return header.step
    }.max()
}

/// Routes SIGINT and SIGTERM of this (launcher) process to `handler` on a background queue.
public final class SignalForwarder: @unchecked Sendable {
    // @unchecked Sendable: the sources are only touched at init.
    private var sources = [DispatchSourceSignal]()

    public init(_ handler: @escaping @Sendable (Int32) -> Void) {
        for sig in [SIGINT, SIGTERM] {
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler { handler(sig) }
            source.resume()
            sources.append(source)
        }
    }
}
