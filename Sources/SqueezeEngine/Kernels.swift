import CDNNL

/// Compute threads (OpenMP): oneDNN's GEMMs and the element-wise kernels share them.
/// Call before training; our tools default to 1.
public enum ComputeThreads {
    public static func set(_ n: Int) {
        omp_set_num_threads(Int32(max(1, n)))
        count = max(1, n)
    }
    public static var current: Int { Int(omp_get_max_threads()) }
    nonisolated(unsafe) fileprivate static var count = Int(omp_get_max_threads())
}

/// Runs body over 0..<n split into one contiguous range per compute thread (OpenMP's team).
/// Work items must be independent; results then do not depend on the thread count.
@inline(__always)
func parallelFor(_ n: Int, minimumPerThread: Int = 1, _ body: (Range<Int>) -> Void) {
    let threads = min(ComputeThreads.count, n / max(minimumPerThread, 1))
    if threads <= 1 { body(0..<n); return }
    withoutActuallyEscaping(body) { body in
        var job = ParallelJob(count: n, body: body)
        withUnsafeMutablePointer(to: &job) { pointer in
            GOMP_parallel({ raw in
                let job = raw!.assumingMemoryBound(to: ParallelJob.self).pointee
                let t = Int(omp_get_thread_num()), team = Int(omp_get_num_threads())
                let lo = job.count * t / team, hi = job.count * (t + 1) / team
                if lo < hi { job.body(lo..<hi) }
            }, pointer, UInt32(threads), 0)
        }
    }
}

private struct ParallelJob {
    let count: Int
    let body: (Range<Int>) -> Void
}

/// Row-major single-precision GEMM through oneDNN:
/// C (m×n) = alpha · op(A) (m×k) · op(B) (k×n) + beta · C.
@inline(__always)
func gemm(transA: Bool = false, transB: Bool = false, m: Int, n: Int, k: Int,
          alpha: Float = 1, a: UnsafePointer<Float>, lda: Int,
          b: UnsafePointer<Float>, ldb: Int,
          beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int) {
    let status = dnnl_sgemm(transA ? 84 : 78, transB ? 84 : 78, Int64(m), Int64(n), Int64(k),
                            alpha, a, Int64(lda), b, Int64(ldb), beta, c, Int64(ldc))
    precondition(status == dnnl_success, "dnnl_sgemm failed with status \(status.rawValue) (m \(m) n \(n) k \(k))")
}

/// Fast kernels on channel-major data. Each has a plain reference in `Reference` that tests compare against.
enum Kernels {
    /// Output size of a convolution or (ceil-mode, PyTorch rule) pooling window along one axis.
    @inline(never) static func outputSize(_ input: Int, kernel: Int, stride: Int, padding: Int, ceilMode: Bool = false) -> Int {
        let span = input + 2 * padding - kernel
        precondition(span >= 0, "window \(kernel) larger than padded input \(input + 2 * padding)")
        var out = (ceilMode ? (span + stride - 1) / stride : span / stride) + 1
        // PyTorch: the last window must start inside the input or the left padding.
        if ceilMode && (out - 1) * stride >= input + padding { out -= 1 }
        return out
    }

