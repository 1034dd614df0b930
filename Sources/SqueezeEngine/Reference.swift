/// Plain reference kernels: direct loops, no GEMM, no workspace, generic over the float type so that
/// tests can run them in Double for finite-difference checks and compare the fast kernels against them.
/// `@inlinable` so that the tests specialise them for their float type (unspecialised generic
/// arithmetic is about a hundred times slower).
/// Layout: channel-major (C, N, H, W) as everywhere in the engine; weights (Cout, Cin, k, k).
public enum Reference {
    @inlinable public static func conv2d<T: BinaryFloatingPoint>(_ x: [T], _ s: Shape, weight: [T], bias: [T], cout: Int,
                                                      kernel k: Int, stride: Int, padding p: Int) -> (y: [T], shape: Shape) {
        let ho = (s.h + 2 * p - k) / stride + 1, wo = (s.w + 2 * p - k) / stride + 1
        let ys = Shape(c: cout, n: s.n, h: ho, w: wo)
        var y = [T](repeating: 0, count: ys.count)
        for co in 0..<cout {
            for n in 0..<s.n {
                for oh in 0..<ho {
                    for ow in 0..<wo {
                        var acc = bias[co]
                        for ci in 0..<s.c {
                            for i in 0..<k {
                                for j in 0..<k {
                                    let ih = oh * stride + i - p, iw = ow * stride + j - p
                                    guard ih >= 0, ih < s.h, iw >= 0, iw < s.w else { continue }
                                    acc += weight[((co * s.c + ci) * k + i) * k + j] * x[((ci * s.n + n) * s.h + ih) * s.w + iw]
                                }
                            }
                        }
                        y[((co * s.n + n) * ho + oh) * wo + ow] = acc
                    }
                }
            }
        }
        return (y, ys)
    }

    @inlinable public static func conv2dBackward<T: BinaryFloatingPoint>(_ x: [T], _ s: Shape, weight: [T], dy: [T], cout: Int,
                                                              kernel k: Int, stride: Int, padding p: Int)
        -> (dx: [T], dw: [T], db: [T]) {
        let ho = (s.h + 2 * p - k) / stride + 1, wo = (s.w + 2 * p - k) / stride + 1
        var dx = [T](repeating: 0, count: x.count), dw = [T](repeating: 0, count: weight.count)
        var db = [T](repeating: 0, count: cout)
        for co in 0..<cout {
            for n in 0..<s.n {
                for oh in 0..<ho {
                    for ow in 0..<wo {
                        let g = dy[((co * s.n + n) * ho + oh) * wo + ow]
                        db[co] += g
                        for ci in 0..<s.c {
                            for i in 0..<k {
                                for j in 0..<k {
                                    let ih = oh * stride + i - p, iw = ow * stride + j - p
                                    guard ih >= 0, ih < s.h, iw >= 0, iw < s.w else { continue }
                                    let xi = ((ci * s.n + n) * s.h + ih) * s.w + iw, wi = ((co * s.c + ci) * k + i) * k + j
                                    dw[wi] += g * x[xi]
                                    dx[xi] += g * weight[wi]
                                }
                            }
                        }
                    }
                }
            }
        }
        return (dx, dw, db)
    }

    @inlinable public static func relu<T: BinaryFloatingPoint>(_ x: [T]) -> [T] { x.map { max($0, 0) } }
    @inlinable public static func reluBackward<T: BinaryFloatingPoint>(_ y: [T], dy: [T]) -> [T] { zip(y, dy).map { $0 > 0 ? $1 : 0 } }

    /// Max pooling, PyTorch ceil_mode=True, no padding. Ties go to the first maximum in scan order.
    @inlinable public static func maxPool<T: BinaryFloatingPoint>(_ x: [T], _ s: Shape, kernel k: Int, stride st: Int)
        -> (y: [T], shape: Shape, argmax: [Int]) {
        func out(_ n: Int) -> Int {
            var o = (n - k + st - 1) / st + 1
            if (o - 1) * st >= n { o -= 1 }
            return o
        }
        let ys = Shape(c: s.c, n: s.n, h: out(s.h), w: out(s.w))
        var y = [T](repeating: 0, count: ys.count), arg = [Int](repeating: 0, count: ys.count)
        for plane in 0..<(s.c * s.n) {
            for oh in 0..<ys.h {
                for ow in 0..<ys.w {
                    var best = -T.infinity, at = 0
                    for ih in (oh * st)..<min(oh * st + k, s.h) {
                        for iw in (ow * st)..<min(ow * st + k, s.w) {
                            let idx = (plane * s.h + ih) * s.w + iw
                            if x[idx] > best { best = x[idx]; at = idx }
                        }
                    }
                    let o = (plane * ys.h + oh) * ys.w + ow
                    y[o] = best; arg[o] = at
                }
            }
        }
        return (y, ys, arg)
    }

    @inlinable public static func maxPoolBackward<T: BinaryFloatingPoint>(dy: [T], argmax: [Int], inputCount: Int) -> [T] {
        var dx = [T](repeating: 0, count: inputCount)
        for (o, i) in argmax.enumerated() { dx[i] += dy[o] }
        return dx
    }

    @inlinable public static func globalAvgPool<T: BinaryFloatingPoint>(_ x: [T], _ s: Shape) -> [T] {
        (0..<(s.c * s.n)).map { i in x[(i * s.plane)..<((i + 1) * s.plane)].reduce(0, +) / T(s.plane) }
    }

    @inlinable public static func globalAvgPoolBackward<T: BinaryFloatingPoint>(dy: [T], _ s: Shape) -> [T] {
        (0..<s.count).map { dy[$0 / s.plane] / T(s.plane) }
    }

    /// Mean softmax cross-entropy over logits (K, N) against targets smoothed by `eps`
    /// (q = (1 − eps)·onehot + eps/K), and its gradient.
    @inlinable public static func softmaxCrossEntropy<T: BinaryFloatingPoint>(_ logits: [T], classes k: Int, labels: [Int], labelSmoothing eps: T = 0)
        -> (loss: T, gradient: [T]) where T: ExpressibleByFloatLiteral {
        let n = labels.count
        var loss: T = 0
        var g = [T](repeating: 0, count: logits.count)
        for j in 0..<n {
            let top = (0..<k).map { logits[$0 * n + j] }.max()!
            let e = (0..<k).map { T(exp(Double(logits[$0 * n + j] - top))) }
            let sum = e.reduce(0, +)
            let q = (0..<k).map { (c: Int) -> T in (c == labels[j] ? 1 - eps : 0) + eps / T(k) }
            for c in 0..<k { loss -= q[c] * (logits[c * n + j] - top - T(log(Double(sum)))) }
            for c in 0..<k { g[c * n + j] = (e[c] / sum - q[c]) / T(n) }
        }
        return (loss / T(n), g)
    }

    /// BatchNorm2d in training mode (batch statistics, biased variance) on (C, M) rows.
    @inlinable public static func batchNorm<T: BinaryFloatingPoint>(_ z: [T], channels: Int, gamma: [T], beta: [T], eps: T) -> [T] {
        let m = z.count / channels
        var y = z
        for c in 0..<channels {
            let row = z[(c * m)..<((c + 1) * m)]
            let mean = row.reduce(0, +) / T(m)
            let variance = row.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / T(m)
            let inv = 1 / (variance + eps).squareRoot()
            for i in 0..<m { y[c * m + i] = gamma[c] * (z[c * m + i] - mean) * inv + beta[c] }
        }
        return y
    }
}

#if canImport(Glibc)
import Glibc
#endif
