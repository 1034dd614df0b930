import Foundation

/// The arithmetic of the convolution/GEMM inputs.
///
/// `fp32`: everything in float32 (the reference numerics).
/// `bf16`: as `torch.autocast("cpu", dtype=torch.bfloat16)` does it — both inputs of every
/// convolution GEMM (forward W·col, backward dz·colᵀ and Wᵀ·dz) are rounded to bfloat16 (nearest,
/// ties to even) and multiplied with float32 accumulation into float32 outputs. Master weights,
/// gradients, the optimizer, BatchNorm (statistics and normalisation), bias/ReLU, pooling, softmax
/// and the loss stay float32, so the gradient buffer (and the all-reduce's bytes) do not change.
public enum Precision: String, Codable, Sendable, CaseIterable {
    case fp32, bf16
}

/// CPU features read from the kernel's view of the CPU.
public enum CPUFeatures {
    /// The `flags` line of /proc/cpuinfo (empty when unreadable).
    public static let flags: Set<Substring> = {
        guard let text = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("flags") }),
              let colon = line.firstIndex(of: ":") else { return [] }
        return Set(line[line.index(after: colon)...].split(separator: " "))
    }()

    /// AVX512_BF16 (`avx512_bf16`): native bf16 dot products. Without it oneDNN 2.6 has no bf16
    /// GEMM on AVX2 machines and emulates it 3–4× slower on AVX-512 ones.
    public static var hasAVX512BF16: Bool { flags.contains("avx512_bf16") }
}

/// bfloat16 rounding: the upper 16 bits of a float32, rounded to nearest with ties to even
/// (NaN stays NaN), as oneDNN's and PyTorch's conversions.
@inline(__always) func bf16Bits(_ x: Float) -> UInt16 {
    let bits = x.bitPattern
    if x.isNaN { return UInt16(truncatingIfNeeded: bits >> 16) | 0x40 }
    return UInt16(truncatingIfNeeded: (bits &+ 0x7FFF &+ ((bits >> 16) & 1)) >> 16)
}

/// `x` rounded to the nearest bfloat16, as a float32 (exact: bf16 is float32's upper half).
@inline(__always) public func roundedToBF16(_ x: Float) -> Float { Float(bitPattern: UInt32(bf16Bits(x)) << 16) }

extension Kernels {
    /// dst[i] = roundedToBF16(src[i]) over 0..<count, sixteen lanes at a time (NaN inputs aside,
    /// which stay NaN through the scalar tail's rule only; training data has none).
    @inline(never) static func roundToBF16(_ src: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<Float>, count: Int) {
        typealias V = SIMD16<UInt32>
        parallelFor(count / 16, minimumPerThread: 4096) { blocks in
            for blk in blocks {
                let bits = UnsafeRawPointer(src + blk * 16).loadUnaligned(as: V.self)
                let r = (bits &+ V(repeating: 0x7FFF) &+ ((bits &>> 16) & V(repeating: 1))) & V(repeating: 0xFFFF_0000)
                UnsafeMutableRawPointer(dst + blk * 16).storeBytes(of: r, as: V.self)
            }
        }
        for i in (count / 16 * 16)..<count { dst[i] = roundedToBF16(src[i]) }
    }
}

/// C = op(A)·op(B) + beta·C with both inputs rounded to bfloat16 and float32 accumulation.
///
/// The inputs are rounded into float32 scratch buffers (bf16 values are exact in float32) and
/// multiplied by oneDNN's sgemm: the same products as a bf16 GEMM with float32 accumulation, up
/// to summation order. On this project's machines (AVX2, no AVX512_BF16) oneDNN 2.6 has no bf16
/// GEMM at all, so this is the only bf16 path that runs here; the command-line tools fall back to
/// fp32 on such CPUs (see `Precision`), and this path serves the bf16 tests.
final class MixedPrecisionGEMM {
    private let roundedA = FloatBuffer(), roundedB = FloatBuffer()

    func gemm(transA: Bool = false, transB: Bool = false, m: Int, n: Int, k: Int,
              a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int,
              beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int) {
        // Stored extents: op(A) is m×k, so A has (transA ? k : m) rows of lda; likewise B.
        let aCount = ((transA ? k : m) - 1) * lda + (transA ? m : k)
        let bCount = ((transB ? n : k) - 1) * ldb + (transB ? k : n)
        let ra = roundedA.reserve(aCount), rb = roundedB.reserve(bCount)
        Kernels.roundToBF16(a, ra, count: aCount)
        Kernels.roundToBF16(b, rb, count: bCount)
        SqueezeEngine.gemm(transA: transA, transB: transB, m: m, n: n, k: k, a: ra, lda: lda, b: rb, ldb: ldb,
                           beta: beta, c: c, ldc: ldc)
    }
}
