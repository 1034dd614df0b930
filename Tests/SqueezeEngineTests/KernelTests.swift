import Testing
@testable import SqueezeEngine

/// Random values in [-1, 1) from a seeded generator.
func randomArray<T: BinaryFloatingPoint>(_ n: Int, seed: UInt64, as: T.Type = Float.self) -> [T] {
    var rng = SeededRNG(seed: seed)
    return (0..<n).map { _ in T(rng.uniform(-1, 1)) }
}

/// The largest |a − b|; infinity when the lengths differ (a failed comparison, not a crash of the suite).
func maxAbsDiff(_ a: [Float], _ b: [Float]) -> Float {
    guard a.count == b.count else { return .infinity }
    return zip(a, b).reduce(0) { max($0, abs($1.0 - $1.1)) }
}

func maxAbs(_ a: [Float]) -> Float { a.reduce(0) { max($0, abs($1)) } }

/// Central finite differences of f at x, in Double.
func numericalGradient(_ x: [Double], eps: Double = 1e-6, _ f: ([Double]) -> Double) -> [Double] {
    var g = [Double](repeating: 0, count: x.count)
    var xp = x
    for i in x.indices {
        xp[i] = x[i] + eps; let fp = f(xp)
        xp[i] = x[i] - eps; let fm = f(xp)
        xp[i] = x[i]
        g[i] = (fp - fm) / (2 * eps)
    }
    return g
}

func expectClose(_ a: [Double], _ b: [Double], tolerance: Double, _ what: String) {
    guard a.count == b.count else {
        Issue.record("\(what): \(a.count) values against \(b.count)")
        return
    }
    let err = zip(a, b).map { abs($0 - $1) }.max() ?? 0
    #expect(err < tolerance, "\(what): max error \(err)")
}

/// Owns a Float copy of an array as a Tensor for the fast layers.
final class HostTensor {
    let buffer: FloatBuffer
    let shape: Shape
    init(_ values: [Float], _ shape: Shape) {
        precondition(values.count == shape.count)
        self.shape = shape
        buffer = FloatBuffer(count: shape.count)
        values.withUnsafeBufferPointer { buffer.pointer.update(from: $0.baseAddress!, count: values.count) }
    }
    var tensor: Tensor { Tensor(data: buffer.pointer, shape: shape) }
}

func array(_ t: Tensor) -> [Float] { Array(UnsafeBufferPointer(start: t.data, count: t.shape.count)) }

@Suite("Reference kernels against finite differences (Double)")
struct FiniteDifferenceTests {
    // L = Σ r·y for a fixed random r, so dL/dy = r.
    @Test(arguments: [(3, 1, 1), (3, 2, 0), (1, 1, 0), (3, 2, 1)])
    func conv2d(kernel: Int, stride: Int, padding: Int) {
        let s = Shape(c: 2, n: 2, h: 5, w: 6), cout = 3
        let x: [Double] = randomArray(s.count, seed: 1, as: Double.self)
        let w: [Double] = randomArray(cout * s.c * kernel * kernel, seed: 2, as: Double.self)
        let b: [Double] = randomArray(cout, seed: 3, as: Double.self)
        let y = Reference.conv2d(x, s, weight: w, bias: b, cout: cout, kernel: kernel, stride: stride, padding: padding)
        let r: [Double] = randomArray(y.y.count, seed: 4, as: Double.self)
        func loss(_ x: [Double], _ w: [Double], _ b: [Double]) -> Double {
            zip(Reference.conv2d(x, s, weight: w, bias: b, cout: cout, kernel: kernel, stride: stride, padding: padding).y, r)
                .reduce(0) { $0 + $1.0 * $1.1 }
        }
        let g = Reference.conv2dBackward(x, s, weight: w, dy: r, cout: cout, kernel: kernel, stride: stride, padding: padding)
        expectClose(g.dx, numericalGradient(x) { loss($0, w, b) }, tolerance: 1e-6, "dx")
        expectClose(g.dw, numericalGradient(w) { loss(x, $0, b) }, tolerance: 1e-6, "dw")
        expectClose(g.db, numericalGradient(b) { loss(x, w, $0) }, tolerance: 1e-6, "db")
    }

