import SqueezeEngine

/// Which data set records each rank trains on, with the semantics of PyTorch's
/// `DistributedSampler(drop_last=False)` plus fixed-size training batches.
///
/// For epoch e the order is a permutation of `0..<count` (Fisher–Yates, swapping `i` with
/// `rng.below(i + 1)` for `i` from `count − 1` down to 1, `rng = SeededRNG(seed: seed &+ UInt64(e))`),
/// or file order when `shuffle` is off. It is padded by repeating from its start up to
/// `paddedCount`, the next multiple of `numShards`. Rank r's share is every `numShards`-th element
/// starting at r.
///
/// Batching: the global batch size B is split evenly, `localBatchSize` = B / numShards.
/// Global batch k is `order[k*B ..< (k+1)*B]` and rank r's k-th local batch is its elements at
/// positions ≡ r (mod numShards) — equivalently, the k-th run of `localBatchSize` in rank r's share.
/// Interleaving all ranks' k-th local batches (rank 0's first, rank 1's first, …) gives global batch
/// k, so N ranks see exactly the batches of one process. There are `batchesPerEpoch` =
/// floor(paddedCount / B) batches; the last partial global batch of each epoch is dropped.
public struct ShardedSampler: Sendable, Equatable {
    public let count: Int
    public let numShards: Int
    public let rank: Int
    public let globalBatchSize: Int
    public let shuffle: Bool
    public let seed: UInt64

    /// Throws `DataError.invalidConfiguration` unless count ≥ 1, numShards ≥ 1, 0 ≤ rank < numShards,
    /// and globalBatchSize is a positive multiple of numShards no larger than `paddedCount`.
    public init(count: Int, numShards: Int = 1, rank: Int = 0, globalBatchSize: Int,
                shuffle: Bool = true, seed: UInt64 = 0) throws {
        guard count >= 1 else { throw DataError.invalidConfiguration("the data set is empty") }
        guard numShards >= 1 else { throw DataError.invalidConfiguration("number of shards \(numShards) must be at least 1") }
        guard (0..<numShards).contains(rank) else {
            throw DataError.invalidConfiguration("rank \(rank) is not in 0..<\(numShards)")
        }
        guard globalBatchSize >= 1, globalBatchSize % numShards == 0 else {
            throw DataError.invalidConfiguration(
                "global batch size \(globalBatchSize) must be a positive multiple of the number of workers \(numShards)")
        }
        let padded = (count + numShards - 1) / numShards * numShards
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
    }

    /// `count` rounded up to a multiple of `numShards`.
    public var paddedCount: Int { (count + numShards - 1) / numShards * numShards }
    /// Records per rank per epoch (`paddedCount / numShards`), as `len(DistributedSampler)`.
    public var samplesPerShard: Int { paddedCount / numShards }
    /// Records per rank per batch: `globalBatchSize / numShards`.
    public var localBatchSize: Int { globalBatchSize / numShards }
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
