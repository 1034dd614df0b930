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

    /// The peers a rank receives from: the only ones whose frames it accepts.
    public func inboundPeers(rank: Int, worldSize: Int) -> [Int] {
        switch self {
        case .ring: worldSize > 1 ? [(rank + worldSize - 1) % worldSize] : []
        case .star, .tree: outboundPeers(rank: rank, worldSize: worldSize)
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
        }
    }
}

/// Rank r's parent in the binary reduction tree rooted at rank 0: (r−1)/2; nil for the root.
public func treeParent(_ r: Int) -> Int? { r > 0 ? (r - 1) / 2 : nil }

/// Rank r's children in the binary reduction tree of `n` ranks: 2r+1 and 2r+2, those below n.
public func treeChildren(_ r: Int, worldSize n: Int) -> [Int] { [2 * r + 1, 2 * r + 2].filter { $0 < n } }
