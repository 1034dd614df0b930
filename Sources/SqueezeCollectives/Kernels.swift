// Element-wise Float loops used by the reductions.
//
// Sources are raw pointers into received messages, which need not be 4-byte aligned
// (ZeroMQ may place a small frame anywhere inside its receive batch), and destinations
// may in principle alias them, so the auto-vectoriser gives up on the plain loops. These
// loops therefore work in explicit SIMD16<Float> blocks with unaligned loads and stores,
// then finish the tail element by element. Every lane does exactly the scalar IEEE
// operation, so results are bit-identical to the naive loops (checked in KernelTests).
//
// Below them: the codecs of compressed payloads (fp16, bf16, int8) and the top-k selection
// and pair arithmetic of sparse ones.

import SqueezeTransport

enum FloatKernels {
    typealias Block = SIMD16<Float>
    static let width = Block.scalarCount

    /// dst[i] += src[i]
    static func add(_ dst: UnsafeMutablePointer<Float>, _ src: UnsafeRawPointer, count n: Int) {
        let d = UnsafeMutableRawPointer(dst)
        var i = 0
        while i &+ width <= n {
            let o = i &* 4
            let sum = d.loadUnaligned(fromByteOffset: o, as: Block.self) + src.loadUnaligned(fromByteOffset: o, as: Block.self)
            d.storeBytes(of: sum, toByteOffset: o, as: Block.self)
            i &+= width
        }
        while i < n {
            dst[i] += src.loadUnaligned(fromByteOffset: i &* 4, as: Float.self)
            i &+= 1
        }
    }

    /// dst[i] = (dst[i] + src[i]) / divisor   — the last reduction step, fused with averaging.
    static func addAndDivide(_ dst: UnsafeMutablePointer<Float>, _ src: UnsafeRawPointer, count n: Int, divisor: Float) {
        let d = UnsafeMutableRawPointer(dst)
        let q = Block(repeating: divisor)
        var i = 0
        while i &+ width <= n {
            let o = i &* 4
            let sum = d.loadUnaligned(fromByteOffset: o, as: Block.self) + src.loadUnaligned(fromByteOffset: o, as: Block.self)
            d.storeBytes(of: sum / q, toByteOffset: o, as: Block.self)
            i &+= width
        }
        while i < n {
            dst[i] = (dst[i] + src.loadUnaligned(fromByteOffset: i &* 4, as: Float.self)) / divisor
            i &+= 1
        }
    }

    /// dst[i] = src[i] / divisor
    static func divide(_ dst: UnsafeMutablePointer<Float>, _ src: UnsafeRawPointer, count n: Int, divisor: Float) {
        let d = UnsafeMutableRawPointer(dst)
        let q = Block(repeating: divisor)
        var i = 0
        while i &+ width <= n {
            let o = i &* 4
            d.storeBytes(of: src.loadUnaligned(fromByteOffset: o, as: Block.self) / q, toByteOffset: o, as: Block.self)
            i &+= width
        }
        while i < n {
            dst[i] = src.loadUnaligned(fromByteOffset: i &* 4, as: Float.self) / divisor
            i &+= 1
        }
    }

    /// dst[i] = src[i]
    static func copy(_ dst: UnsafeMutablePointer<Float>, _ src: UnsafeRawPointer, count n: Int) {
        if n > 0 { UnsafeMutableRawPointer(dst).copyMemory(from: src, byteCount: n &* 4) }
    }
}

// MARK: - Compressed payloads

/// The dense encodings of compressed collectives: how a run of Floats becomes a payload and
/// back. Encoding rounds to nearest, ties to even, and decoding depends on the bytes alone, so
/// ranks that decode the same message get the same bits. Payloads are little-endian and need
/// not be aligned. Scalar loops of about 1 ns per element (int8: 3 ns) for bf16 and fp16
/// alike: fp16 is converted with integer operations, since without F16C in the baseline
/// x86-64 target Swift's Float16 conversions are library calls, 3–8 times slower.
enum DenseCodec {
    case float16, bfloat16, int8

