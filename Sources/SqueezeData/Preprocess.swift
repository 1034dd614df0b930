import SqueezeEngine

/// Per-channel normalisation of CIFAR-10 pixels, as torchvision's `ToTensor()` then
/// `Normalize(mean, std)`: `value = (byte / 255 − mean[c]) / std[c]`, computed in Float.
public enum Normalization {
    public static let mean = ModelConfig.engineInputMean
    public static let std = ModelConfig.engineInputStd

    /// The normalised value of `byte` in channel `c` (0 = red, 1 = green, 2 = blue).
    public static func normalize(_ byte: UInt8, channel c: Int) -> Float {
        (Float(byte) / 255 - mean[c]) / std[c]
    }

    /// `table[c * 256 + byte]` = `normalize(byte, channel: c)`; padding pixels are `table[c * 256]`.
    static let table: [Float] = (0..<3).flatMap { c in (0..<256).map { normalize(UInt8($0), channel: c) } }
}

/// How training images are flipped left–right: `random` (each image with probability ½ in each epoch,
/// torchvision's `RandomHorizontalFlip`), `alternating` (airbench's derandomised flips: each image in
/// every other epoch, which of the two drawn once per image) or `none`.
public enum FlipMode: String, Codable, Sendable, CaseIterable {
    case random, alternating, none
}

/// One image's augmentation, as torchvision's `RandomCrop(32, padding: 4)` then
/// `RandomHorizontalFlip(p: 0.5)`: the image is zero-padded by 4 pixels on every side (in pixel
/// space, so a padded pixel normalises to `(0 − mean) / std`), a 32×32 window at rows
/// `offsetY ..< offsetY + 32` and columns `offsetX ..< offsetX + 32` of the 40×40 padded image is
/// kept, and then, if `flip`, mirrored left–right.
///
/// Output pixel (y, x) is therefore input pixel (y + offsetY − 4, x′ + offsetX − 4) with
/// x′ = flip ? 31 − x : x, or padding when that falls outside 0..<32.
///
/// Optionally followed by Cutout (DeVries & Taylor, 2017): a `cutout.size`-pixel square centred at
/// output pixel (cutout.y, cutout.x), clipped at the border, is set to 0 after normalisation (the
/// data set's mean colour), as their reference code does.
public struct CropFlip: Equatable, Sendable {
    /// Crop offsets in the padded image, 0...8 (4 = no shift).
    public var offsetY: Int
    public var offsetX: Int
    public var flip: Bool
    public var cutout: Cutout?

    public struct Cutout: Equatable, Sendable {
        /// Centre (output row and column, 0..<32) and side of the square.
        public var y: Int, x: Int, size: Int
        public init(y: Int, x: Int, size: Int) { self.y = y; self.x = x; self.size = size }
        /// Rows (or columns) covered around centre `c`: c − size/2 ..< c − size/2 + size, clipped.
        func span(_ c: Int) -> Range<Int> { max(c - size / 2, 0)..<min(max(c - size / 2 + size, 0), CIFAR10.imageSide) }
    }

    public init(offsetY: Int, offsetX: Int, flip: Bool, cutout: Cutout? = nil) {
        precondition((0...8).contains(offsetY) && (0...8).contains(offsetX), "crop offsets are in 0...8")
        self.offsetY = offsetY
        self.offsetX = offsetX
        self.flip = flip
        self.cutout = cutout
    }

    /// No augmentation.
    public static let identity = CropFlip(offsetY: 4, offsetX: 4, flip: false)

