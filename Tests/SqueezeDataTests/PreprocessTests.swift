import Testing
@testable import SqueezeData

@Suite struct PreprocessTests {
    /// Naive reference: zero-pad to 40×40 bytes, crop, flip, then normalise. Returns plane c.
    func reference(_ image: ArraySlice<UInt8>, _ t: CropFlip, channel c: Int) -> [Float] {
        let img = Array(image)
        var padded = [[UInt8]](repeating: [UInt8](repeating: 0, count: 40), count: 40)
        for y in 0..<32 { for x in 0..<32 { padded[y + 4][x + 4] = img[c * 1024 + y * 32 + x] } }
        var out = [Float]()
        for y in 0..<32 {
            var row = Array(padded[y + t.offsetY][t.offsetX..<(t.offsetX + 32)])
            if t.flip { row.reverse() }
            out += row.map { Normalization.normalize($0, channel: c) }
        }
        return out
    }

    @Test func paddingNormalisesAsAZeroPixel() {
        for c in 0..<3 {
            #expect(Normalization.normalize(0, channel: c) == (0 - Normalization.mean[c]) / Normalization.std[c])
        }
        #expect(abs(Normalization.normalize(0, channel: 0) - (-1.989474)) < 1e-5)  // −0.4914 / 0.2470
        #expect(abs(Normalization.normalize(255, channel: 2) - 2.1158257) < 1e-5)  // (1 − 0.4465) / 0.2616
    }

