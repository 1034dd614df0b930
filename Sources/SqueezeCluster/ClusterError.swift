// What every part of the cluster shares: its error and its clock.

public struct ClusterError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// Time as the cluster's protocol sees it (silence, heartbeats, rendezvous deadlines). Tests
/// inject a clock they advance by hand, so no test waits for a timeout to pass.
public protocol ClusterClock: Sendable {
    var now: ContinuousClock.Instant { get }
}

public struct SystemClock: ClusterClock {
    public init() {}
    public var now: ContinuousClock.Instant { .now }
}