    /// The codec of a dense compressed setting; nil for none (sent as is) and topk (sparse).
    init?(_ compression: GradientCompression) {
        switch compression {
        case .fp16: self = .float16
        case .bf16: self = .bfloat16
        case .int8: self = .int8
        case .none, .topk: return nil
        }
    }

    var encoding: WireHeader.Encoding {
        switch self {
        case .float16: .float16
        case .bfloat16: .bfloat16
        case .int8: .int8
        }
    }

    func payloadBytes(count: Int) -> Int { encoding.payloadBytes(count: count) }

    /// Writes `payloadBytes(count)` bytes encoding src[0..<count] to `dst`.
    func encode(_ src: UnsafePointer<Float>, count n: Int, into dst: UnsafeMutableRawPointer) {
        switch self {
        case .float16:
            for i in 0..<n { dst.storeBytes(of: DenseCodec.float16Bits(src[i]).littleEndian, toByteOffset: 2 &* i, as: UInt16.self) }
        case .bfloat16:
            for i in 0..<n { dst.storeBytes(of: DenseCodec.bfloat16Bits(src[i]).littleEndian, toByteOffset: 2 &* i, as: UInt16.self) }
        case .int8:
            // One scale per message: the largest magnitude maps to ±127. (max ignores NaN;
            // NaN and, with an infinite scale, everything else encode as 0: int8 cannot carry
            // them, and with error feedback they stay visible in the residual.)
            var largest: Float = 0
            for i in 0..<n { largest = max(largest, abs(src[i])) }
            let scale = largest / 127
            dst.storeBytes(of: scale.bitPattern.littleEndian, as: UInt32.self)
            let q = dst + MemoryLayout<Float>.size
            for i in 0..<n {
                let v = scale > 0 ? (src[i] / scale).rounded(.toNearestOrEven) : 0
                q.storeBytes(of: v.isNaN ? 0 : Int8(min(127, max(-127, v))), toByteOffset: i, as: Int8.self)
            }
        }
    }

    /// dst[i] = decoded[i], or dst[i] += decoded[i] when `adding`.
    func decode(_ src: UnsafeRawPointer, count n: Int, into dst: UnsafeMutablePointer<Float>, adding: Bool) {
        @inline(__always) func put(_ i: Int, _ v: Float) { if adding { dst[i] += v } else { dst[i] = v } }
        switch self {
        case .float16:
            for i in 0..<n {
                put(i, DenseCodec.float16Value(UInt16(littleEndian: src.loadUnaligned(fromByteOffset: 2 &* i, as: UInt16.self))))
            }
        case .bfloat16:
            for i in 0..<n {
                put(i, Float(bitPattern: UInt32(UInt16(littleEndian: src.loadUnaligned(fromByteOffset: 2 &* i, as: UInt16.self))) << 16))
            }
        case .int8:
            let scale = Float(bitPattern: UInt32(littleEndian: src.loadUnaligned(as: UInt32.self)))
            let q = src + MemoryLayout<Float>.size
            for i in 0..<n { put(i, Float(q.load(fromByteOffset: i, as: Int8.self)) * scale) }
        }
    }

    /// Error feedback around `encode`: x = values + residual is encoded into `dst`; `values`
    /// becomes what the receiver will decode, and `residual` what that left out, x − decoded.
    func encode(_ values: UnsafeMutablePointer<Float>, residual: UnsafeMutablePointer<Float>, count n: Int,
                into dst: UnsafeMutableRawPointer) {
        for i in 0..<n { residual[i] += values[i] }
        encode(residual, count: n, into: dst)
        decode(dst, count: n, into: values, adding: false)
        for i in 0..<n { residual[i] -= values[i] }
    }