    /// im2col: x (Cin, N, H, W) → col (Cin·k·k, N·Ho·Wo), row (ci·k + i)·k + j holding
    /// x[ci][n][oh·s + i − p][ow·s + j − p] (0 outside the image).
    @inline(never) static func im2col(_ x: Tensor, kernel k: Int, stride s: Int, padding p: Int, ho: Int, wo: Int,
                       col: UnsafeMutablePointer<Float>) {
        let (cin, n, h, w) = (x.shape.c, x.shape.n, x.shape.h, x.shape.w)
        let cols = n * ho * wo
        parallelFor(cin) { channels in
        for ci in channels {
            for i in 0..<k {
                for j in 0..<k {
                    var dst = col + ((ci * k + i) * k + j) * cols
                    // valid ow range: 0 ≤ ow·s + j − p < w
                    let owLo = j >= p ? 0 : (p - j + s - 1) / s
                    let owHi = min(wo, (w - 1 + p - j) / s + 1)  // exclusive
                    for b in 0..<n {
                        let plane = x.data + (ci * n + b) * h * w
                        for oh in 0..<ho {
                            let ih = oh * s + i - p
                            if ih < 0 || ih >= h || owHi <= owLo {
                                dst.update(repeating: 0, count: wo)
                            } else {
                                let row = plane + ih * w + (j - p)
                                if owLo > 0 { dst.update(repeating: 0, count: owLo) }
                                if s == 1 {
                                    (dst + owLo).update(from: row + owLo, count: owHi - owLo)
                                } else {
                                    for ow in owLo..<owHi { dst[ow] = row[ow * s] }
                                }
                                if owHi < wo { (dst + owHi).update(repeating: 0, count: wo - owHi) }
                            }
                            dst += wo
                        }
                    }
                }
            }
        }
        }
    }

    /// col2im: the adjoint of `im2col`; adds col (Cin·k·k, N·Ho·Wo) into dx (Cin, N, H, W).
    @inline(never) static func col2im(_ col: UnsafePointer<Float>, kernel k: Int, stride s: Int, padding p: Int, ho: Int, wo: Int,
                       into dx: Tensor) {
        let (cin, n, h, w) = (dx.shape.c, dx.shape.n, dx.shape.h, dx.shape.w)
        let cols = n * ho * wo
        parallelFor(cin) { channels in
        for ci in channels {
            for i in 0..<k {
                for j in 0..<k {
                    var src = col + ((ci * k + i) * k + j) * cols
                    let owLo = j >= p ? 0 : (p - j + s - 1) / s
                    let owHi = min(wo, (w - 1 + p - j) / s + 1)
                    for b in 0..<n {
                        let plane = dx.data + (ci * n + b) * h * w
                        for oh in 0..<ho {
                            let ih = oh * s + i - p
                            if ih >= 0 && ih < h && owLo < owHi {
                                let row = plane + ih * w + (j - p)
                                if s == 1 {
                                    for ow in owLo..<owHi { row[ow] += src[ow] }
                                } else {
                                    for ow in owLo..<owHi { row[ow * s] += src[ow] }
                                }
                            }
                            src += wo
                        }
                    }
                }
            }
        }
        }
    }

    /// y[c][·] = max(0, y[c][·] + bias[c]) (or without the ReLU), in place, rows of length `columns`.
    @inline(never) static func addBias(_ y: UnsafeMutablePointer<Float>, bias: UnsafePointer<Float>, rows: Int, columns: Int, relu: Bool) {
        parallelFor(rows, minimumPerThread: max(1, 4096 / max(columns, 1))) { range in
        for r in range {
            let row = y + r * columns
            let b = bias[r]
            if relu {
                for i in 0..<columns { row[i] = max(row[i] + b, 0) }
            } else {
                for i in 0..<columns { row[i] += b }
            }
        }
        }
    }

    /// Σ p[0..<n], with sixteen partial sums (SIMD) so that the reduction vectorises.
    @inline(__always) static func sum(_ p: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc = SIMD16<Float>(), i = 0
        while i + 16 <= n { acc += UnsafeRawPointer(p + i).loadUnaligned(as: SIMD16<Float>.self); i += 16 }
        var s = acc.sum()
        while i < n { s += p[i]; i += 1 }
        return s
    }

    /// Σ (p[i] − c)² over 0..<n (SIMD partial sums).
    @inline(__always) static func sumSquaredDeviation(_ p: UnsafePointer<Float>, _ n: Int, from c: Float) -> Float {
        var acc = SIMD16<Float>(), i = 0
        let cv = SIMD16<Float>(repeating: c)
        while i + 16 <= n {
            let d = UnsafeRawPointer(p + i).loadUnaligned(as: SIMD16<Float>.self) - cv
            acc += d * d
            i += 16
        }
        var s = acc.sum()
        while i < n { s += (p[i] - c) * (p[i] - c); i += 1 }
        return s
    }

