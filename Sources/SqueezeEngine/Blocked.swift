/// Kernels on oneDNN's blocked activation layout (nChw8c on AVX2, nChw16c on AVX-512), in which a
/// training step keeps SqueezeNet's activations and gradients from the stem to the classifier
/// (docs/engine.md, "Blocked layouts"). Element [n][c][h][w] of a tensor with block B lives at
/// n·imageStride + ((c / B)·H·W + h·W + w)·B + c % B: every pixel holds B consecutive channels.
///
/// The kernels work on groups of 8 channels (one SIMD8 per pixel, B floats from one pixel to the
/// next), so one code path serves both blocks. A channel slice of a wider blocked tensor (the Fire
/// module's concat) is a `Tensor` with a larger `imageStride`; slices start at multiples of B.
/// Per-channel sums add each image's plane in Float lanes, then the images in Double.

typealias Lanes8 = SIMD8<Float>

extension Tensor {
    /// A dense blocked tensor of `shape` at `data`.
    init(blocked data: UnsafeMutablePointer<Float>, shape: Shape, block: Int) {
        precondition(shape.c % block == 0, "blocked layout: \(shape.c) channels are not a multiple of \(block)")
        self.init(data: data, shape: shape)
        self.block = block
        imageStride = shape.c * shape.plane
    }

    /// Channels `from ..< from + count` in either layout (blocked: both multiples of the block).
    func channels(_ from: Int, _ count: Int) -> Tensor {
        var t = self
        t.data += from * (block == 0 ? shape.columns : shape.plane)
        t.shape.c = count
        return t
    }

    var isDense: Bool { block == 0 || imageStride == shape.c * shape.plane }

    /// Blocked: channels 8g ..< 8g + 8 of image n at their first pixel; the next pixel is `block` floats on.
    @inline(__always) func group(_ g: Int, _ n: Int) -> UnsafeMutablePointer<Float> {
        let c = g * 8
        return data + n * imageStride + (c / block) * shape.plane * block + c % block
    }
}

@inline(__always) private func load(_ p: UnsafePointer<Float>) -> Lanes8 { UnsafeRawPointer(p).loadUnaligned(as: Lanes8.self) }
@inline(__always) private func store(_ v: Lanes8, _ p: UnsafeMutablePointer<Float>) { UnsafeMutableRawPointer(p).storeBytes(of: v, as: Lanes8.self) }

/// Eight Double sums, one per channel of a group.
struct GroupSums {
    var lanes = SIMD8<Double>()
    @inline(__always) mutating func add(_ v: Lanes8) { for l in 0..<8 { lanes[l] += Double(v[l]) } }
}

enum BlockedKernels {
    /// Runs `body(g)` for every group of 8 channels of `x`, split over the compute threads.
    @inline(__always) static func forEachGroup(_ x: Tensor, _ body: (Int) -> Void) {
        parallelFor(x.shape.c / 8) { groups in for g in groups { body(g) } }
    }

    /// Σ over images and pixels of f(pixel index, pointer offset) per channel of group g.
    @inline(__always) static func reduce(_ x: Tensor, _ g: Int, _ f: (Int, Int) -> Lanes8) -> GroupSums {
        var sums = GroupSums()
        for n in 0..<x.shape.n {
            var acc = Lanes8()
            for i in 0..<x.shape.plane { acc += f(n, i * x.block) }
            sums.add(acc)
        }
        return sums
    }

    /// `reduce` of two functions in one pass.
    @inline(__always) static func reduce2(_ x: Tensor, _ g: Int, _ f: (Int, Int) -> (Lanes8, Lanes8)) -> (GroupSums, GroupSums) {
        var sums = (GroupSums(), GroupSums())
        for n in 0..<x.shape.n {
            var acc = (Lanes8(), Lanes8())
            for i in 0..<x.shape.plane {
                let (a, b) = f(n, i * x.block)
                acc.0 += a; acc.1 += b
            }
            sums.0.add(acc.0); sums.1.add(acc.1)
        }
        return sums
    }

    /// y (blocked) = x (channel-major), same shape.
    static func toBlocked(_ x: Tensor, into y: Tensor) {
        let plane = x.shape.plane, columns = x.shape.columns
        forEachGroup(y) { g in
            for n in 0..<y.shape.n {
                let out = y.group(g, n)
                for l in 0..<8 {
                    let src = x.data + (g * 8 + l) * columns + n * plane
                    for i in 0..<plane { out[i * y.block + l] = src[i] }
                }
            }
        }
    }

