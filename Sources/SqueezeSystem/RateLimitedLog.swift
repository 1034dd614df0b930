// A log that writes at most one line per interval, whatever floods it.

import Foundation

/// Log lines at most once per `interval`; lines in between are counted and the count is added to
/// the next line that goes out. What a flood of hostile frames can make a process write is bounded.
public final class RateLimitedLog: @unchecked Sendable {
    // @unchecked Sendable: state guarded by `lock`; `write` must be safe to call from every thread
    // that calls `line` (a ZAP handler passes a @Sendable one, the coordinator uses its own thread only).
    private let lock = NSLock()
    private let interval: Duration
    private let write: (String) -> Void
    private var last: ContinuousClock.Instant?
    private var suppressed = 0

    public init(interval: Duration, _ write: @escaping (String) -> Void) {
        self.interval = interval; self.write = write
    }

    public func line(_ text: String) {
        let out = lock.withLock { () -> String? in
            let now = ContinuousClock.now
            if let last, now - last < interval { suppressed += 1; return nil }
            defer { last = now; suppressed = 0 }
            return suppressed > 0 ? "\(text) (\(suppressed) similar line(s) suppressed)" : text
        }
        if let out { write(out) }
    }
}