    @Test func reluAndMaxPoolCeilMode() {
        // 7×7 with kernel 3 stride 2 in ceil mode gives 3×3 windows; 8×8 gives 4×4 with clipped last windows.
        for hw in [7, 8, 13] {
            let s = Shape(c: 2, n: 3, h: hw, w: hw)
            let x: [Double] = randomArray(s.count, seed: UInt64(hw), as: Double.self)
            let pooled = Reference.maxPool(x, s, kernel: 3, stride: 2)
            #expect(pooled.shape.h == Kernels.outputSize(hw, kernel: 3, stride: 2, padding: 0, ceilMode: true))
            let r: [Double] = randomArray(pooled.y.count, seed: 9, as: Double.self)
            let f: ([Double]) -> Double = { v in
                zip(Reference.maxPool(Reference.relu(v), s, kernel: 3, stride: 2).y, r).reduce(0) { $0 + $1.0 * $1.1 }
            }
            let relu = Reference.relu(x)
            let p = Reference.maxPool(relu, s, kernel: 3, stride: 2)
            let dRelu = Reference.maxPoolBackward(dy: r, argmax: p.argmax, inputCount: x.count)
            let dx = Reference.reluBackward(relu, dy: dRelu)
            expectClose(dx, numericalGradient(x, f), tolerance: 1e-6, "maxpool∘relu \(hw)")
        }
        #expect(Kernels.outputSize(32, kernel: 3, stride: 2, padding: 0, ceilMode: true) == 16)
        #expect(Kernels.outputSize(111, kernel: 3, stride: 2, padding: 0, ceilMode: true) == 55)
        #expect(Kernels.outputSize(13, kernel: 3, stride: 2, padding: 0, ceilMode: true) == 6)
        #expect(Kernels.outputSize(8, kernel: 3, stride: 2, padding: 0, ceilMode: true) == 4)
    }

    @Test func globalAvgPoolAndCrossEntropy() {
        let s = Shape(c: 4, n: 3, h: 3, w: 3)
        let x: [Double] = randomArray(s.count, seed: 11, as: Double.self).map { $0 * 3 }
        let labels = [2, 0, 3]
        let f: ([Double]) -> Double = { v in
            Reference.softmaxCrossEntropy(Reference.globalAvgPool(v, s), classes: 4, labels: labels).loss
        }
        let logits = Reference.globalAvgPool(x, s)
        let dl = Reference.softmaxCrossEntropy(logits, classes: 4, labels: labels).gradient
        let dx = Reference.globalAvgPoolBackward(dy: dl, s)
        expectClose(dx, numericalGradient(x, f), tolerance: 1e-7, "avgpool+xent")
    }