    /// The random augmentation of data set record `index` in `epoch`: a pure function of
    /// (seed, epoch, index), so it does not depend on which worker assembles the record or on what
    /// was drawn before (exact resume, and N workers reproduce a single process). With
    /// `cutout` > 0 a Cutout square of that side follows, its centre drawn after the crop and flip
    /// (which are therefore the same with and without it).
    ///
    /// The crop shifts the image by −`translate`…`translate` pixels in each direction (offsets
    /// 4 − translate … 4 + translate, uniformly; 4, the default, is `RandomCrop(32, padding: 4)`).
    /// With `flip` = `.alternating` record i is mirrored in the epochs where epoch + p(i) is odd, with
    /// p(i) ∈ {0, 1} drawn from (seed, i) alone (`flipParity`).
    public static func random(seed: UInt64, epoch: Int, index: Int, cutout: Int = 0, translate: Int = 4,
                              flip mode: FlipMode = .random) -> CropFlip {
        precondition((0...4).contains(translate), "translate is in 0...4 pixels")
        var rng = SeededRNG(seed: seed, stream: streamID(epoch: epoch, index: index))
        let offsetY = 4 - translate + rng.below(2 * translate + 1)
        let offsetX = 4 - translate + rng.below(2 * translate + 1)
        var flip = rng.below(2) == 1
        switch mode {
        case .random: break
        case .alternating: flip = (epoch + flipParity(seed: seed, index: index)) % 2 == 1
        case .none: flip = false
        }
        guard cutout > 0 else { return CropFlip(offsetY: offsetY, offsetX: offsetX, flip: flip) }
        let y = rng.below(CIFAR10.imageSide), x = rng.below(CIFAR10.imageSide)
        return CropFlip(offsetY: offsetY, offsetX: offsetX, flip: flip, cutout: Cutout(y: y, x: x, size: cutout))
    }

    /// The epoch parity (0 or 1) in which `.alternating` flips record `index` first: one draw from
    /// (seed, index) alone, so every epoch of every rank agrees on it.
    public static func flipParity(seed: UInt64, index: Int) -> Int {
        var rng = SeededRNG(seed: seed, stream: streamID(epoch: 0, index: index, tag: 0x464C_4950_5041_5231))  // "FLIPPAR1"
        return rng.below(2)
    }

    /// Mixes (epoch, index) into one stream number (SplitMix64 finaliser over a pair tagged with the
    /// purpose, "AUGMENT1" by default), so that neighbouring records and epochs get unrelated streams.
    static func streamID(epoch: Int, index: Int, tag: UInt64 = 0x4155_474D_454E_5431) -> UInt64 {
        func mix(_ v: UInt64) -> UInt64 {
            var x = v &+ 0x9E37_79B9_7F4A_7C15
            x = (x ^ (x >> 30)) &* 0xBF58_476D_1CE4_E5B9
            x = (x ^ (x >> 27)) &* 0x94D0_49BB_1331_11EB
            return x ^ (x >> 31)
        }
        return mix(mix(tag ^ UInt64(truncatingIfNeeded: epoch)) ^ UInt64(truncatingIfNeeded: index))
    }
}

extension CIFAR10 {
    /// Fills `images` with the records at `indices`, normalised and (optionally) augmented, and
    /// returns their labels.
    ///
    /// `images` must have room for `3 × N × 32 × 32` Floats (N = `indices.count`) and receives them
    /// CHANNEL-MAJOR, shape (C, N, H, W): element [c][n][h][w] is at `((c * N + n) * 32 + h) * 32 + w`.
    /// Batch slot n holds record `indices[n]` and the returned `labels[n]` is its class.
    ///
    /// With `augmentSeed` nil, no augmentation. Otherwise record i gets
    /// `CropFlip.random(seed: augmentSeed, epoch: epoch, index: i, cutout: cutout, translate: translate, flip: flip)`.
    @discardableResult
    public func fillBatch(
        indices: [Int], epoch: Int = 0, augmentSeed: UInt64? = nil, cutout: Int = 0, translate: Int = 4, flip: FlipMode = .random,
        into images: UnsafeMutablePointer<Float>
    ) throws -> [Int32] {
        let transforms = augmentSeed.map { seed in
            indices.map { CropFlip.random(seed: seed, epoch: epoch, index: $0, cutout: cutout, translate: translate, flip: flip) }
        }
        return try fillBatch(indices: indices, transforms: transforms, into: images)
    }