    /// ReLU backward fused with the bias gradient: dy ← dy · [y > 0] (when `relu`), db[r] = Σ dy[r][·]
    /// (when `biasGrad` is given). Sixteen partial sums per row (SIMD), so the reduction vectorises.
    @inline(never) static func reluBackwardBiasGrad(_ dy: UnsafeMutablePointer<Float>, y: UnsafePointer<Float>, rows: Int, columns: Int,
                                     relu: Bool, biasGrad: UnsafeMutablePointer<Float>?) {
        typealias V = SIMD16<Float>
        let lanes = V.scalarCount
        parallelFor(rows, minimumPerThread: max(1, 4096 / max(columns, 1))) { range in
        for r in range {
            let g = dy + r * columns, o = y + r * columns
            var acc = V(), i = 0
            while i + lanes <= columns {
                var v = UnsafeRawPointer(g + i).loadUnaligned(as: V.self)
                if relu {
                    v.replace(with: 0, where: UnsafeRawPointer(o + i).loadUnaligned(as: V.self) .<= 0)
                    UnsafeMutableRawPointer(g + i).storeBytes(of: v, as: V.self)
                }
                acc += v
                i += lanes
            }
            var sum = acc.sum()
            while i < columns {
                if relu && o[i] <= 0 { g[i] = 0 }
                sum += g[i]
                i += 1
            }
            biasGrad?[r] = sum
        }
        }
    }

    /// Max pooling over each (c, n) plane; `argmax` (when given: training) records the winning offset
    /// within the input plane. Ties go to the first maximum in scan order (as PyTorch). Windows are
    /// clipped at the far edges (ceil mode).
    @inline(never) static func maxPoolForward(_ x: Tensor, kernel k: Int, stride s: Int, ho: Int, wo: Int,
                               y: UnsafeMutablePointer<Float>, argmax: UnsafeMutablePointer<Int32>?) {
        let (h, w) = (x.shape.h, x.shape.w)
        let planes = x.shape.c * x.shape.n
        parallelFor(planes, minimumPerThread: 16) { range in
        for pl in range {
            let src = x.data + pl * h * w
            let dst = y + pl * ho * wo, idx = argmax.map { $0 + pl * ho * wo }
            for oh in 0..<ho {
                let h0 = oh * s, rows = min(k, h - h0)
                for ow in 0..<wo {
                    let w0 = ow * s, cols = min(k, w - w0)
                    var at = h0 * w + w0
                    var best = src[at]
                    if rows == 3 && cols == 3 {
                        // unrolled 3×3 window, branch-free selects in scan order
                        for o in [1, 2, w, w + 1, w + 2, 2 * w, 2 * w + 1, 2 * w + 2] {
                            let p = h0 * w + w0 + o, v = src[p]
                            at = v > best ? p : at
                            best = v > best ? v : best
                        }
                    } else {
                        for i in 0..<rows {
                            for j in 0..<cols {
                                let p = (h0 + i) * w + w0 + j, v = src[p]
                                at = v > best ? p : at
                                best = v > best ? v : best
                            }
                        }
                    }
                    dst[oh * wo + ow] = best
                    idx?[oh * wo + ow] = Int32(at)
                }
            }
        }
        }
    }

    @inline(never) static func maxPoolBackward(_ dy: UnsafePointer<Float>, argmax: UnsafePointer<Int32>, planes: Int, outPlane: Int,
                                dx: UnsafeMutablePointer<Float>, inPlane: Int) {
        parallelFor(planes, minimumPerThread: 16) { range in
            (dx + range.lowerBound * inPlane).update(repeating: 0, count: range.count * inPlane)
            for pl in range {
                let g = dy + pl * outPlane, idx = argmax + pl * outPlane, d = dx + pl * inPlane
                for o in 0..<outPlane { d[Int(idx[o])] += g[o] }
            }
        }
    }
}
