// The all-reduce algorithms by name, and the factory that builds a worker's reducer from one.

import SqueezeSystem
import SqueezeTransport

/// Which all-reduce the workers use. On the wire (`Welcome`) its raw value: a build that does not know
/// a value (one older than `tree`) refuses the welcome naming it, so no version bump was needed for it.
public enum AllReduceAlgorithm: String, Codable, Sendable, CaseIterable {
    /// Reduce-scatter then all-gather around a ring of workers (bandwidth-optimal).
    case ring
    /// Every worker sends its gradient to the coordinator, which averages and sends it back.
    case star
    /// Partial sums up a binary tree of workers rooted at rank 0, the average back down (FireCaffe's
    /// reduction tree). Not with topk compression.
    case tree

    /// The data plane's shape for `workers` workers (a star's hub, the coordinator, is rank `workers`).
    public func topology(workers: Int) -> Topology {
        switch self {
        case .ring: .ring
        case .star: .star(hub: workers)
        case .tree: .tree
        }
    }

    /// Ranks of the data plane: the workers, plus the hub for a star.
    public func groupSize(workers: Int) -> Int { self == .star ? workers + 1 : workers }

    /// Why this algorithm cannot run with `compression`, or nil.
    public func unsupported(_ compression: GradientCompression) -> UnsupportedCompression? {
        if self == .tree, case .topk = compression {
            return UnsupportedCompression(algorithm: self, compression: compression, reason: "sparse partial sums grow on the way up the tree",
                                          alternatives: [.ring, .star], compressionKind: "top-k")
        }
        return nil
    }
}

/// An algorithm that cannot run with a compression: why, and which algorithms can. The command line
/// words it with its own flags.
public struct UnsupportedCompression: Error, CustomStringConvertible, Sendable, Equatable {
    public let algorithm: AllReduceAlgorithm
    public let compression: GradientCompression
    public let reason: String
    /// The algorithms that take this compression.
    public let alternatives: [AllReduceAlgorithm]
    /// The compression's family, as the alternatives take it ("top-k").
    public let compressionKind: String

    public var description: String {
        "the \(algorithm) all-reduce does not take \(compression) compression (\(reason)): use "
            + alternatives.map { "the \($0)" }.joined(separator: " or ")
    }
}

/// A worker's all-reduce over a transport of any type (the collectives are generic over it); a star's hub
/// is rank `hub`; `tracer` records its sends, receives and reduces.
public func makeAllReducer<T: Transport>(_ transport: T, algorithm: AllReduceAlgorithm, hub: Int, options: CollectiveOptions,
                                         compression: GradientCompression, tracer: Tracer? = nil) -> any AllReducer {
    switch algorithm {
    case .ring:
        let ring = RingAllReduce(transport: transport, options: options, compression: compression)
        ring.tracer = tracer
        return ring
    case .star:
        let star = StarAllReduceWorker(transport: transport, hub: hub, options: options, compression: compression)
        star.tracer = tracer
        return star
    case .tree:
        let tree = TreeAllReduce(transport: transport, options: options, compression: compression)
        tree.tracer = tracer
        return tree
    }
}
