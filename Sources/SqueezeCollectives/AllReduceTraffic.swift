// What the collectives send and receive, as plain functions of the sizes: the theory that the
// byte counters are checked against (tests, `scripts/comm-study`, the cluster's progress line).
// All figures are payload bytes (headers excluded); `(sent, received)` per call.

import SqueezeTransport

/// Ring, Float32: rank `rank` sends every segment but r+1 in reduce-scatter and every segment but
/// r+2 in all-gather; it receives every segment but r, then every segment but r+1. In all
/// 2(N−1)/N × 4 × count, up to the one-element differences between segments.
public func ringPayloadBytes(count: Int, worldSize n: Int, rank r: Int) -> (sent: Int, received: Int) {
    guard n > 1 else { return (0, 0) }
    let size = { (k: Int) in ringSegment(k, worldSize: n, count: count).count }
    let sent = 2 * count - size(r + 1) - size(r + 2)
    let received = 2 * count - size(r) - size(r + 1)
    return (sent * 4, received * 4)
}

/// Ring with a dense compression: the same segments and messages, each message
/// `compression.densePayloadBytes` of its elements. So fp16 and bf16 move exactly half the
/// Float32 bytes, and int8 a quarter plus 4 bytes per message (`ringMessages`). nil for topk,
/// whose bytes depend on the data: see `ringSparsePayloadBytes`.
public func ringPayloadBytes(count: Int, worldSize n: Int, rank r: Int, compression: GradientCompression,
                             chunkBytes: Int) -> (sent: Int, received: Int)? {
    if case .topk = compression { return nil }
    guard n > 1 else { return (0, 0) }
    let bytes = { (k: Int) in
        compression.densePayloadBytes(count: ringSegment(k, worldSize: n, count: count).count, chunkBytes: chunkBytes)!
    }
    let all = (0..<n).reduce(0) { $0 + bytes($1) }
    return (2 * all - bytes(r + 1) - bytes(r + 2), 2 * all - bytes(r) - bytes(r + 1))
}

/// Ring: messages (hence headers) rank `rank` sends and receives, given the chunking.
public func ringMessages(count: Int, worldSize n: Int, rank r: Int, chunkBytes: Int) -> (sent: Int, received: Int) {
    guard n > 1 else { return (0, 0) }
    let chunk = max(1, chunkBytes / 4)
    let chunks = { (k: Int) in chunkCount(ringSegment(k, worldSize: n, count: count).count, chunk: chunk) }
    let all = (0..<n).reduce(0) { $0 + chunks($1) }
    return (2 * all - chunks(r + 1) - chunks(r + 2), 2 * all - chunks(r) - chunks(r + 1))
}

/// Ring, topk, when rank j sent `pairs[j]` pairs (k, or fewer when some of its k largest entries
/// were zero): rank `rank` sends every vector but that of r+1 and receives every vector but its
/// own, 8 bytes per pair. Summed over the ranks, 8 × (N−1) × Σ pairs.
public func ringSparsePayloadBytes(pairs: [Int], rank r: Int) -> (sent: Int, received: Int) {
    let n = pairs.count
    guard n > 1 else { return (0, 0) }
    let total = pairs.reduce(0, +)
    return (8 * (total - pairs[(r + 1) % n]), 8 * (total - pairs[r]))
}

/// Star, one worker: `compression.densePayloadBytes` each way (4 × count for Float32); nil for
/// topk: see `starWorkerSparsePayloadBytes`.
public func starWorkerPayloadBytes(count: Int, compression: GradientCompression = .none,
                                   chunkBytes: Int = CollectiveOptions().chunkBytes) -> (sent: Int, received: Int)? {
    compression.densePayloadBytes(count: count, chunkBytes: chunkBytes).map { ($0, $0) }
}

/// Star, one worker, topk: it sent `pairsSent` pairs and the average had `resultPairs` nonzero
/// entries (at most the number of distinct indices all sent).
public func starWorkerSparsePayloadBytes(pairsSent: Int, resultPairs: Int) -> (sent: Int, received: Int) {
    (8 * pairsSent, 8 * resultPairs)
}

/// Star, the hub: a worker's figure times `workers`, each way; nil for topk: see
/// `starHubSparsePayloadBytes`.
public func starHubPayloadBytes(count: Int, workers: Int, compression: GradientCompression = .none,
                                chunkBytes: Int = CollectiveOptions().chunkBytes) -> (sent: Int, received: Int)? {
    compression.densePayloadBytes(count: count, chunkBytes: chunkBytes).map { ($0 * workers, $0 * workers) }
}

/// Star, the hub, topk: worker i sent `pairs[i]` pairs and the average had `resultPairs` nonzero
/// entries, sent to every worker.
public func starHubSparsePayloadBytes(pairs: [Int], resultPairs: Int) -> (sent: Int, received: Int) {
    (8 * resultPairs * pairs.count, 8 * pairs.reduce(0, +))
}

/// Tree: rank `rank` sends and receives one encoded copy of the range per tree edge it has: a leaf
/// (up to its parent, the average back) `D` each way, an inner node with c children D(1 + c), the root
/// (N > 1) Dc, where D is `compression.densePayloadBytes(count:chunkBytes:)` (4 × count for Float32).
/// Summed over the ranks 2(N−1) × D, the ring's total. nil for topk (the tree refuses it).
public func treePayloadBytes(count: Int, worldSize n: Int, rank r: Int, compression: GradientCompression = .none,
                             chunkBytes: Int = CollectiveOptions().chunkBytes) -> (sent: Int, received: Int)? {
    guard let bytes = compression.densePayloadBytes(count: count, chunkBytes: chunkBytes) else { return nil }
    let edges = Topology.tree.outboundPeers(rank: r, worldSize: n).count
    return (bytes * edges, bytes * edges)
}

/// Tree: messages rank `rank` sends and receives (one per chunk per edge), given the chunking.
public func treeMessages(count: Int, worldSize n: Int, rank r: Int, chunkBytes: Int) -> (sent: Int, received: Int) {
    let edges = Topology.tree.outboundPeers(rank: r, worldSize: n).count
    let chunks = chunkCount(count, chunk: max(1, chunkBytes / 4))
    return (chunks * edges, chunks * edges)
}
