// What a training process does besides training: SIGINT and SIGTERM as a stop request, the error of a
// run stopped before it could finish, its timeline written at the end, and numbers as its log writes them.

import Foundation
import SqueezeSystem

/// The run was stopped (a signal, a worker's request) before it began training, or, for a job
/// that writes nothing until it ends (`DeepCompression`), before it ended.
public struct Interrupted: Error, CustomStringConvertible, Sendable {
    public var reason: String
    public var signal: Int32?
    public init(reason: String, signal: Int32? = nil) { self.reason = reason; self.signal = signal }
    public var description: String { "stopped: \(reason)" }
    /// The exit status of a process that ends this way: 128 + the signal, 1 without one.
    public var exitCode: Int32 { signal.map { 128 + $0 } ?? 1 }
}

/// SIGINT and SIGTERM become a stop request: they are taken on a thread of their own (`sigwait`),
/// so that no other thread is ever interrupted by them (no handler runs in the middle of an
/// allocation, no call fails with EINTR). Call before starting other threads; they inherit the
/// blocked mask. A second SIGINT exits at once.
public func stopOnSignals() -> StopToken {
    let token = StopToken()
    var set = sigset_t()
    sigemptyset(&set)
    sigaddset(&set, SIGINT)
    sigaddset(&set, SIGTERM)
    pthread_sigmask(SIG_BLOCK, &set, nil)
    let blocked = set
    let waiter = Thread {
        var signals = blocked
        while true {
            var sig: Int32 = 0
            guard sigwait(&signals, &sig) == 0 else { continue }
            if sig == SIGINT && token.isRequested { _exit(130) }
            token.request(signal: sig)
        }
    }
    waiter.name = "signals"
    waiter.start()
    return token
}

/// Writes a run's timeline (also after a failure: what was recorded); a failed write is a warning, not the run's error.
public func writeTrace(_ tracer: Tracer?) {
    guard let tracer else { return }
    do {
        try tracer.write()
        emit("timeline written to \(tracer.path)\n")
    } catch {
        emit("warning: the timeline was not written: \(error)\n")
    }
}

/// 1234567 → "1,234,567"
public func grouped(_ n: Int) -> String {
    let digits = String(n.magnitude)
    var out = ""
    for (i, ch) in digits.enumerated() {
        if i > 0 && (digits.count - i) % 3 == 0 { out.append(",") }
        out.append(ch)
    }
    return n < 0 ? "-" + out : out
}
