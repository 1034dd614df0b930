/// Kernels on oneDNN's blocked activation layout (nChw8c on AVX2, nChw16c on AVX-512), in which a
/// training step keeps SqueezeNet's activations and gradients from the stem to the classifier
/// (docs/engine.md, "Blocked layouts"). Element [n][c][h][w] of a tensor with block B lives at
/// n·imageStride + ((c / B)·H·W + h·W + w)·B + c % B: every pixel holds B consecutive channels, and
/// channel block b of image n is one contiguous run of H·W·B floats.
///
/// The per-channel kernels work on one such run at a time in SIMD8 parts (two per pixel for B = 16,
/// so every cache line is read whole). A channel slice of a wider blocked tensor
/// (the Fire module's concat) is a `Tensor` with a larger `imageStride`; slices start at multiples
/// of B. Per-channel sums add each image's plane in Float lanes, then the images in Double.

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

    /// Blocked: the run of channel block b of image n (H·W pixels of `block` floats).
    @inline(__always) func run(_ b: Int, _ n: Int) -> UnsafeMutablePointer<Float> {
        data + n * imageStride + b * shape.plane * block
    }
}

@inline(__always) private func load(_ p: UnsafePointer<Float>) -> Lanes8 { UnsafeRawPointer(p).loadUnaligned(as: Lanes8.self) }
@inline(__always) private func store(_ v: Lanes8, _ p: UnsafeMutablePointer<Float>) { UnsafeMutableRawPointer(p).storeBytes(of: v, as: Lanes8.self) }

/// One Double sum per channel of a block (up to 16), in two parts of 8.
struct BlockSums {
    var first = SIMD8<Double>(), second = SIMD8<Double>()
    @inline(__always) mutating func add(_ v: Lanes8, part: Int) {
        let wide = SIMD8<Double>(Double(v[0]), Double(v[1]), Double(v[2]), Double(v[3]),
                                 Double(v[4]), Double(v[5]), Double(v[6]), Double(v[7]))
        if part == 0 { first += wide } else { second += wide }
    }
    @inline(__always) subscript(_ lane: Int) -> Double { lane < 8 ? first[lane] : second[lane - 8] }
    @inline(__always) func write(into p: UnsafeMutablePointer<Float>, count: Int) { for l in 0..<count { p[l] = Float(self[l]) } }
    /// Part `part` (8 lanes) of the sums divided by m.
    @inline(__always) func mean(over m: Int, part: Int) -> Lanes8 {
        let sums = part == 0 ? first : second
        var v = Lanes8()
        for l in 0..<8 { v[l] = Float(sums[l] / Double(m)) }
        return v
    }
}

/// Per-part constants of a channel block: part 0 (channels 0–7) and part 1 (8–15, B = 16 only).
struct PartPair {
    var first = Lanes8(), second = Lanes8()
    init() {}
    init(_ p: UnsafePointer<Float>, parts: Int) {
        first = UnsafeRawPointer(p).loadUnaligned(as: Lanes8.self)
        if parts == 2 { second = UnsafeRawPointer(p + 8).loadUnaligned(as: Lanes8.self) }
    }
    @inline(__always) subscript(_ part: Int) -> Lanes8 {
        get { part == 0 ? first : second }
        set { if part == 0 { first = newValue } else { second = newValue } }
    }
}

enum BlockedKernels {
    /// Runs `body(b)` for every channel block of `x`, split over the compute threads.
    @inline(__always) static func forEachBlock(_ x: Tensor, _ body: (Int) -> Void) {
        parallelFor(x.shape.c / x.block) { blocks in for b in blocks { body(b) } }
    }

    /// Calls f(image, offset of the part in its run, part) for every 8-lane part of every pixel of
    /// a block (one part per pixel for B = 8, two for B = 16).
    @inline(__always) static func forEachPart(_ x: Tensor, _ f: (Int, Int, Int) -> Void) {
        for n in 0..<x.shape.n {
            if x.block == 16 {
                for i in 0..<x.shape.plane { f(n, i * 16, 0); f(n, i * 16 + 8, 1) }
            } else {
                for i in 0..<x.shape.plane { f(n, i * 8, 0) }
            }
        }
    }