    /// The IEEE half-precision number nearest to x (ties to even), as bits; the same as
    /// `Float16(x).bitPattern` for every Float but NaNs, whose payload is not kept.
    @inline(__always)
    static func float16Bits(_ x: Float) -> UInt16 {
        let bits = x.bitPattern, a = bits & 0x7FFF_FFFF
        let sign = UInt16(truncatingIfNeeded: (bits >> 16) & 0x8000)
        let magnitude: UInt32
        if a > 0x7F80_0000 {
            magnitude = 0x7E00  // NaN
        } else if a >= 0x3880_0000 {
            // A normal half (|x| ≥ 2^-14): rebias the exponent (127 → 15) and drop 13 significand
            // bits, rounding as in `bfloat16Bits`; from 65520 up this reaches infinity, 0x7C00.
            let t = a &- 0x3800_0000
            magnitude = min((t &+ 0x0FFF &+ ((t >> 13) & 1)) >> 13, 0x7C00)
        } else {
            // A subnormal half or zero, a multiple of 2^-24: adding 0.5 (whose ulp is 2^-24)
            // makes the FPU round |x| to that grid, and leaves the multiple in the low bits.
            magnitude = (Float(bitPattern: a) + 0.5).bitPattern &- 0x3F00_0000
        }
        return sign | UInt16(truncatingIfNeeded: magnitude)
    }

    /// The Float value of half-precision bits (exact).
    @inline(__always)
    static func float16Value(_ h: UInt16) -> Float {
        let h = UInt32(h), sign = (h & 0x8000) << 16, rest = h & 0x7FFF
        if rest >= 0x7C00 { return Float(bitPattern: sign | 0x7F80_0000 | (rest & 0x3FF) << 13) }  // ±inf, NaN
        // Exponent and significand moved into a Float's place keep their value up to the bias
        // difference, 2^(127−15); subnormal halves land on subnormal Floats and scale the same.
        return Float(bitPattern: sign | rest << 13) * 0x1p112
    }

    /// The bfloat16 nearest to x (ties to even), as bits: the Float's high half, rounded. A
    /// NaN stays a NaN (quiet) even when its payload bits are all in the dropped half.
    @inline(__always)
    static func bfloat16Bits(_ x: Float) -> UInt16 {
        let bits = x.bitPattern
        if x.isNaN { return UInt16(bits >> 16) | 0x0040 }
        // Adding just under half of the kept unit, plus the kept unit's lowest bit, carries
        // into the kept half exactly when the dropped half is above one half, or equal to it
        // with an odd kept half. A carry out of the significand correctly bumps the exponent
        // (up to infinity).
        return UInt16((bits &+ 0x7FFF &+ ((bits >> 16) & 1)) >> 16)
    }
}

/// Top-k selection for sparse compression, and the pair arithmetic of sparse vectors.
///
/// A pair is 8 bytes: a little-endian UInt32 index (relative to the start of the range) and a
/// little-endian Float value; a vector's pairs are in increasing index order.
enum SparseKernels {
    static let pairBytes = 8

    /// |x| as an integer that orders like |x|: the bits of a non-negative Float compare as
    /// its value does, and a NaN ranks above infinity (so it is sent, and shows, rather than
    /// breaking the selection's ordering).
    @inline(__always)
    static func magnitudeKey(_ x: Float) -> UInt32 { x.bitPattern & 0x7FFF_FFFF }

