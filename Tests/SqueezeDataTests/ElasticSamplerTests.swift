import Testing
@testable import SqueezeData

/// Uneven shares of a global batch and a sampler whose members change mid-epoch (issue 29).
@Suite struct ElasticSamplerTests {
    @Test func theFirstRanksTakeTheRemainder() throws {
        #expect((0..<3).map { ShardedSampler.share(rank: $0, of: 3, globalBatch: 20) } == [7, 7, 6])
        #expect((0..<4).map { ShardedSampler.share(rank: $0, of: 4, globalBatch: 10) } == [3, 3, 2, 2])
        #expect((0..<5).map { ShardedSampler.share(rank: $0, of: 5, globalBatch: 5) } == [1, 1, 1, 1, 1])
        for b in 1...40 {
            for n in 1...b {
                let shares = (0..<n).map { ShardedSampler.share(rank: $0, of: n, globalBatch: b) }
                #expect(shares.reduce(0, +) == b && shares.max()! - shares.min()! <= 1, "B \(b), N \(n): \(shares)")
                #expect(shares == shares.sorted(by: >), "B \(b), N \(n): the larger shares come first")
            }
        }
    }

    @Test(arguments: [3, 7, 8])
    func unevenRanksTogetherGiveTheSingleProcessBatches(numShards n: Int) throws {
        let single = try ShardedSampler(count: 1_003, globalBatchSize: 20, seed: 5)
        let ranks = try (0..<n).map { try single.resharded(numShards: n, rank: $0) }
        #expect(ranks.map(\.localBatchSize) == (0..<n).map { ShardedSampler.share(rank: $0, of: n, globalBatch: 20) })
        for k in [0, 17, single.batchesPerEpoch - 1] {
            let local = ranks.map { $0.localBatch(epoch: 1, k) }
            // Slot j of rank r is slot j·N + r of the global batch.
            var interleaved = [Int?](repeating: nil, count: 20)
            for r in 0..<n { for (j, record) in local[r].enumerated() { interleaved[j * n + r] = record } }
            #expect(interleaved.compactMap { $0 } == single.globalBatch(epoch: 1, k))
        }
    }

    /// 4 workers, then 3 from step 13 (mid-epoch 0), then 4 again from step 31 (mid-epoch 1): every global
    /// batch is the one-process batch, and every record of an epoch is trained once, except the layout's
    /// dropped tail (1,003 records, batch 20, padded to 1,004 for 4 workers: 50 batches cover order[0..<1000]).
    @Test func membersChangingMidEpochSeeEveryImageOnce() throws {
        let count = 1_003, batch = 20
        let single = try ShardedSampler(count: count, globalBatchSize: batch, seed: 11)
        let first = try ShardedSampler(count: count, numShards: 4, rank: 0, globalBatchSize: batch, seed: 11)
        // Each member's own sampler; member ids are stable, ranks dense: 0…3, then 2 leaves (3 ranks), then 4 joins.
        let ranks: [(from: Int, members: [Int])] = [(0, [0, 1, 2, 3]), (13, [0, 1, 3]), (31, [0, 1, 3, 4])]
        var samplers = [Int: ElasticSampler]()
        for (from, members) in ranks {
            for (rank, member) in members.enumerated() {
                if samplers[member] == nil {
                    samplers[member] = ElasticSampler(try first.resharded(numShards: members.count, rank: rank), fromStep: from)
                } else {
                    try samplers[member]!.reshard(atStep: from, numShards: members.count, rank: rank)
                }
            }
        }
        let perEpoch = single.batchesPerEpoch
        #expect(perEpoch == 50 && samplers.values.allSatisfy { $0.batchesPerEpoch == perEpoch })
        for epoch in 0..<2 {
            var seen = [Int]()
            for k in 0..<perEpoch {
                let step = epoch * perEpoch + k
                let members = ranks.last { $0.from <= step }!.members
                let shares = members.map { samplers[$0]!.localBatch(step: step) }
                #expect(shares.map(\.count) == (0..<members.count).map { ShardedSampler.share(rank: $0, of: members.count, globalBatch: batch) })
                #expect(Set(shares.flatMap { $0 }) == Set(single.globalBatch(epoch: epoch, k)), "step \(step)")
                seen += shares.flatMap { $0 }
            }
            let order = single.order(epoch: epoch)
            #expect(seen.count == perEpoch * batch && Set(seen).count == seen.count, "epoch \(epoch): a record trained twice")
            #expect(Set(seen) == Set(order[0..<(perEpoch * batch)]), "epoch \(epoch)")
            #expect(Set(order[(perEpoch * batch)..<count]).isDisjoint(with: seen))  // the dropped tail: 3 records
        }
    }

    /// 1,017 records at batch 20: padded for 4 workers to 1,020 (51 batches, the last one repeating the
    /// order's first 3 records); for 3 workers 1,017 would need no padding (50 batches). After a change
    /// from 4 to 3 the epoch keeps the layout it began with.
    @Test func theEpochKeepsTheLayoutItBeganWith() throws {
        let four = try ShardedSampler(count: 1_017, numShards: 4, rank: 0, globalBatchSize: 20, seed: 2)
        let three = try four.resharded(numShards: 3, rank: 2)
        #expect(four.batchesPerEpoch == 51 && three.batchesPerEpoch == 51 && three.paddedCount == 1_020)
        #expect(try ShardedSampler(count: 1_017, numShards: 3, rank: 2, globalBatchSize: 20, seed: 2).batchesPerEpoch == 50)
        let last = (0..<3).flatMap { try! four.resharded(numShards: 3, rank: $0).localBatch(epoch: 0, 50) }
        #expect(Set(last) == Set(four.globalBatch(epoch: 0, 50)) && four.globalBatch(epoch: 0, 50).suffix(3) == four.order(epoch: 0).prefix(3))
    }

    @Test func aChangeCannotGoBackInTime() throws {
        var s = ElasticSampler(try ShardedSampler(count: 100, numShards: 2, rank: 0, globalBatchSize: 10), fromStep: 4)
        try s.reshard(atStep: 6, numShards: 3, rank: 2)
        try s.reshard(atStep: 6, numShards: 3, rank: 1)  // the same step again: replaces
        #expect(s.segments.count == 2 && s.sampler(atStep: 9).rank == 1 && s.sampler(atStep: 5).numShards == 2)
        let back = #expect(throws: DataError.self) { try s.reshard(atStep: 5, numShards: 2, rank: 0) }
        #expect(back?.description.contains("step 5") == true && back?.description.contains("step 6") == true)
        #expect(throws: DataError.self) { try s.reshard(atStep: 7, numShards: 11, rank: 0) }  // 11 workers, 10 images
        #expect(s.segments.count == 2)
    }
}
