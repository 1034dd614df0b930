import Testing
@testable import SqueezeData

/// `--flip alternating|none` and `--translate N`.
@Suite struct FlipTranslateTests {
    /// Every image is mirrored in exactly one of any two consecutive epochs, and which one varies by image.
    @Test func alternatingFlipFlipsEachImageExactlyOnceInTwoEpochs() {
        let records = 0..<4_000
        for epoch in [0, 1, 6] {
            let a = records.map { CropFlip.random(seed: 5, epoch: epoch, index: $0, flip: .alternating) }
            let b = records.map { CropFlip.random(seed: 5, epoch: epoch + 1, index: $0, flip: .alternating) }
            #expect(zip(a, b).allSatisfy { $0.flip != $1.flip }, "epochs \(epoch) and \(epoch + 1)")
            #expect((1_800...2_200).contains(a.filter(\.flip).count), "about half the images in epoch \(epoch)")
            #expect(zip(a, b).filter { $0.offsetY == $1.offsetY && $0.offsetX == $1.offsetX }.count < 200, "the crops stay random")
        }
        // The parity is the seed's: another seed flips other images first.
        let other = records.map { CropFlip.random(seed: 6, epoch: 0, index: $0, flip: .alternating).flip }
        let first = records.map { CropFlip.random(seed: 5, epoch: 0, index: $0, flip: .alternating).flip }
        let seedMatters = other != first  // outside #expect, which would print 4,000 flags each
        #expect(seedMatters)
        #expect(records.allSatisfy { !CropFlip.random(seed: 5, epoch: 3, index: $0, flip: .none).flip })
    }

    /// Offsets (4 = no shift) stay within 4 − N ... 4 + N and reach both ends, uniformly enough.
    @Test(arguments: [0, 1, 2, 4]) func cropOffsetsStayWithinTheTranslation(n: Int) {
        let many = (0..<9_000).map { CropFlip.random(seed: 2, epoch: 3, index: $0, translate: n) }
        for offsets in [many.map(\.offsetY), many.map(\.offsetX)] {
            #expect(Set(offsets) == Set((4 - n)...(4 + n)))
            for v in (4 - n)...(4 + n) {
                let share = Double(offsets.filter { $0 == v }.count) / Double(offsets.count)
                #expect(abs(share - 1 / Double(2 * n + 1)) < 0.02, "offset \(v): \(share)")
            }
        }
    }

    /// The defaults are the original augmentation, and the loader hands the options through.
    @Test func theLoaderAppliesFlipAndTranslate() throws {
        #expect((0..<500).allSatisfy { CropFlip.random(seed: 4, epoch: 2, index: $0)
            == CropFlip.random(seed: 4, epoch: 2, index: $0, translate: 4, flip: .random) })
        let data = try syntheticDataset(count: 32)
        let sampler = try ShardedSampler(count: 32, numShards: 1, rank: 0, globalBatchSize: 32, shuffle: false, seed: 0)
        func images(_ loader: BatchLoader) -> [[Float]] {
            defer { loader.stop() }
            return (0..<2).map { _ in
                let b = loader.next()!
                return Array(UnsafeBufferPointer(start: b.images, count: 3 * b.count * 1024))
            }
        }
        let end = BatchPosition(epoch: 2, batch: 0)
        let plain = images(BatchLoader(dataset: data, sampler: sampler, augmentSeed: nil, end: end))
        let still = images(BatchLoader(dataset: data, sampler: sampler, augmentSeed: 9, translate: 0, flip: .none, end: end))
        let unchanged = still == plain  // outside #expect, which would diff 98,304 floats
        #expect(unchanged)
        // Alternating flips without translation: every image of epoch 1 is the mirror of its epoch-0 self.
        let flipped = images(BatchLoader(dataset: data, sampler: sampler, augmentSeed: 9, translate: 0, flip: .alternating, end: end))
        let mirrored = (0..<(3 * 32 * 32)).allSatisfy { row in
            Array(flipped[0][(row * 32)..<(row * 32 + 32)].reversed()) == Array(flipped[1][(row * 32)..<(row * 32 + 32)])
        }
        let augmented = flipped[0] != plain[0]
        #expect(mirrored && augmented)
    }
}
