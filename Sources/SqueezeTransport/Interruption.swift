// A prompt end to a blocked receive (issue 29): an elastic run abandons the step in flight when a
// member is lost, rather than waiting out --timeout for a peer that will never send.

import Foundation

/// Set from any thread; a transport that holds it ends a receive waiting on it within
/// `Interruption.pollInterval` (`CommError.interrupted`). Once set it stays set: a new data plane
/// gets a new one.
public final class Interruption: @unchecked Sendable {
    // @unchecked Sendable: `why` is guarded by `lock`.
    private let lock = NSLock()
    private var why: String?

    /// How often a blocked receive looks at the flag.
    public static let pollInterval = Duration.milliseconds(20)

    public init() {}

    public func interrupt(_ reason: String) { lock.withLock { if why == nil { why = reason } } }
    /// Why the receives were interrupted, or nil while they were not.
    public var reason: String? { lock.withLock { why } }
}