    /// The key of the k-th largest |x[i]| (1 ≤ k ≤ n), and how many of the entries with exactly
    /// that key belong to the top k (the others of the top k have larger keys).
    ///
    /// A radix selection on the 31-bit keys, 11 + 10 + 10 bits: each pass histograms the next
    /// digit of the keys that share the digits found so far and picks the digit where the
    /// count from the top reaches k. Three reads of x, no copy and no sort, which matters for
    /// a whole AlexNet gradient (57 million Floats).
    static func threshold(_ x: UnsafePointer<Float>, count n: Int, k: Int) -> (key: UInt32, ties: Int) {
        precondition(k >= 1 && k <= n)
        var prefix: UInt32 = 0  // the digits of the answer found so far
        var need = k            // how many entries sharing `prefix` still belong to the top k
        var histogram = [Int](repeating: 0, count: 1 << 11)
        for (shift, bits) in [(20, 11), (10, 10), (0, 10)] {
            let known = UInt32(shift + bits)  // key bits from here up are fixed by `prefix`
            let mask = UInt32(1 << bits - 1)
            for d in 0..<(1 << bits) { histogram[d] = 0 }
            histogram.withUnsafeMutableBufferPointer { h in
                for i in 0..<n {
                    let key = magnitudeKey(x[i])
                    if key >> known == prefix >> known { h[Int((key >> UInt32(shift)) & mask)] &+= 1 }
                }
            }
            var digit = Int(mask)
            while histogram[digit] < need {
                need -= histogram[digit]
                digit -= 1
            }
            prefix |= UInt32(digit) << UInt32(shift)
        }
        return (prefix, need)
    }

    /// Moves the (at most) k entries of largest magnitude out of x[0..<n] into `pairs`:
    /// writes them as pairs in index order, sets them to zero in x, and returns how many were
    /// written. Ties at the threshold go to the lower index, so the choice is deterministic.
    /// Entries that are zero carry nothing and are not written (fewer than k pairs then).
    static func extractTopK(_ x: UnsafeMutablePointer<Float>, count n: Int, k: Int, into pairs: UnsafeMutableRawPointer) -> Int {
        guard n > 0, k > 0 else { return 0 }
        let (t, ties) = threshold(x, count: n, k: min(k, n))
        var tiesLeft = ties, m = 0
        for i in 0..<n {
            let key = magnitudeKey(x[i])
            guard key > t || (key == t && tiesLeft > 0) else { continue }
            if key == t { tiesLeft -= 1 }
            guard key != 0 else { continue }
            pairs.storeBytes(of: UInt32(i).littleEndian, toByteOffset: m &* pairBytes, as: UInt32.self)
            pairs.storeBytes(of: x[i].bitPattern.littleEndian, toByteOffset: m &* pairBytes &+ 4, as: UInt32.self)
            x[i] = 0
            m += 1
        }
        return m
    }

    /// dst[index] += value for each of `count` pairs (indices already validated).
    static func add(_ pairs: UnsafeRawPointer, count: Int, into dst: UnsafeMutablePointer<Float>) {
        for j in 0..<count {
            let (index, value) = pair(pairs, j)
            dst[index] += value
        }
    }

    /// dst[index] = value for each of `count` pairs (indices already validated).
    static func assign(_ pairs: UnsafeRawPointer, count: Int, into dst: UnsafeMutablePointer<Float>) {
        for j in 0..<count {
            let (index, value) = pair(pairs, j)
            dst[index] = value
        }
    }

    /// Writes the nonzero entries of x[0..<n] as pairs (`pairs` must hold n of them) and
    /// returns how many.
    static func gatherNonzero(_ x: UnsafePointer<Float>, count n: Int, into pairs: UnsafeMutableRawPointer) -> Int {
        var m = 0
        for i in 0..<n where x[i] != 0 {
            pairs.storeBytes(of: UInt32(i).littleEndian, toByteOffset: m &* pairBytes, as: UInt32.self)
            pairs.storeBytes(of: x[i].bitPattern.littleEndian, toByteOffset: m &* pairBytes &+ 4, as: UInt32.self)
            m += 1
        }
        return m
    }

    @inline(__always)
    static func pair(_ pairs: UnsafeRawPointer, _ j: Int) -> (index: Int, value: Float) {
        let index = UInt32(littleEndian: pairs.loadUnaligned(fromByteOffset: j &* pairBytes, as: UInt32.self))
        let bits = UInt32(littleEndian: pairs.loadUnaligned(fromByteOffset: j &* pairBytes &+ 4, as: UInt32.self))
        return (Int(index), Float(bitPattern: bits))
    }
}