    @Test func aRecordIndexOutsideTheDataSetIsAnError() throws {
        let data = try syntheticDataset(count: 3)
        var out = [Float](repeating: 0, count: 2 * 3072)
        for bad in [3, -1] {
            #expect(throws: DataError.recordOutOfRange(record: bad, count: 3)) {
                try out.withUnsafeMutableBufferPointer { _ = try data.fillBatch(indices: [0, bad], transforms: nil, into: $0.baseAddress!) }
            }
        }
        #expect(out.allSatisfy { $0 == 0 })  // nothing written
    }

    @Test func batchIsChannelMajor() throws {
        // Image n, channel c is the constant byte 10·n + c + 1.
        var bytes = [UInt8]()
        for n in 0..<3 { for c in 0..<3 { bytes += [UInt8](repeating: UInt8(10 * n + c + 1), count: 1024) } }
        let data = try CIFAR10(images: bytes, labels: [7, 8, 9])
        let (out, labels) = assemble(data, [2, 0])
        #expect(labels == [9, 7])
        for c in 0..<3 {
            for (slot, n) in [2, 0].enumerated() {
                let expected = Normalization.normalize(UInt8(10 * n + c + 1), channel: c)
                // Element [c][slot][h][w] is at ((c * N + slot) * 32 + h) * 32 + w, N = 2.
                #expect(out[((c * 2 + slot) * 32 + 0) * 32 + 0] == expected)
                #expect(out[((c * 2 + slot) * 32 + 31) * 32 + 31] == expected)
                #expect(plane(out, c: c, n: slot, batch: 2).allSatisfy { $0 == expected })
            }
        }
    }

    @Test func flipAndCropMovePixelsAsExpected() throws {
        let data = try syntheticDataset(count: 1, seed: 42)
        let img = Array(data.image(0))
        func src(_ c: Int, _ y: Int, _ x: Int) -> Float { Normalization.normalize(img[c * 1024 + y * 32 + x], channel: c) }
        func run(_ t: CropFlip) -> [Float] {
            var out = [Float](repeating: .nan, count: 3072)
            out.withUnsafeMutableBufferPointer { _ = try! data.fillBatch(indices: [0], transforms: [t], into: $0.baseAddress!) }
            return out
        }
        let pad = (0..<3).map { Normalization.normalize(0, channel: $0) }

        // Flip only: column x comes from column 31 − x.
        let flipped = run(CropFlip(offsetY: 4, offsetX: 4, flip: true))
        for c in 0..<3 { for y in [0, 13, 31] { for x in [0, 5, 31] {
            #expect(flipped[c * 1024 + y * 32 + x] == src(c, y, 31 - x))
        } } }

        // Crop at the top-right corner of the padded image: the content moves down 4 and left 4;
        // the top 4 rows and the right 4 columns are padding.
        let cropped = run(CropFlip(offsetY: 0, offsetX: 8, flip: false))
        for c in 0..<3 {
            for y in 0..<32 { for x in 0..<32 {
                let v = cropped[c * 1024 + y * 32 + x]
                if y < 4 || x >= 28 { #expect(v == pad[c]) } else { #expect(v == src(c, y - 4, x + 4)) }
            } }
        }

        // Crop then flip: the padding columns end up on the left.
        let both = run(CropFlip(offsetY: 8, offsetX: 8, flip: true))
        #expect(both[0] == pad[0] && both[3] == pad[0] && both[4] == src(0, 4, 31))
        #expect(both[27 * 32 + 31] == src(0, 31, 4))   // output (27, 31) ← cropped column 0 ← source (31, 4)
        #expect(both[28 * 32 + 10] == pad[0])          // rows 28… come from padding below the image

        // Every offset and flip agrees with the naive pad-crop-flip reference.
        for oy in 0...8 { for ox in 0...8 { for flip in [false, true] {
            let t = CropFlip(offsetY: oy, offsetX: ox, flip: flip)
            let out = run(t)
            for c in 0..<3 { #expect(Array(out[(c * 1024)..<((c + 1) * 1024)]) == reference(data.image(0), t, channel: c)) }
        } } }
    }

    @Test func cutoutBlanksAClippedSquareAfterCropAndFlip() throws {
        let data = try syntheticDataset(count: 1, seed: 5)
        func run(_ t: CropFlip) -> [Float] {
            var out = [Float](repeating: .nan, count: 3072)
            out.withUnsafeMutableBufferPointer { _ = try! data.fillBatch(indices: [0], transforms: [t], into: $0.baseAddress!) }
            return out
        }
        // Centre (10, 20), side 8: rows 6..<14, columns 16..<24. Centre (0, 31), side 8: rows 0..<4, columns 27..<32.
        for (cy, cx, rows, columns) in [(10, 20, 6..<14, 16..<24), (0, 31, 0..<4, 27..<32)] {
            let plain = run(CropFlip(offsetY: 2, offsetX: 7, flip: true))
            let cut = run(CropFlip(offsetY: 2, offsetX: 7, flip: true, cutout: .init(y: cy, x: cx, size: 8)))
            for c in 0..<3 { for y in 0..<32 { for x in 0..<32 {
                let i = c * 1024 + y * 32 + x
                #expect(cut[i] == (rows.contains(y) && columns.contains(x) ? 0 : plain[i]), "channel \(c) pixel (\(y), \(x))")
            } } }
        }
        // Drawing a cutout does not change the crop and flip drawn before it; centres cover the image.
        let with = (0..<5_000).map { CropFlip.random(seed: 3, epoch: 1, index: $0, cutout: 16) }
        let without = (0..<5_000).map { CropFlip.random(seed: 3, epoch: 1, index: $0) }
        #expect(zip(with, without).allSatisfy { a, b in a.offsetY == b.offsetY && a.offsetX == b.offsetX && a.flip == b.flip })
        #expect(without.allSatisfy { $0.cutout == nil } && with.allSatisfy { $0.cutout?.size == 16 })
        #expect(Set(with.map { $0.cutout!.y }) == Set(0..<32) && Set(with.map { $0.cutout!.x }) == Set(0..<32))
    }

    @Test func augmentationIsAPureFunctionOfSeedEpochAndIndex() throws {
        #expect(CropFlip.random(seed: 7, epoch: 3, index: 1234) == CropFlip.random(seed: 7, epoch: 3, index: 1234))
        let epoch0 = (0..<1000).map { CropFlip.random(seed: 7, epoch: 0, index: $0) }
        let epoch1 = (0..<1000).map { CropFlip.random(seed: 7, epoch: 1, index: $0) }
        let seed8 = (0..<1000).map { CropFlip.random(seed: 8, epoch: 0, index: $0) }
        #expect(epoch0 != epoch1 && epoch0 != seed8)
        #expect(zip(epoch0, epoch1).filter { $0 == $1 }.count < 50)  // 1 in 162 chance each
        // Offsets cover 0...8, flips about half.
        let many = (0..<10_000).map { CropFlip.random(seed: 1, epoch: 0, index: $0) }
        #expect(Set(many.map(\.offsetY)) == Set(0...8) && Set(many.map(\.offsetX)) == Set(0...8))
        #expect((4_500...5_500).contains(many.filter(\.flip).count))

        // A record's pixels do not depend on the batch it is in or its slot.
        let data = try syntheticDataset(count: 20)
        let (a, _) = assemble(data, [3, 11, 5], epoch: 2, augmentSeed: 99)
        let (b, _) = assemble(data, [11, 0, 17, 4], epoch: 2, augmentSeed: 99)
        for c in 0..<3 { #expect(plane(a, c: c, n: 1, batch: 3) == plane(b, c: c, n: 0, batch: 4)) }
        // ...and equal an explicit transform for that record.
        let (explicit, _) = { () -> ([Float], [Int32]) in
            var out = [Float](repeating: 0, count: 3072)
            let labels = out.withUnsafeMutableBufferPointer {
                try! data.fillBatch(indices: [11], transforms: [CropFlip.random(seed: 99, epoch: 2, index: 11)], into: $0.baseAddress!)
            }
            return (out, labels)
        }()
        for c in 0..<3 { #expect(Array(plane(a, c: c, n: 1, batch: 3)) == Array(plane(explicit, c: c, n: 0, batch: 1))) }
        // With augmentation off the output equals plain normalisation.
        let (plain, _) = assemble(data, [11])
        let img = Array(data.image(11))
        #expect(plain == (0..<3072).map { Normalization.normalize(img[$0], channel: $0 / 1024) })
    }

    @Test func bilinearUpsamplingMatchesPyTorch() {
        // F.interpolate(torch.tensor([[[[0., 1.], [2., 3.]]]]), size=4, mode="bilinear", align_corners=False)
        let src: [Float] = [0, 1, 2, 3]
        var dst = [Float](repeating: .nan, count: 16)
        src.withUnsafeBufferPointer { s in
            dst.withUnsafeMutableBufferPointer { upsampleBilinear(s.baseAddress!, planes: 1, from: 2, to: 4, into: $0.baseAddress!) }
        }
        #expect(dst == [0, 0.25, 0.75, 1, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2, 2.25, 2.75, 3])

        // Several planes, same size in and out: a copy; a constant plane stays constant when enlarged.
        let planes: [Float] = (0..<(3 * 32 * 32)).map { Float($0 % 97) }
        var same = [Float](repeating: .nan, count: planes.count)
        var big = [Float](repeating: .nan, count: 3 * 70 * 70)
        let constant = [Float](repeating: 2.5, count: 3 * 32 * 32)
        planes.withUnsafeBufferPointer { s in
            same.withUnsafeMutableBufferPointer { upsampleBilinear(s.baseAddress!, planes: 3, from: 32, to: 32, into: $0.baseAddress!) }
        }
        constant.withUnsafeBufferPointer { s in
            big.withUnsafeMutableBufferPointer { upsampleBilinear(s.baseAddress!, planes: 3, from: 32, to: 70, into: $0.baseAddress!) }
        }
        #expect(same == planes)
        #expect(big.allSatisfy { $0 == 2.5 })
    }
}