    /// Σ of f(image, offset, part) over images and pixels, per channel of a block.
    @inline(__always) static func reduce(_ x: Tensor, _ f: (Int, Int, Int) -> Lanes8) -> BlockSums {
        reduce2(x) { n, o, part in (f(n, o, part), Lanes8()) }.0
    }

    /// `reduce` of two functions in one pass.
    @inline(__always) static func reduce2(_ x: Tensor, _ f: (Int, Int, Int) -> (Lanes8, Lanes8)) -> (BlockSums, BlockSums) {
        var sums = (BlockSums(), BlockSums())
        for n in 0..<x.shape.n {
            var a = PartPair(), b = PartPair()
            if x.block == 16 {
                for i in 0..<x.shape.plane {
                    let (p, q) = f(n, i * 16, 0), (r, s) = f(n, i * 16 + 8, 1)
                    a.first += p; b.first += q; a.second += r; b.second += s
                }
                sums.0.add(a.second, part: 1); sums.1.add(b.second, part: 1)
            } else {
                for i in 0..<x.shape.plane {
                    let (p, q) = f(n, i * 8, 0)
                    a.first += p; b.first += q
                }
            }
            sums.0.add(a.first, part: 0); sums.1.add(b.first, part: 0)
        }
        return sums
    }

    /// Runs `body(g)` for every group of 8 channels of `x` (part of a block), split over the compute threads.
    @inline(__always) static func forEachGroup(_ x: Tensor, _ body: (Int) -> Void) {
        parallelFor(x.shape.c / 8) { groups in for g in groups { body(g) } }
    }

    /// y (blocked) = x (channel-major), same shape.
    static func toBlocked(_ x: Tensor, into y: Tensor) { copy(plain: x, blocked: y, toBlocked: true) }

    /// y (channel-major) = x (blocked), same shape.
    static func toChannelMajor(_ x: Tensor, into y: Tensor) { copy(plain: y, blocked: x, toBlocked: false) }

    private static func copy(plain: Tensor, blocked: Tensor, toBlocked: Bool) {
        let plane = plain.shape.plane, columns = plain.shape.columns, block = blocked.block
        forEachGroup(blocked) { g in
            for n in 0..<blocked.shape.n {
                let b = blocked.group(g, n)
                for l in 0..<8 {
                    let p = plain.data + (g * 8 + l) * columns + n * plane
                    if toBlocked {
                        for i in 0..<plane { b[i * block + l] = p[i] }
                    } else {
                        for i in 0..<plane { p[i] = b[i * block + l] }
                    }
                }
            }
        }
    }

    /// y = max(0, z + bias) per channel (or without the ReLU); z dense, y possibly a slice (or z itself).
    static func addBias(_ z: Tensor, bias: UnsafePointer<Float>, relu: Bool, into y: Tensor) {
        let parts = z.block / 8
        forEachBlock(z) { b in
            let shift = PartPair(bias + b * z.block, parts: parts)
            forEachPart(z) { n, o, part in
                let v = load(z.run(b, n) + o) + shift[part]
                store(relu ? v.replacing(with: 0, where: v .< 0) : v, y.run(b, n) + o)
            }
        }
    }

