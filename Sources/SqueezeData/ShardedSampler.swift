import SqueezeEngine

/// Which data set records each rank trains on, with the semantics of PyTorch's
/// `DistributedSampler(drop_last=False)` plus fixed-size training batches.
///
/// For epoch e the order is a permutation of `0..<count` (Fisher–Yates, swapping `i` with
/// `rng.below(i + 1)` for `i` from `count − 1` down to 1, `rng = SeededRNG(seed: seed &+ UInt64(e))`),
/// or file order when `shuffle` is off. It is padded by repeating from its start up to
/// `paddedCount`, the next multiple of `layoutShards` (the number of workers, unless an elastic run
/// keeps the layout of the world size it started with, see `resharded`). Rank r's share is every
/// `numShards`-th element starting at r.
///
/// Batching: global batch k is `order[k*B ..< (k+1)*B]`, whatever the number of workers N, and rank
/// r's k-th local batch is its elements at positions ≡ r (mod N): `share(rank:of:globalBatch:)`
/// records, ⌈B/N⌉ for the first B mod N ranks and ⌊B/N⌋ for the others (B/N each when N divides B,
/// and then also the k-th run of `localBatchSize` in rank r's share). Interleaving all ranks' k-th
/// local batches (rank 0's first, rank 1's first, …) gives global batch k, so N ranks see exactly the
/// batches of one process. There are `batchesPerEpoch` = floor(paddedCount / B) batches; the last
/// partial global batch of each epoch is dropped. Since neither the batches nor their number depend
/// on N, a run may change N (and ranks) between two steps of an epoch (`resharded`): the rest of the
/// epoch's batches are the same, divided over the new ranks.
public struct ShardedSampler: Sendable, Equatable {
    public let count: Int
    public let numShards: Int
    public let rank: Int
    public let globalBatchSize: Int
    public let shuffle: Bool
    public let seed: UInt64

    /// The number of workers whose padding the epoch's layout uses (`numShards` unless `resharded`).
    public let layoutShards: Int

    /// Throws `DataError.invalidConfiguration` unless count ≥ 1, 1 ≤ numShards ≤ globalBatchSize (every
    /// rank gets at least one record per batch), 0 ≤ rank < numShards, layoutShards ≥ 1 (nil: numShards)
    /// and globalBatchSize ≤ `paddedCount`.
    public init(count: Int, numShards: Int = 1, rank: Int = 0, globalBatchSize: Int,
                shuffle: Bool = true, seed: UInt64 = 0, layoutShards: Int? = nil) throws {
        guard count >= 1 else { throw DataError.invalidConfiguration("the data set is empty") }
        guard numShards >= 1 else { throw DataError.invalidConfiguration("number of shards \(numShards) must be at least 1") }
        guard (0..<numShards).contains(rank) else {
            throw DataError.invalidConfiguration("rank \(rank) is not in 0..<\(numShards)")
        }
        guard globalBatchSize >= 1, numShards <= globalBatchSize else {
            throw DataError.invalidConfiguration(
                "global batch size \(globalBatchSize) gives no image to some of the \(numShards) workers: it must be at least the number of workers")
        }
        let layout = layoutShards ?? numShards
        guard layout >= 1 else { throw DataError.invalidConfiguration("layout shards \(layout) must be at least 1") }
        let padded = (count + layout - 1) / layout * layout
        guard globalBatchSize <= padded else {
            throw DataError.invalidConfiguration(
                "global batch size \(globalBatchSize) is larger than the data set (\(count) records)")
        }
        self.count = count
        self.numShards = numShards
        self.rank = rank
        self.globalBatchSize = globalBatchSize
        self.shuffle = shuffle
        self.seed = seed
        self.layoutShards = layout
    }

    /// The same data order and batches divided over `numShards` workers, this one holding `rank`: what
    /// an elastic run switches to at a step boundary when its members change. The layout (padding,
    /// batches per epoch) stays this sampler's, so the rest of the epoch is the same global batches.
    public func resharded(numShards: Int, rank: Int) throws -> ShardedSampler {
        try ShardedSampler(count: count, numShards: numShards, rank: rank, globalBatchSize: globalBatchSize,
                           shuffle: shuffle, seed: seed, layoutShards: layoutShards)
    }

    /// Records of each global batch of `globalBatch` that rank `rank` of `workers` trains on: the first
    /// `globalBatch mod workers` ranks take one more than the others.
    public static func share(rank: Int, of workers: Int, globalBatch: Int) -> Int {
        precondition((0..<workers).contains(rank), "rank \(rank) is not in 0..<\(workers)")
        return (globalBatch - rank + workers - 1) / workers
    }

    /// `count` rounded up to a multiple of `layoutShards`.
    public var paddedCount: Int { (count + layoutShards - 1) / layoutShards * layoutShards }
    /// Records of this rank per epoch (`paddedCount / numShards` when that divides), as `len(DistributedSampler)`.
    public var samplesPerShard: Int { (paddedCount - rank + numShards - 1) / numShards }
    /// Records of this rank per batch: `share(rank:of:globalBatch:)`, `globalBatchSize / numShards` when that divides.
    public var localBatchSize: Int { ShardedSampler.share(rank: rank, of: numShards, globalBatch: globalBatchSize) }
    /// floor(paddedCount / globalBatchSize); the trailing partial global batch is dropped.
    public var batchesPerEpoch: Int { paddedCount / globalBatchSize }

    /// The epoch's order of all records, padded to `paddedCount` (same on every rank).
    public func order(epoch: Int) -> [Int] {
        precondition(epoch >= 0, "epochs count from 0")
        var perm = Array(0..<count)
        if shuffle {
            var rng = SeededRNG(seed: seed &+ UInt64(epoch))
            var i = count - 1
            while i > 0 {
                perm.swapAt(i, rng.below(i + 1))
                i -= 1
            }
        }
        var k = 0
        while perm.count < paddedCount {  // repeat from the start (may wrap more than once only if count < numShards)
            perm.append(perm[k % count])
            k += 1
        }
        return perm
    }

    /// This rank's share of the epoch: `order(epoch:)[rank], [rank + numShards], …` (what
    /// iterating `DistributedSampler` yields), `samplesPerShard` records.
    public func shard(epoch: Int) -> [Int] {
        let all = order(epoch: epoch)
        return Array(stride(from: rank, to: paddedCount, by: numShards).map { all[$0] })
    }

    /// This rank's batch `k` (0 ..< batchesPerEpoch), given the epoch's `order` (from `order(epoch:)`,
    /// which callers can compute once per epoch).
    public func localBatch(_ k: Int, of order: [Int]) -> [Int] {
        precondition((0..<batchesPerEpoch).contains(k), "batch \(k) is not in 0..<\(batchesPerEpoch)")
        precondition(order.count == paddedCount, "order has \(order.count) entries, expected \(paddedCount)")
        let start = k * globalBatchSize + rank
        return (0..<localBatchSize).map { order[start + $0 * numShards] }
    }

    /// This rank's batch `k` of `epoch`.
    public func localBatch(epoch: Int, _ k: Int) -> [Int] {
        localBatch(k, of: order(epoch: epoch))
    }

    /// Global batch `k` of `epoch` (what a single process with this seed trains on).
    public func globalBatch(epoch: Int, _ k: Int) -> [Int] {
        precondition((0..<batchesPerEpoch).contains(k), "batch \(k) is not in 0..<\(batchesPerEpoch)")
        return Array(order(epoch: epoch)[(k * globalBatchSize)..<((k + 1) * globalBatchSize)])
    }
}
