import SqueezeEngine
import Testing
@testable import SqueezeData

@Suite struct SamplerTests {
    @Test func unshuffledOrderIsPaddedFromTheStartAndStrided() throws {
        // DistributedSampler(range(10), num_replicas=3, shuffle=False): [0,3,6,9], [1,4,7,0], [2,5,8,1].
        let shards = try (0..<3).map { try ShardedSampler(count: 10, numShards: 3, rank: $0, globalBatchSize: 3, shuffle: false) }
        #expect(shards[0].order(epoch: 0) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
        #expect(shards[0].shard(epoch: 5) == [0, 3, 6, 9])
        #expect(shards[1].shard(epoch: 0) == [1, 4, 7, 0])
        #expect(shards[2].shard(epoch: 0) == [2, 5, 8, 1])
        #expect(shards[0].paddedCount == 12 && shards[0].samplesPerShard == 4 && shards[0].batchesPerEpoch == 4)
        // Fewer records than shards: padding wraps around more than once.
        let tiny = try ShardedSampler(count: 2, numShards: 5, rank: 0, globalBatchSize: 5, shuffle: false)
        #expect(tiny.order(epoch: 0) == [0, 1, 0, 1, 0])
    }

    @Test func shuffledOrderIsSeededFisherYatesPerEpoch() throws {
        let s = try ShardedSampler(count: 1000, globalBatchSize: 100, seed: 17)
        for epoch in [0, 1, 7] {
            // Reference: Fisher–Yates with SeededRNG(seed: seed + epoch).
            var expected = Array(0..<1000)
            var rng = SeededRNG(seed: 17 &+ UInt64(epoch))
            for i in stride(from: 999, to: 0, by: -1) { expected.swapAt(i, rng.below(i + 1)) }
            #expect(s.order(epoch: epoch) == expected)
            #expect(Set(s.order(epoch: epoch)) == Set(0..<1000))
        }
        #expect(s.order(epoch: 0) != s.order(epoch: 1))
        #expect(s.order(epoch: 0) != Array(0..<1000))
        let other = try ShardedSampler(count: 1000, globalBatchSize: 100, seed: 18)
        #expect(other.order(epoch: 0) != s.order(epoch: 0))
    }

    @Test(arguments: [1, 2, 3, 4, 5, 8])
    func ranksTogetherGiveTheSingleProcessBatches(numShards: Int) throws {
        let count = 1_003, globalBatch = 120  // 120 divides by 1…5 and 8
        let single = try ShardedSampler(count: count, numShards: 1, rank: 0, globalBatchSize: globalBatch, seed: 5)
        let ranks = try (0..<numShards).map {
            try ShardedSampler(count: count, numShards: numShards, rank: $0, globalBatchSize: globalBatch, seed: 5)
        }
        #expect(ranks.allSatisfy { $0.localBatchSize == globalBatch / numShards })
        #expect(single.batchesPerEpoch == 8 && ranks[0].batchesPerEpoch == 8)  // floor(1003 or 1008 / 120)
        for epoch in 0..<2 {
            for k in 0..<single.batchesPerEpoch {
                let local = ranks.map { $0.localBatch(epoch: epoch, k) }
                // Rank-interleaved: slot j of rank r is slot j·N + r of the global batch.
                var interleaved = [Int]()
                for j in 0..<(globalBatch / numShards) { for r in 0..<numShards { interleaved.append(local[r][j]) } }
                #expect(interleaved == single.localBatch(epoch: epoch, k))
                #expect(interleaved == single.globalBatch(epoch: epoch, k))
                #expect(Set(interleaved).count == globalBatch)  // disjoint across ranks
                // The k-th local batch is the k-th run of the rank's DistributedSampler share.
                for r in 0..<numShards {
                    let b = globalBatch / numShards
                    #expect(local[r] == Array(ranks[r].shard(epoch: epoch)[(k * b)..<((k + 1) * b)]))
                }
            }
        }
    }

    @Test(arguments: [1, 2, 4, 5])
    func shardsAreDisjointAndCoverEveryRecord(numShards: Int) throws {
        // 1,000 records, global batch 100: no padding, no dropped batch.
        let ranks = try (0..<numShards).map {
            try ShardedSampler(count: 1_000, numShards: numShards, rank: $0, globalBatchSize: 100, seed: 3)
        }
        for epoch in 0..<2 {
            var seen = [Int]()
            for s in ranks { for k in 0..<s.batchesPerEpoch { seen += s.localBatch(epoch: epoch, k) } }
            #expect(seen.count == 1_000 && Set(seen) == Set(0..<1_000))
        }
    }

    @Test func paddedShardsCoverEveryRecordAndRepeatOnlyThePadding() throws {
        let ranks = try (0..<4).map { try ShardedSampler(count: 1_001, numShards: 4, rank: $0, globalBatchSize: 4, seed: 9) }
        let shards = ranks.map { $0.shard(epoch: 0) }
        #expect(shards.allSatisfy { $0.count == 251 })
        let all = shards.flatMap { $0 }
        #expect(Set(all) == Set(0..<1_001))
        // The 3 padded entries repeat the first 3 of the epoch's order.
        let order = ranks[0].order(epoch: 0)
        #expect(all.count - Set(all).count == 3)
        #expect(Array(order[1_001...]) == Array(order[0..<3]))
    }

    @Test func lastPartialGlobalBatchIsDropped() throws {
        let s = try ShardedSampler(count: 250, numShards: 2, rank: 1, globalBatchSize: 100)
        #expect(s.batchesPerEpoch == 2)
        #expect(s.localBatch(epoch: 0, 1).count == 50)
    }

    @Test func invalidSettingsThrowClearErrors() {
        // Uneven shares are fine (ElasticSamplerTests); a batch with fewer images than workers is not.
        let tooFew = #expect(throws: DataError.self) {
            try ShardedSampler(count: 100, numShards: 5, rank: 0, globalBatchSize: 4)
        }
        #expect(tooFew?.description.contains("4") == true)
        #expect(tooFew?.description.contains("5") == true)
        #expect(throws: DataError.self) { try ShardedSampler(count: 100, globalBatchSize: 4, layoutShards: 0) }
        #expect(throws: DataError.self) { try ShardedSampler(count: 100, numShards: 2, rank: 2, globalBatchSize: 64) }
        #expect(throws: DataError.self) { try ShardedSampler(count: 100, numShards: 0, rank: 0, globalBatchSize: 64) }
        #expect(throws: DataError.self) { try ShardedSampler(count: 0, globalBatchSize: 64) }
        #expect(throws: DataError.self) { try ShardedSampler(count: 100, globalBatchSize: 0) }
        #expect(throws: DataError.self) { try ShardedSampler(count: 100, globalBatchSize: 128) }
    }
}