    /// dz = dy · [y > 0] (when `relu`), biasGrad = Σ dz per channel. dz dense (it may be dy itself).
    static func reluBackwardBiasGrad(_ dy: Tensor, y: Tensor, relu: Bool, into dz: Tensor, biasGrad: UnsafeMutablePointer<Float>) {
        forEachBlock(dz) { b in
            let sums = reduce(dz) { n, o, _ in
                var v = load(dy.run(b, n) + o)
                if relu { v.replace(with: 0, where: load(y.run(b, n) + o) .<= 0) }
                store(v, dz.run(b, n) + o)
                return v
            }
            sums.write(into: biasGrad + b * dz.block, count: dz.block)
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
        let m = z.shape.columns, lanes = z.block, parts = lanes / 8
        let gamma = weight.value, beta = bias.value, runningMean = runningMean.value, runningVar = runningVar.value
        BlockedKernels.forEachBlock(z) { b in
            let c0 = b * lanes
            if training {
                let sums = BlockedKernels.reduce(z) { n, o, _ in load(z.run(b, n) + o) }
                var mu = PartPair()
                for part in 0..<parts { mu[part] = sums.mean(over: m, part: part) }
                let q = BlockedKernels.reduce(z) { n, o, part in
                    let d = load(z.run(b, n) + o) - mu[part]
                    return d * d
                }
                for l in 0..<lanes {
                    let c = c0 + l, deviations = Float(q[l])
                    means[c] = mu[l / 8][l % 8]; invStds[c] = 1 / (deviations / Float(m) + eps).squareRoot()
                    runningMean[c] = (1 - momentum) * runningMean[c] + momentum * (means[c] + convBias[c])
                    runningVar[c] = (1 - momentum) * runningVar[c] + momentum * deviations / Float(max(m - 1, 1))
                }
            } else {
                for c in c0..<(c0 + lanes) {
                    means[c] = runningMean[c] - convBias[c]; invStds[c] = 1 / (runningVar[c] + eps).squareRoot()
                }
            }
            var scale = PartPair(), shift = PartPair()
            for part in 0..<parts {
                let p = c0 + part * 8
                scale[part] = load(gamma + p) * load(invStds + p)
                shift[part] = load(beta + p) - load(means + p) * scale[part]
            }
            BlockedKernels.forEachPart(z) { n, o, part in
                let v = load(z.run(b, n) + o) * scale[part] + shift[part]
                store(relu ? v.replacing(with: 0, where: v .< 0) : v, y.run(b, n) + o)
            }
        }
    }

    /// `backward` on blocked tensors: dL/dy in `g` (dense or a channel slice), z dense; dL/dz is written
    /// over z (which the forward kept and nothing reads afterwards). Two passes per channel block.
    func backward(blocked g: Tensor, z: Tensor, reluOutput y: Tensor?, biasGrad: UnsafeMutablePointer<Float>) {
        let means = mean.pointer, invStds = invStd.pointer
        let gamma = weight.value, dgamma = weight.gradient, dbeta = bias.gradient
        let m = Float(z.shape.columns), lanes = z.block, parts = lanes / 8
        BlockedKernels.forEachBlock(z) { b in
            @inline(__always) func masked(_ n: Int, _ o: Int) -> Lanes8 {
                var v = load(g.run(b, n) + o)
                if let y { v.replace(with: 0, where: load(y.run(b, n) + o) .<= 0) }
                return v
            }
            let (sumG, sumGZ) = BlockedKernels.reduce2(z) { n, o, _ in
                let v = masked(n, o)
                return (v, v * load(z.run(b, n) + o))
            }
            let c0 = b * lanes
            var a = PartPair(), b0 = PartPair(), b1 = PartPair()
            let mu = PartPair(means + c0, parts: parts)
            for l in 0..<lanes {
                let c = c0 + l, inv = invStds[c]
                let sg = Float(sumG[l]), sgx = (Float(sumGZ[l]) - means[c] * sg) * inv  // Σ g·x̂
                dbeta[c] = sg; dgamma[c] = sgx
                let k = gamma[c] * inv / m
                // dz = k·(m·g − Σg − x̂·Σg·x̂) = a·g + b0 + b1·(z − μ)
                a[l / 8][l % 8] = k * m; b0[l / 8][l % 8] = -k * sg; b1[l / 8][l % 8] = -k * inv * sgx
            }
            let sums = BlockedKernels.reduce(z) { n, o, part in
                let p = z.run(b, n) + o
                let d = a[part] * masked(n, o) + b0[part] + b1[part] * (load(p) - mu[part])
                store(d, p)
                return d
            }
            sums.write(into: biasGrad + c0, count: lanes)
        }
    }
}
