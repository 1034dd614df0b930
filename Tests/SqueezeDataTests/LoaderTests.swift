import Testing
@testable import SqueezeData

/// A deadlocked loader fails its test instead of hanging the run.
@Suite(.timeLimit(.minutes(2))) struct LoaderTests {
    /// What the loader should produce at `position`: images, labels and indices assembled directly.
    func direct(_ data: CIFAR10, _ s: ShardedSampler, _ position: BatchPosition, seed: UInt64?) -> ([Float], [Int32], [Int]) {
        let indices = s.localBatch(epoch: position.epoch, position.batch)
        let (images, labels) = assemble(data, indices, epoch: position.epoch, augmentSeed: seed)
        return (images, labels, indices)
    }

    func copy(_ batch: BatchLoader.Batch) -> [Float] {
        Array(UnsafeBufferPointer(start: batch.images, count: 3 * batch.count * batch.imageSize * batch.imageSize))
    }

    @Test func loaderReturnsTheDirectlyAssembledBatchesThenStops() throws {
        let data = try syntheticDataset(count: 100)
        let s = try ShardedSampler(count: 100, numShards: 2, rank: 1, globalBatchSize: 16, seed: 4)
        let loader = BatchLoader(dataset: data, sampler: s, augmentSeed: 11, end: BatchPosition(epoch: 2, batch: 0))
        var positions = [BatchPosition]()
        while let batch = loader.next() {
            let (images, labels, indices) = direct(data, s, batch.position, seed: 11)
            #expect(batch.indices == indices && batch.labels == labels && batch.imageSize == 32)
            #expect(copy(batch) == images)
            positions.append(batch.position)
        }
        let expected = (0..<2).flatMap { e in (0..<s.batchesPerEpoch).map { BatchPosition(epoch: e, batch: $0) } }
        #expect(s.batchesPerEpoch == 6)
        #expect(positions == expected)
        #expect(loader.next() == nil)  // stays finished
        // Finished, the background thread assembles nothing more: its time stays at zero once reset.
        loader.resetTimers()
        #expect(loader.loadSeconds == 0 && loader.waitSeconds == 0)
        #expect(loader.next() == nil)
        #expect(loader.loadSeconds == 0)
        loader.stop()
        #expect(loader.next() == nil)
    }

    @Test func resumingMidEpochEqualsContinuing() throws {
        let data = try syntheticDataset(count: 90)
        let s = try ShardedSampler(count: 90, numShards: 3, rank: 2, globalBatchSize: 12, seed: 8)  // 7 batches/epoch
        let resumeAt = BatchPosition(epoch: 1, batch: 5)
        let continuing = BatchLoader(dataset: data, sampler: s, augmentSeed: 21)
        var before = 0
        var batch = continuing.next()
        while let b = batch, b.position != resumeAt { before += 1; batch = continuing.next() }
        #expect(before == 7 + 5)
        let resumed = BatchLoader(dataset: data, sampler: s, augmentSeed: 21, start: resumeAt)
        for _ in 0..<6 {  // crosses into epoch 2
            let a = try #require(batch), r = try #require(resumed.next())
            #expect(a.position == r.position && a.indices == r.indices && a.labels == r.labels)
            #expect(copy(a) == copy(r))
            batch = continuing.next()
        }
        #expect(batch?.position == BatchPosition(epoch: 2, batch: 4))
        continuing.stop()
        resumed.stop()
    }

    @Test func workerLoadersTogetherReproduceTheSingleProcessBatch() throws {
        let data = try syntheticDataset(count: 64)
        let single = BatchLoader(dataset: data, sampler: try ShardedSampler(count: 64, globalBatchSize: 16, seed: 2),
                                 augmentSeed: 5, start: BatchPosition(epoch: 1, batch: 2))
        let workers = try (0..<4).map {
            BatchLoader(dataset: data, sampler: try ShardedSampler(count: 64, numShards: 4, rank: $0, globalBatchSize: 16, seed: 2),
                        augmentSeed: 5, start: BatchPosition(epoch: 1, batch: 2))
        }
        for _ in 0..<3 {
            let whole = try #require(single.next())
            let wholeImages = copy(whole)
            for (r, w) in workers.enumerated() {
                let part = try #require(w.next())
                let partImages = copy(part)
                #expect(part.position == whole.position)
                for j in 0..<4 {  // worker r's slot j is the single process's slot 4j + r
                    #expect(part.indices[j] == whole.indices[4 * j + r] && part.labels[j] == whole.labels[4 * j + r])
                    for c in 0..<3 {
                        #expect(plane(partImages, c: c, n: j, batch: 4) == plane(wholeImages, c: c, n: 4 * j + r, batch: 16))
                    }
                }
            }
        }
    }

    @Test func upsamplingLoaderMatchesUpsampledBatch() throws {
        let data = try syntheticDataset(count: 20)
        let s = try ShardedSampler(count: 20, globalBatchSize: 4, shuffle: false)
        let loader = BatchLoader(dataset: data, sampler: s, augmentSeed: nil, imageSize: 48)
        let batch = try #require(loader.next())
        #expect(batch.indices == [0, 1, 2, 3] && batch.imageSize == 48)
        let (small, _) = assemble(data, [0, 1, 2, 3])
        var big = [Float](repeating: .nan, count: 3 * 4 * 48 * 48)
        small.withUnsafeBufferPointer { src in
            big.withUnsafeMutableBufferPointer { upsampleBilinear(src.baseAddress!, planes: 12, from: 32, to: 48, into: $0.baseAddress!) }
        }
        #expect(copy(batch) == big)
    }

    @Test func stoppingAndDroppingDoNotHang() throws {
        let data = try syntheticDataset(count: 40)
        let s = try ShardedSampler(count: 40, globalBatchSize: 8)
        // Never read from: deinit must stop the thread that is blocked on full buffers.
        do { _ = BatchLoader(dataset: data, sampler: s, augmentSeed: 1) }
        // Read a few, stop twice, read again.
        let loader = BatchLoader(dataset: data, sampler: s, augmentSeed: 1, buffers: 3)
        for _ in 0..<7 { #expect(loader.next() != nil) }
        loader.stop()
        loader.stop()
        #expect(loader.next() == nil)
        // Stop while a batch is lent out and the thread is waiting.
        let other = BatchLoader(dataset: data, sampler: s, augmentSeed: nil)
        _ = other.next()
        other.stop()
        // An end equal to the start produces nothing.
        let empty = BatchLoader(dataset: data, sampler: s, augmentSeed: nil,
                                start: BatchPosition(epoch: 3, batch: 1), end: BatchPosition(epoch: 3, batch: 1))
        #expect(empty.next() == nil)
    }
}