    @Test func labelSmoothingMatchesPyTorchAndFiniteDifferences() {
        // F.cross_entropy(z, y, label_smoothing=0.1) and z.grad in PyTorch 2.x, z (N=2, K=4) row-major.
        let z: [[Float]] = [[1, -2, 0.5, 3], [0, 0.25, -1, 2]], labels: [Int32] = [2, 3]
        let torchLoss: Float = 1.5825880765914917
        let torchGrad: [[Float]] = [[0.042776864022016525, -0.009747926145792007, -0.42897287011146545, 0.39594390988349915],
                                    [0.037296026945114136, 0.05143936723470688, 0.005818935111165047, -0.09455432742834091]]
        let logits = (0..<4).flatMap { c in (0..<2).map { z[$0][c] } }  // (K, N) channel-major
        var grad = [Float](repeating: 0, count: 8)
        let (loss, correct) = grad.withUnsafeMutableBufferPointer {
            softmaxCrossEntropy(logits: logits, classes: 4, batch: 2, labels: labels, labelSmoothing: 0.1, gradient: $0.baseAddress!)
        }
        #expect(abs(loss - torchLoss) < 1e-6 && correct == 1)
        for j in 0..<2 { for c in 0..<4 { #expect(abs(grad[c * 2 + j] - torchGrad[j][c]) < 1e-6, "logit \(c) of sample \(j)") } }

        let x: [Double] = randomArray(12, seed: 5, as: Double.self).map { $0 * 4 }
        let f: ([Double]) -> Double = { Reference.softmaxCrossEntropy($0, classes: 4, labels: [1, 3, 0], labelSmoothing: 0.2).loss }
        expectClose(Reference.softmaxCrossEntropy(x, classes: 4, labels: [1, 3, 0], labelSmoothing: 0.2).gradient,
                    numericalGradient(x, f), tolerance: 1e-7, "smoothed xent")
    }

    @Test func batchNormFastBackwardMatchesFiniteDifferences() throws {
        // The fast BatchNorm backward (Float) against finite differences of the Double reference forward.
        let channels = 3, m = 10
        let z: [Double] = randomArray(channels * m, seed: 21, as: Double.self).map { $0 * 2 + 0.5 }
        let gamma: [Double] = [1.5, -0.7, 0.9], beta: [Double] = [0.1, 0.2, -0.3]
        let r: [Double] = randomArray(channels * m, seed: 22, as: Double.self)
        let f: ([Double]) -> Double = { v in
            zip(Reference.batchNorm(v, channels: channels, gamma: gamma, beta: beta, eps: 1e-5), r).reduce(0) { $0 + $1.0 * $1.1 }
        }
        let numeric = numericalGradient(z, f)

        let params = ParameterStore([ParameterSpec(name: "bn.weight", shape: [channels]), ParameterSpec(name: "bn.bias", shape: [channels])])
        let buffers = ParameterStore([ParameterSpec(name: "bn.running_mean", shape: [channels]), ParameterSpec(name: "bn.running_var", shape: [channels])])
        try params.load(gamma.map(Float.init) + beta.map(Float.init))
        let bn = BatchNorm(name: "bn", channels: channels)
        bn.bind(parameters: params, buffers: buffers)
        let zf = z.map(Float.init)
        var y = [Float](repeating: 0, count: zf.count)
        zf.withUnsafeBufferPointer { zp in
            y.withUnsafeMutableBufferPointer { bn.forward(zp.baseAddress!, into: $0.baseAddress!, columns: m, training: true, relu: false) }
        }
        let expectedY = Reference.batchNorm(z, channels: channels, gamma: gamma, beta: beta, eps: 1e-5)
        #expect(maxAbsDiff(y, expectedY.map(Float.init)) < 1e-5)
        var g = r.map(Float.init)
        zf.withUnsafeBufferPointer { zp in g.withUnsafeMutableBufferPointer { bn.backward($0.baseAddress!, z: zp.baseAddress!, columns: m) } }
        #expect(maxAbsDiff(g, numeric.map(Float.init)) < 1e-4)
        // dγ = Σ r·x̂, dβ = Σ r
        let dbeta = params.copyGradients()[channels...]
        for c in 0..<channels {
            #expect(abs(dbeta[channels + c] - Float(r[(c * m)..<((c + 1) * m)].reduce(0, +))) < 1e-5)
        }
        // running statistics moved by momentum 0.1 from (0, 1)
        let mean0 = z[0..<m].reduce(0, +) / Double(m)
        #expect(abs(Double(buffers.copyValues()[0]) - 0.1 * mean0) < 1e-6)
    }
}

@Suite("Fast kernels against the reference kernels")
struct FastKernelTests {
    func checkConv(batch: Int, hw: Int, cin: Int, cout: Int, kernel: Int, stride: Int, padding: Int, relu: Bool) throws {
        let s = Shape(c: cin, n: batch, h: hw, w: hw)
        let conv = Conv2d(name: "c", cin: cin, cout: cout, kernel: kernel, stride: stride, padding: padding,
                          relu: relu, batchNorm: false, workspace: Workspace())
        let params = ParameterStore(conv.parameterSpecs)
        let w: [Float] = randomArray(cout * cin * kernel * kernel, seed: 5), b: [Float] = randomArray(cout, seed: 6)
        try params.load(w + b)
        conv.bind(parameters: params, buffers: ParameterStore([]))
        let xs: [Float] = randomArray(s.count, seed: 7)
        let x = HostTensor(xs, s)
        let y = conv.forward(x.tensor, training: true)
        var ref = Reference.conv2d(xs, s, weight: w, bias: b, cout: cout, kernel: kernel, stride: stride, padding: padding)
        if relu { ref.y = Reference.relu(ref.y) }
        #expect(y.shape == ref.shape)
        #expect(maxAbsDiff(array(y), ref.y) < 1e-4 * max(1, maxAbs(ref.y)), "forward \(s) k\(kernel) s\(stride) p\(padding)")

        let dyv: [Float] = randomArray(y.shape.count, seed: 8)
        let dy = HostTensor(dyv, y.shape)
        let dx = conv.backward(dy.tensor, needInputGradient: true)!
        let dyMasked = relu ? Reference.reluBackward(ref.y, dy: dyv) : dyv
        let g = Reference.conv2dBackward(xs, s, weight: w, dy: dyMasked, cout: cout, kernel: kernel, stride: stride, padding: padding)
        let grads = params.copyGradients()
        #expect(maxAbsDiff(array(dx), g.dx) < 1e-4 * max(1, maxAbs(g.dx)), "dx")
        #expect(maxAbsDiff(Array(grads[0..<w.count]), g.dw) < 1e-4 * max(1, maxAbs(g.dw)), "dw")
        #expect(maxAbsDiff(Array(grads[w.count...]), g.db) < 1e-4 * max(1, maxAbs(g.db)), "db")
    }

    @Test(arguments: [1, 3])
    func convolutions(batch: Int) throws {
        for hw in [7, 13] {
            try checkConv(batch: batch, hw: hw, cin: 5, cout: 6, kernel: 1, stride: 1, padding: 0, relu: true)
            try checkConv(batch: batch, hw: hw, cin: 5, cout: 6, kernel: 3, stride: 1, padding: 1, relu: true)
            try checkConv(batch: batch, hw: hw, cin: 3, cout: 4, kernel: 3, stride: 2, padding: 0, relu: false)
            try checkConv(batch: batch, hw: hw, cin: 3, cout: 4, kernel: 7, stride: 2, padding: 0, relu: true)
            try checkConv(batch: batch, hw: hw, cin: 3, cout: 4, kernel: 3, stride: 2, padding: 1, relu: true)
        }
    }

    /// Conv2d + BatchNorm + ReLU (whose forward folds the convolution's bias into the normalisation and
    /// whose backward fuses the ReLU mask and the bias gradient) against the Double reference: outputs,
    /// the running mean (which must include the bias), and every gradient against finite differences.
    @Test(arguments: [ConvolutionAlgorithm.gemm, .onednn])
    func convolutionWithBatchNormMatchesFiniteDifferences(algorithm: ConvolutionAlgorithm) throws {
        let s = Shape(c: 2, n: 2, h: 5, w: 5), cout = 3
        let workspace = Workspace()
        workspace.convolutionAlgorithm = algorithm
        let conv = Conv2d(name: "c", cin: 2, cout: cout, kernel: 3, padding: 1, relu: true, batchNorm: true, workspace: workspace)
        let params = ParameterStore(conv.parameterSpecs), buffers = ParameterStore(conv.bufferSpecs)
        let w: [Double] = randomArray(cout * 2 * 9, seed: 51, as: Double.self)
        let b: [Double] = [0.5, -1.5, 2.0], gamma: [Double] = [1.2, 0.8, -0.6], beta: [Double] = [0.3, 0.1, 0.2]
        try params.load((w + b + gamma + beta).map(Float.init))
        conv.bind(parameters: params, buffers: buffers)
        let xs: [Double] = randomArray(s.count, seed: 52, as: Double.self)
        let r: [Double] = randomArray(cout * s.columns, seed: 53, as: Double.self)
        func reference(_ x: [Double], _ w: [Double], _ b: [Double]) -> [Double] {
            let z = Reference.conv2d(x, s, weight: w, bias: b, cout: cout, kernel: 3, stride: 1, padding: 1).y
            return Reference.relu(Reference.batchNorm(z, channels: cout, gamma: gamma, beta: beta, eps: 1e-5))
        }
        func loss(_ y: [Double]) -> Double { zip(y, r).reduce(0) { $0 + $1.0 * $1.1 } }

        let x = HostTensor(xs.map(Float.init), s)
        let y = conv.forward(x.tensor, training: true)
        let expected = reference(xs, w, b)
        #expect(maxAbsDiff(array(y), expected.map(Float.init)) < 1e-4)
        let z = Reference.conv2d(xs, s, weight: w, bias: b, cout: cout, kernel: 3, stride: 1, padding: 1).y
        let m = s.columns
        for c in 0..<cout {  // running mean moved by momentum 0.1 from 0 towards the mean of z + bias
            let mean = z[(c * m)..<((c + 1) * m)].reduce(0, +) / Double(m)
            #expect(abs(Double(buffers.copyValues()[c]) - 0.1 * mean) < 1e-5)
        }
        let dy = HostTensor(r.map(Float.init), y.shape)
        let dx = conv.backward(dy.tensor, needInputGradient: true)!
        let grads = params.copyGradients().map(Double.init)
        let dxRef = numericalGradient(xs) { loss(reference($0, w, b)) }
        let dwRef = numericalGradient(w) { loss(reference(xs, $0, b)) }
        #expect(maxAbsDiff(array(dx), dxRef.map(Float.init)) < 1e-3)
        #expect(maxAbsDiff(Array(grads[0..<w.count]).map(Float.init), dwRef.map(Float.init)) < 1e-3)
        #expect(grads[w.count..<(w.count + cout)].allSatisfy { abs($0) < 1e-4 }, "the bias cancels in the normalisation")
    }

    /// With `ties`, values in {0, 1, 2} (as after a ReLU): the arg-max must be the first in scan order.
    @Test(arguments: [(1, 7), (3, 13), (2, 8), (3, 32), (2, 33)], [false, true])
    func maxPool(size: (batch: Int, hw: Int), ties: Bool) {
        let s = Shape(c: 3, n: size.batch, h: size.hw, w: size.hw)
        let random: [Float] = randomArray(s.count, seed: 12)
        let xs = ties ? random.map { max(0, ($0 * 2).rounded()) } : random
        let pool = MaxPool(name: "p")
        let x = HostTensor(xs, s)
        let y = pool.forward(x.tensor, training: true)
        let ref = Reference.maxPool(xs, s, kernel: 3, stride: 2)
        #expect(y.shape == ref.shape)
        #expect(array(y) == ref.y)
        let dyv: [Float] = randomArray(y.shape.count, seed: 13)
        let dy = HostTensor(dyv, y.shape)
        let dx = pool.backward(dy.tensor, needInputGradient: true)!
        #expect(maxAbsDiff(array(dx), Reference.maxPoolBackward(dy: dyv, argmax: ref.argmax, inputCount: xs.count)) < 1e-6)
    }

    @Test func globalAvgPoolAndLoss() {
        let s = Shape(c: 10, n: 3, h: 4, w: 4)
        let xs: [Float] = randomArray(s.count, seed: 14)
        let pool = GlobalAvgPool(name: "a")
        let x = HostTensor(xs, s)
        let y = pool.forward(x.tensor, training: true)
        let ref = Reference.globalAvgPool(xs, s)
        #expect(maxAbsDiff(array(y), ref) < 1e-6)
        let labels: [Int32] = [3, 9, 0]
        var grad = [Float](repeating: 0, count: 30)
        let (loss, _) = grad.withUnsafeMutableBufferPointer {
            softmaxCrossEntropy(logits: y.data, classes: 10, batch: 3, labels: labels, gradient: $0.baseAddress!)
        }
        let refLoss = Reference.softmaxCrossEntropy(ref.map(Double.init), classes: 10, labels: labels.map(Int.init))
        #expect(abs(Double(loss) - refLoss.loss) < 1e-6)
        #expect(maxAbsDiff(grad, refLoss.gradient.map(Float.init)) < 1e-6)
        let dy = HostTensor(grad, y.shape)
        let dx = pool.backward(dy.tensor, needInputGradient: true)!
        #expect(maxAbsDiff(array(dx), Reference.globalAvgPoolBackward(dy: grad, s)) < 1e-7)
    }

    @Test func dropoutMaskIsInvertedAndBackwardUsesIt() {
        let s = Shape(c: 8, n: 4, h: 8, w: 8)
        let d = Dropout(name: "d", p: 0.5, rng: SeededRNG(seed: 3))
        let x = HostTensor([Float](repeating: 1, count: s.count), s)
        let y = array(d.forward(x.tensor, training: true))
        #expect(Set(y) == [0, 2])
        let kept = y.filter { $0 > 0 }.count
        #expect(abs(Double(kept) / Double(s.count) - 0.5) < 0.05)
        let dy = HostTensor([Float](repeating: 1, count: s.count), s)
        #expect(array(d.backward(dy.tensor, needInputGradient: true)!) == y)
        let e = HostTensor([Float](repeating: 1, count: s.count), s)
        #expect(array(d.forward(e.tensor, training: false)).allSatisfy { $0 == 1 })
    }

    @Test func dropoutMaskIsReproducibleAndEachChunkDrawsItsOwn() {
        // The mask is filled in chunks (in parallel), each from its own stream of one draw of `rng`.
        let s = Shape(c: 16, n: 4, h: 32, w: 32), chunk = Dropout.chunk
        func mask(seed: UInt64) -> [Float] {
            let d = Dropout(name: "d", p: 0.5, rng: SeededRNG(seed: seed))
            let x = HostTensor([Float](repeating: 1, count: s.count), s)
            return withExtendedLifetime(x) { array(d.forward(x.tensor, training: true)) }
        }
        let a = mask(seed: 9)
        #expect(s.count > 3 * chunk)
        #expect(a == mask(seed: 9))
        #expect(a != mask(seed: 10))
        #expect(a[0..<chunk] != a[chunk..<(2 * chunk)], "chunks must not repeat one stream")
        #expect(abs(Double(a.filter { $0 > 0 }.count) / Double(s.count) - 0.5) < 0.01)
    }

    @Test func fireMatchesReferenceComposition() throws {
        // Fire = concat(relu(e1(relu(sq(x)))), relu(e3(relu(sq(x))))) with a bypass, forward and backward.
        let s = Shape(c: 8, n: 3, h: 7, w: 7)
        let fire = Fire(name: "f", input: 8, squeeze: 3, expand1x1: 4, expand3x3: 4, bypass: true, batchNorm: false, workspace: Workspace())
        let params = ParameterStore(fire.parameterSpecs)
        let values: [Float] = randomArray(params.count, seed: 31)
        try params.load(values)
        fire.bind(parameters: params, buffers: ParameterStore([]))
        func v(_ name: String) -> [Float] { let sp = params.spec(name)!; return Array(values[sp.range]) }
        let xs: [Float] = randomArray(s.count, seed: 32)
        let x = HostTensor(xs, s)
        let y = fire.forward(x.tensor, training: true)

        let sq = Reference.relu(Reference.conv2d(xs, s, weight: v("f.squeeze.weight"), bias: v("f.squeeze.bias"), cout: 3, kernel: 1, stride: 1, padding: 0).y)
        let ss = Shape(c: 3, n: 3, h: 7, w: 7)
        let e1 = Reference.relu(Reference.conv2d(sq, ss, weight: v("f.expand1x1.weight"), bias: v("f.expand1x1.bias"), cout: 4, kernel: 1, stride: 1, padding: 0).y)
        let e3 = Reference.relu(Reference.conv2d(sq, ss, weight: v("f.expand3x3.weight"), bias: v("f.expand3x3.bias"), cout: 4, kernel: 3, stride: 1, padding: 1).y)
        let expected = zip(e1 + e3, xs).map { $0 + $1 }
        #expect(maxAbsDiff(array(y), expected) < 1e-4)

        let dyv: [Float] = randomArray(y.shape.count, seed: 33)
        let dy = HostTensor(dyv, y.shape)
        let dx = fire.backward(dy.tensor, needInputGradient: true)!
        let half = 4 * ss.columns
        let d1 = Reference.conv2dBackward(sq, ss, weight: v("f.expand1x1.weight"), dy: Reference.reluBackward(e1, dy: Array(dyv[..<half])), cout: 4, kernel: 1, stride: 1, padding: 0)
        let d3 = Reference.conv2dBackward(sq, ss, weight: v("f.expand3x3.weight"), dy: Reference.reluBackward(e3, dy: Array(dyv[half...])), cout: 4, kernel: 3, stride: 1, padding: 1)
        let dsq = Reference.reluBackward(sq, dy: zip(d1.dx, d3.dx).map { $0 + $1 })
        let d0 = Reference.conv2dBackward(xs, s, weight: v("f.squeeze.weight"), dy: dsq, cout: 3, kernel: 1, stride: 1, padding: 0)
        #expect(maxAbsDiff(array(dx), zip(d0.dx, dyv).map { $0 + $1 }) < 1e-4)
        let grads = params.copyGradients()
        #expect(maxAbsDiff(Array(grads[params.spec("f.expand3x3.weight")!.range]), d3.dw) < 1e-4)
        #expect(maxAbsDiff(Array(grads[params.spec("f.squeeze.weight")!.range]), d0.dw) < 1e-4)
        #expect(maxAbsDiff(Array(grads[params.spec("f.squeeze.bias")!.range]), d0.db) < 1e-4)
    }

    @Test func bypassAddsTheIdentityWithBatchNorm() throws {
        // With BatchNorm (whose backward works in place on dy), a bypassed Fire must still be the
        // same Fire without the bypass plus its input: y' = y + x, dx' = dx + dy, equal weight gradients.
        let s = Shape(c: 8, n: 3, h: 5, w: 5)
        let xs: [Float] = randomArray(s.count, seed: 41), dyv: [Float] = randomArray(s.count, seed: 42)
        var outputs = [[Float]](), inputGradients = [[Float]](), weightGradients = [[Float]]()
        for bypass in [false, true] {
            let fire = Fire(name: "f", input: 8, squeeze: 3, expand1x1: 4, expand3x3: 4, bypass: bypass, batchNorm: true, workspace: Workspace())
            // The layer's views keep both stores alive; the buffer store is not referenced here again.
            let params = ParameterStore(fire.parameterSpecs)
            try params.load(randomArray(params.count, seed: 43))
            fire.bind(parameters: params, buffers: ParameterStore(fire.bufferSpecs))
            let x = HostTensor(xs, s), dy = HostTensor(dyv, s)
            outputs.append(array(fire.forward(x.tensor, training: true)))
            inputGradients.append(array(fire.backward(dy.tensor, needInputGradient: true)!))
            weightGradients.append(params.copyGradients())
        }
        #expect(maxAbsDiff(outputs[1], zip(outputs[0], xs).map { $0 + $1 }) < 1e-5)
        #expect(maxAbsDiff(inputGradients[1], zip(inputGradients[0], dyv).map { $0 + $1 }) < 1e-5)
        #expect(maxAbsDiff(weightGradients[1], weightGradients[0]) < 1e-6)
        #expect(inputGradients[0].contains { $0 != 0 } && weightGradients[0].contains { $0 != 0 })
    }
}