    /// y (channel-major) = x (blocked), same shape.
    static func toChannelMajor(_ x: Tensor, into y: Tensor) {
        let plane = x.shape.plane, columns = x.shape.columns
        forEachGroup(x) { g in
            for n in 0..<x.shape.n {
                let src = x.group(g, n)
                for l in 0..<8 {
                    let out = y.data + (g * 8 + l) * columns + n * plane
                    for i in 0..<plane { out[i] = src[i * x.block + l] }
                }
            }
        }
    }

    /// y = max(0, z + bias) per channel (or without the ReLU); z dense, y possibly a slice (or z itself).
    static func addBias(_ z: Tensor, bias: UnsafePointer<Float>, relu: Bool, into y: Tensor) {
        forEachGroup(z) { g in
            let b = load(bias + g * 8)
            for n in 0..<z.shape.n {
                let src = z.group(g, n), dst = y.group(g, n)
                for i in 0..<z.shape.plane {
                    let v = load(src + i * z.block) + b
                    store(relu ? v.replacing(with: 0, where: v .< 0) : v, dst + i * y.block)
                }
            }
        }
    }

    /// dz = dy · [y > 0] (when `relu`), biasGrad = Σ dz per channel. dz dense (it may be dy itself).
    static func reluBackwardBiasGrad(_ dy: Tensor, y: Tensor, relu: Bool, into dz: Tensor, biasGrad: UnsafeMutablePointer<Float>) {
        forEachGroup(dz) { g in
            let sums = reduce(dz, g) { n, o in
                var v = load(dy.group(g, n) + o)
                if relu { v.replace(with: 0, where: load(y.group(g, n) + o) .<= 0) }
                store(v, dz.group(g, n) + o)
                return v
            }
            for l in 0..<8 { biasGrad[g * 8 + l] = Float(sums.lanes[l]) }
        }
    }

    /// y[0..<count] += x[0..<count] (count a multiple of 8).
    static func add(_ x: UnsafePointer<Float>, into y: UnsafeMutablePointer<Float>, count: Int) {
        parallelFor(count / 8, minimumPerThread: 2048) { range in
            for i in range { store(load(y + 8 * i) + load(x + 8 * i), y + 8 * i) }
        }
    }

    /// Max pooling without padding (windows clipped at the far edges: ceil mode); `argmax` receives, per
    /// output element in y's layout, the winning pixel of the input plane. Ties go to the first
    /// maximum in scan order (as PyTorch).
    static func maxPoolForward(_ x: Tensor, kernel k: Int, stride s: Int, into y: Tensor, argmax: UnsafeMutablePointer<Int32>) {
        let (h, w, wo) = (x.shape.h, x.shape.w, y.shape.w)
        forEachGroup(x) { g in
            for n in 0..<x.shape.n {
                let src = x.group(g, n), dst = y.group(g, n)
                let idx = argmax + (dst - y.data)
                for oh in 0..<y.shape.h {
                    let h0 = oh * s, rows = min(k, h - h0)
                    for ow in 0..<wo {
                        let w0 = ow * s, cols = min(k, w - w0)
                        var best = load(src + (h0 * w + w0) * x.block)
                        var at = SIMD8<Int32>(repeating: Int32(h0 * w + w0))
                        for i in 0..<rows {
                            for j in 0..<cols {
                                let p = (h0 + i) * w + w0 + j, v = load(src + p * x.block)
                                let better = v .> best
                                best.replace(with: v, where: better)
                                at.replace(with: SIMD8(repeating: Int32(p)), where: better)
                            }
                        }
                        let o = (oh * wo + ow) * y.block
                        store(best, dst + o)
                        UnsafeMutableRawPointer(idx + o).storeBytes(of: at, as: SIMD8<Int32>.self)
                    }
                }
            }
        }
    }

    /// dx = Σ dy scattered to the arg-maxes of `maxPoolForward`.
    static func maxPoolBackward(_ dy: Tensor, argmax: UnsafePointer<Int32>, into dx: Tensor) {
        forEachGroup(dx) { g in
            for n in 0..<dx.shape.n {
                let src = dy.group(g, n), dst = dx.group(g, n)
                let idx = argmax + (src - dy.data)
                for i in 0..<dx.shape.plane { store(Lanes8(), dst + i * dx.block) }
                for o in 0..<dy.shape.plane {
                    for l in 0..<8 { dst[Int(idx[o * dy.block + l]) * dx.block + l] += src[o * dy.block + l] }
                }
            }
        }
    }
}

