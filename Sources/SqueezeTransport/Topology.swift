// Which ranks of a group exchange messages: a ring, a star around a hub, or a binary tree.

/// Which peers a rank sends to (and so must connect to).
public enum Topology: Sendable, Equatable {
    /// Rank r sends to r+1 mod N and receives from r−1 mod N.
    case ring
    /// Every other rank exchanges messages with `hub` only.
    case star(hub: Int)
    /// The binary reduction tree rooted at rank 0: a rank exchanges messages with its parent and
    /// its children (`treeParent`, `treeChildren`).
    case tree
    /// The star, and besides it a ring of the other ranks in rank order (the hub skipped): an elastic
    /// star's membership epoch, whose members hand the training state on from worker to worker.
    case starAndRing(hub: Int)

    /// The peers a rank receives from: the only ones whose frames it accepts.
    public func inboundPeers(rank: Int, worldSize: Int) -> [Int] {
        switch self {
        case .ring: worldSize > 1 ? [(rank + worldSize - 1) % worldSize] : []
        case .star, .tree: outboundPeers(rank: rank, worldSize: worldSize)
        case .starAndRing(let hub): Self.starAndRing(hub: hub, rank: rank, worldSize: worldSize, step: -1)
        }
    }

    public func outboundPeers(rank: Int, worldSize: Int) -> [Int] {
        switch self {
        case .ring:
            worldSize > 1 ? [(rank + 1) % worldSize] : []
        case .star(let hub):
            rank == hub ? (0..<worldSize).filter { $0 != hub } : [hub]
        case .tree:
            (treeParent(rank).map { [$0] } ?? []) + treeChildren(rank, worldSize: worldSize)
        case .starAndRing(let hub): Self.starAndRing(hub: hub, rank: rank, worldSize: worldSize, step: 1)
        }
    }

    /// `.starAndRing`'s peers of `rank`: the hub's are the star's; another rank's are the hub and its
    /// neighbour `step` places on along the ring of every rank but the hub (none when it is alone).
    private static func starAndRing(hub: Int, rank: Int, worldSize: Int, step: Int) -> [Int] {
        let others = (0..<worldSize).filter { $0 != hub }
        guard rank != hub else { return others }
        guard others.count > 1, let i = others.firstIndex(of: rank) else { return [hub] }
        return [others[(i + step + others.count) % others.count], hub].sorted()
    }
}

/// Rank r's parent in the binary reduction tree rooted at rank 0: (r−1)/2; nil for the root.
public func treeParent(_ r: Int) -> Int? { r > 0 ? (r - 1) / 2 : nil }

/// Rank r's children in the binary reduction tree of `n` ranks: 2r+1 and 2r+2, those below n.
public func treeChildren(_ r: Int, worldSize n: Int) -> [Int] { [2 * r + 1, 2 * r + 2].filter { $0 < n } }