    /// As `fillBatch(indices:epoch:augmentSeed:into:)`, with each slot's augmentation given
    /// explicitly (`transforms[n]` for slot n; nil for none). Throws `DataError.recordOutOfRange`
    /// (before writing anything) for an index outside the data set.
    @discardableResult
    public func fillBatch(indices: [Int], transforms: [CropFlip]?, into images: UnsafeMutablePointer<Float>) throws -> [Int32] {
        precondition(transforms == nil || transforms!.count == indices.count, "one transform per index")
        if let bad = indices.first(where: { !(0..<count).contains($0) }) {
            throw DataError.recordOutOfRange(record: bad, count: count)
        }
        let n = indices.count
        let plane = Self.imageSide * Self.imageSide
        var labels = [Int32](repeating: 0, count: n)
        self.images.withUnsafeBufferPointer { all in
            Normalization.table.withUnsafeBufferPointer { table in
                for (slot, record) in indices.enumerated() {
                    labels[slot] = Int32(self.labels[record])
                    let src = all.baseAddress! + record * Self.imageBytes
                    for c in 0..<Self.channels {
                        let dst = images + (c * n + slot) * plane
                        let lut = table.baseAddress! + c * 256
                        let srcPlane = src + c * plane
                        if let t = transforms?[slot], t != .identity {
                            writeAugmented(srcPlane, t, lut, dst)
                        } else {
                            for p in 0..<plane { dst[p] = lut[Int(srcPlane[p])] }
                        }
                    }
                }
            }
        }
        return labels
    }
}

/// Writes one 32×32 plane, cropped from the zero-padded source and maybe flipped, through `lut`.
@inline(__always)
private func writeAugmented(
    _ src: UnsafePointer<UInt8>, _ t: CropFlip, _ lut: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<Float>
) {
    let side = CIFAR10.imageSide
    let pad = lut[0]
    let dy = t.offsetY - 4, dx = t.offsetX - 4
    for y in 0..<side {
        let row = dst + y * side
        let sy = y + dy
        guard sy >= 0 && sy < side else {
            row.update(repeating: pad, count: side)
            continue
        }
        let srcRow = src + sy * side
        for x in 0..<side {
            let sx = (t.flip ? side - 1 - x : x) + dx
            row[x] = (sx >= 0 && sx < side) ? lut[Int(srcRow[sx])] : pad
        }
    }
    if let cut = t.cutout {
        let columns = cut.span(cut.x)
        for y in cut.span(cut.y) { (dst + y * side + columns.lowerBound).update(repeating: 0, count: columns.count) }
    }
}

/// Bilinear resize of `planes` square planes from `from`×`from` to `to`×`to`, as PyTorch's
/// `F.interpolate(mode: "bilinear", align_corners: false)`: output pixel centre (y + 0.5) maps to
/// input coordinate `(y + 0.5) * from / to − 0.5`, clamped at 0, blending the two nearest rows
/// (and columns), the upper neighbour clamped at the edge.
///
/// A (C, N, H, W) batch is `C × N` planes, so the channel-major layout is kept. The resize is
/// affine-preserving, so it may be applied before or after normalisation with the same result.
/// `dst` must hold `planes × to × to` Floats and must not overlap `src`.
public func upsampleBilinear(
    _ src: UnsafePointer<Float>, planes: Int, from: Int, to: Int, into dst: UnsafeMutablePointer<Float>
) {
    precondition(from > 0 && to > 0)
    // Per output coordinate: lower source index, upper source index, weight of the upper one.
    var lo = [Int](repeating: 0, count: to), hi = lo
    var w = [Float](repeating: 0, count: to)
    let scale = Float(from) / Float(to)
    for o in 0..<to {
        let s = max((Float(o) + 0.5) * scale - 0.5, 0)
        let l = min(Int(s), from - 1)
        lo[o] = l
        hi[o] = min(l + 1, from - 1)
        w[o] = s - Float(l)
    }
    lo.withUnsafeBufferPointer { lo in
        hi.withUnsafeBufferPointer { hi in
            w.withUnsafeBufferPointer { w in
                for p in 0..<planes {
                    let s = src + p * from * from
                    let d = dst + p * to * to
                    for y in 0..<to {
                        let r0 = s + lo[y] * from, r1 = s + hi[y] * from
                        let wy = w[y]
                        let out = d + y * to
                        for x in 0..<to {
                            let a = r0[lo[x]] + (r0[hi[x]] - r0[lo[x]]) * w[x]
                            let b = r1[lo[x]] + (r1[hi[x]] - r1[lo[x]]) * w[x]
                            out[x] = a + (b - a) * wy
                        }
                    }
                }
            }
        }
    }
}