extension BatchNorm {
    /// `forward` on blocked z (dense) into y (dense or a channel slice): the same formulas per channel.
    func forward(blocked z: Tensor, into y: Tensor, training: Bool, relu: Bool, bias convBias: UnsafePointer<Float>) {
        let means = mean.reserve(channels), invStds = invStd.reserve(channels)
        let m = Double(z.shape.columns)
        let gamma = weight.value, beta = bias.value, runningMean = runningMean.value, runningVar = runningVar.value
        BlockedKernels.forEachGroup(z) { g in
            if training {
                let sums = BlockedKernels.reduce(z, g) { n, o in load(z.group(g, n) + o) }
                var mu = Lanes8()
                for l in 0..<8 { mu[l] = Float(sums.lanes[l] / m) }
                let q = BlockedKernels.reduce(z, g) { n, o in
                    let d = load(z.group(g, n) + o) - mu
                    return d * d
                }
                for l in 0..<8 {
                    let c = g * 8 + l, deviations = Float(q.lanes[l])
                    runningMean[c] = (1 - momentum) * runningMean[c] + momentum * (mu[l] + convBias[c])
                    runningVar[c] = (1 - momentum) * runningVar[c] + momentum * deviations / Float(max(Int(m) - 1, 1))
                    means[c] = mu[l]; invStds[c] = 1 / (deviations / Float(m) + eps).squareRoot()
                }
            } else {
                for c in (g * 8)..<(g * 8 + 8) {
                    means[c] = runningMean[c] - convBias[c]; invStds[c] = 1 / (runningVar[c] + eps).squareRoot()
                }
            }
            let scale = load(gamma + g * 8) * load(invStds + g * 8)
            let shift = load(beta + g * 8) - load(means + g * 8) * scale
            for n in 0..<z.shape.n {
                let src = z.group(g, n), dst = y.group(g, n)
                for i in 0..<z.shape.plane {
                    let v = load(src + i * z.block) * scale + shift
                    store(relu ? v.replacing(with: 0, where: v .< 0) : v, dst + i * y.block)
                }
            }
        }
    }

    /// `backward` on blocked tensors: dL/dy in `g` (dense or a channel slice), z dense; dL/dz is written
    /// over z (which the forward kept and nothing reads afterwards). Two passes per channel group.
    func backward(blocked g: Tensor, z: Tensor, reluOutput y: Tensor?, biasGrad: UnsafeMutablePointer<Float>) {
        let means = mean.pointer, invStds = invStd.pointer
        let gamma = weight.value, dgamma = weight.gradient, dbeta = bias.gradient
        let m = Float(z.shape.columns)
        BlockedKernels.forEachGroup(z) { k in
            @inline(__always) func masked(_ n: Int, _ o: Int) -> Lanes8 {
                var v = load(g.group(k, n) + o)
                if let y { v.replace(with: 0, where: load(y.group(k, n) + o) .<= 0) }
                return v
            }
            let (sumG, sumGZ) = BlockedKernels.reduce2(z, k) { n, o in
                let v = masked(n, o)
                return (v, v * load(z.group(k, n) + o))
            }
            var a = Lanes8(), b0 = Lanes8(), b1 = Lanes8()
            let mu = load(means + k * 8)
            for l in 0..<8 {
                let c = k * 8 + l, inv = invStds[c]
                let sg = Float(sumG.lanes[l]), sgx = (Float(sumGZ.lanes[l]) - mu[l] * sg) * inv  // Σ g·x̂
                dbeta[c] = sg; dgamma[c] = sgx
                let scale = gamma[c] * inv / m
                a[l] = scale * m; b0[l] = -scale * sg; b1[l] = -scale * inv * sgx
            }
            let sums = BlockedKernels.reduce(z, k) { n, o in
                let p = z.group(k, n) + o
                let d = a * masked(n, o) + b0 + b1 * (load(p) - mu)
                store(d, p)
                return d
            }
            for l in 0..<8 { biasGrad[k * 8 + l] = Float(sums.lanes[l]) }
        }
    }
}
