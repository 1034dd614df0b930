import Testing
@testable import SqueezeEngine

@Suite("bf16 mixed precision against fp32")
struct PrecisionTests {
    @Test func roundingToNearestEven() {
        #expect(roundedToBF16(1) == 1)
        #expect(roundedToBF16(1 + 0x1p-8) == 1)                       // tie → even (down)
        #expect(roundedToBF16(1 + 3 * 0x1p-8) == 1 + 0x1p-6)          // tie → even (up)
        #expect(roundedToBF16(1 + 0x1p-8 + 0x1p-12) == 1 + 0x1p-7)    // above the tie
        #expect(roundedToBF16(-2.5) == -2.5)
        #expect(roundedToBF16(.infinity) == .infinity)
        #expect(roundedToBF16(.nan).isNaN)
        // the vector kernel agrees with the scalar rule (odd length: SIMD blocks and a tail)
        let xs: [Float] = randomArray(1_003, seed: 9).map { $0 * 1000 }
        var ys = [Float](repeating: 0, count: xs.count)
        xs.withUnsafeBufferPointer { x in
            ys.withUnsafeMutableBufferPointer { Kernels.roundToBF16(x.baseAddress!, $0.baseAddress!, count: xs.count) }
        }
        #expect(ys == xs.map(roundedToBF16))
    }

    /// A convolution in bf16 is the Double reference on bf16-rounded inputs (fp32 accumulation), and
    /// within bf16's precision of the fp32 layer.
    @Test(arguments: [(1, 1, 0), (3, 1, 1), (3, 2, 1)])
    func convolution(kernel: Int, stride: Int, padding: Int) throws {
        let s = Shape(c: 6, n: 3, h: 9, w: 9), cout = 5
        let xs: [Float] = randomArray(s.count, seed: 11)
        let w: [Float] = randomArray(cout * s.c * kernel * kernel, seed: 12), b: [Float] = randomArray(cout, seed: 13)
        var outputs = [[Float]](), dxs = [[Float]](), grads = [[Float]]()
        var dyv = [Float]()
        for precision in [Precision.fp32, .bf16] {
            let workspace = Workspace()
            workspace.precision = precision
            let conv = Conv2d(name: "c", cin: s.c, cout: cout, kernel: kernel, stride: stride, padding: padding,
                              relu: false, batchNorm: false, workspace: workspace)
            let params = ParameterStore(conv.parameterSpecs)
            try params.load(w + b)
            conv.bind(parameters: params, buffers: ParameterStore([]))
            let x = HostTensor(xs, s)
            let y = conv.forward(x.tensor, training: true)
            outputs.append(array(y))
            if dyv.isEmpty { dyv = randomArray(y.shape.count, seed: 14) }
            let dy = HostTensor(dyv, y.shape)
            dxs.append(array(conv.backward(dy.tensor, needInputGradient: true)!))
            grads.append(params.copyGradients())
        }
        // exact products of rounded inputs, summed in Double
        let r = { (a: [Float]) in a.map { Double(roundedToBF16($0)) } }
        let ref = Reference.conv2d(r(xs), s, weight: r(w), bias: b.map(Double.init), cout: cout, kernel: kernel,
                                   stride: stride, padding: padding)
        let refBack = Reference.conv2dBackward(r(xs), s, weight: r(w), dy: r(dyv), cout: cout, kernel: kernel,
                                               stride: stride, padding: padding)
        let f = { (a: [Double]) in a.map(Float.init) }
        #expect(relativeError(outputs[1], f(ref.y)) < 1e-5)
        #expect(relativeError(dxs[1], f(refBack.dx)) < 1e-5)
        #expect(relativeError(Array(grads[1][0..<w.count]), f(refBack.dw)) < 1e-5)
        // against fp32: bf16's 8-bit mantissa, not more
        for (half, full) in [(outputs[1], outputs[0]), (dxs[1], dxs[0]), (grads[1], grads[0])] {
            let err = relativeError(half, full)
            #expect(err < 2e-2 && err > 1e-6, "bf16 vs fp32: \(err)")
        }
    }

    /// A Fire module with BatchNorm (fp32 statistics) in bf16 tracks the fp32 one.
    @Test func fireWithBatchNorm() throws {
        let s = Shape(c: 8, n: 4, h: 6, w: 6)
        let xs: [Float] = randomArray(s.count, seed: 21), dyv: [Float] = randomArray(s.count, seed: 22)
        var outputs = [[Float]](), dxs = [[Float]](), grads = [[Float]]()
        for precision in [Precision.fp32, .bf16] {
            let workspace = Workspace()
            workspace.precision = precision
            let fire = Fire(name: "f", input: 8, squeeze: 3, expand1x1: 4, expand3x3: 4, bypass: false,
                            batchNorm: true, workspace: workspace)
            let params = ParameterStore(fire.parameterSpecs)
            try params.load(randomArray(params.count, seed: 23))
            fire.bind(parameters: params, buffers: ParameterStore(fire.bufferSpecs))
            let x = HostTensor(xs, s), dy = HostTensor(dyv, s)
            outputs.append(array(fire.forward(x.tensor, training: true)))
            dxs.append(array(fire.backward(dy.tensor, needInputGradient: true)!))
            grads.append(params.copyGradients())
        }
        #expect(relativeError(outputs[1], outputs[0]) < 3e-2)
        #expect(relativeError(dxs[1], dxs[0]) < 5e-2)
        #expect(relativeError(grads[1], grads[0]) < 5e-2)
    }

    /// A short training run in bf16 follows the fp32 run's losses (the recipe's model, BatchNorm).
    @Test func trainingLossTracksFP32() {
        var c = ModelConfig()
        c.dropout = 0
        c.batchNorm = true
        c.lateDownsample = true
        let s = Shape(c: 3, n: 8, h: 32, w: 32)
        let x = HostTensor(randomArray(s.count, seed: 40), s)
        let labels: [Int32] = [0, 1, 2, 3, 4, 5, 6, 7]
        var runs = [[Float]]()
        for precision in [Precision.fp32, .bf16] {
            let net = Network(config: c, seed: 1)
            net.precision = precision
            net.convolutionAlgorithm = .gemm  // bf16's algorithm: the runs differ only in rounding
            let sgd = SGD(parameterCount: net.parameters.count, momentum: 0.9, weightDecay: 5e-4)
            var losses = [Float]()
            for _ in 0..<20 {
                losses.append(lossAndGradients(net, x.tensor, labels: labels, labelSmoothing: 0.1).loss)
                sgd.step(net.parameters, learningRate: 0.05)
            }
            runs.append(losses)
        }
        for (step, (full, half)) in zip(runs[0], runs[1]).enumerated() {
            #expect(abs(full - half) < 0.05 + 0.1 * full, "step \(step): fp32 \(full), bf16 \(half)")
        }
        #expect(runs[1].last! < 0.6 * runs[1].first!, "bf16 losses: \(runs[1])")
    }
}

@Suite("Eval mode keeps nothing for backward")
struct InferenceTests {
    /// Eval-mode forward of a batch (activations rotating through the shared arena, in-place
    /// BatchNorm and bypass) equals the same images evaluated one at a time, for every model shape.
    @Test(arguments: [false, true])
    func batchEqualsImagesOneByOne(bypass: Bool) {
        var c = ModelConfig()
        c.batchNorm = true
        c.lateDownsample = true
        c.bypass = bypass ? .simple : .none
        let net = Network(config: c, seed: 3)
        // move the running statistics away from (0, 1) with a few training-mode forwards
        let s = Shape(c: 3, n: 4, h: 32, w: 32)
        let x = HostTensor(randomArray(s.count, seed: 50), s)
        for _ in 0..<3 { _ = net.forward(x.tensor, training: true) }
        let batch = net.predict(x.tensor)  // (10, 4)
        for j in 0..<4 {
            let one = HostTensor((0..<3).flatMap { ch in
                Array(UnsafeBufferPointer(start: x.buffer.pointer + (ch * 4 + j) * 1024, count: 1024))
            }, Shape(c: 3, n: 1, h: 32, w: 32))
            let logits = net.predict(one.tensor)
            let column = (0..<10).map { batch[$0 * 4 + j] }
            #expect(maxAbsDiff(logits, column) < 1e-4 * max(1, maxAbs(column)), "image \(j)")
        }
        // a training step after evaluation still works (training state was not disturbed)
        let loss = lossAndGradients(net, x.tensor, labels: [0, 1, 2, 3]).loss
        #expect(loss.isFinite)
    }
}

@Suite("oneDNN convolution primitives against im2col + GEMM")
struct DirectConvolutionTests {
    /// Training forward and backward (dx written and accumulated) agree between the two algorithms.
    @Test(arguments: [(3, 1, 1, 9), (3, 2, 1, 9), (3, 2, 0, 13), (5, 1, 2, 8)])
    func sameResults(kernel: Int, stride: Int, padding: Int, hw: Int) throws {
        let s = Shape(c: 5, n: 3, h: hw, w: hw), cout = 7
        let xs: [Float] = randomArray(s.count, seed: 31)
        var results = [[Float]]()
        for direct in [false, true] {
            let workspace = Workspace()
            workspace.convolutionAlgorithm = direct ? .onednn : .gemm
            let conv = Conv2d(name: "c", cin: s.c, cout: cout, kernel: kernel, stride: stride, padding: padding,
                              relu: true, batchNorm: false, workspace: workspace)
            let params = ParameterStore(conv.parameterSpecs)
            try params.load(randomArray(params.count, seed: 32))
            conv.bind(parameters: params, buffers: ParameterStore([]))
            let x = HostTensor(xs, s)
            let y = conv.forward(x.tensor, training: true)
            let dy = HostTensor(randomArray(y.shape.count, seed: 33), y.shape)
            let dx = HostTensor(randomArray(s.count, seed: 34), s)
            conv.backward(dy.tensor, into: dx.tensor, accumulate: true)
            let added = array(dx.tensor)
            _ = conv.forward(x.tensor, training: true)
            let dy2 = HostTensor(randomArray(y.shape.count, seed: 33), y.shape)
            conv.backward(dy2.tensor, into: dx.tensor, accumulate: false)
            results.append(array(y) + added + array(dx.tensor) + params.copyGradients())
        }
        #expect(relativeError(results[1], results[0]) < 1e-5)
    }
}

@Suite("Per-layer profile (bench train --layers)")
struct LayerProfileTests {
    /// Two training steps of the recipe's model: every convolution, BatchNorm, pool and dropout gets one
    /// forward and one backward sample per step, named as the state_dict, with the implementation that
    /// ran (where oneDNN picks a blocked layout, the default runs every convolution but the classifier
    /// on oneDNN's primitives and reorders the activations to channel-major once, before the dropout;
    /// else oneDNN for the Fire 3×3 layers, sgemm for 1×1 layers and the stem) and the FLOPs of its call
    /// (the stem's backward without the input gradient nobody needs).
    @Test func everyLayerTimedOncePerStepWithWhatRan() throws {
        var c = ModelConfig()
        c.batchNorm = true
        c.lateDownsample = true
        let net = Network(config: c, seed: 1)
        let profile = LayerProfile()
        net.profile = profile
        let s = Shape(c: 3, n: 2, h: 32, w: 32)
        let x = HostTensor(randomArray(s.count, seed: 50), s)
        for _ in 0..<2 { _ = lossAndGradients(net, x.tensor, labels: [1, 2]) }
        let byName = Dictionary(uniqueKeysWithValues: profile.entries.map { ($0.name, $0) })
        let convolutions = net.summary(inputSize: 32)
        // a BatchNorm after every convolution but the classifier, 2 max-pools, dropout, the average pool,
        // and the reorder from the blocked layout
        let blocked = DirectConvolution.preferredBlock > 0
        #expect(profile.entries.count == 2 * convolutions.count - 1 + 4 + (blocked ? 1 : 0))
        for entry in profile.entries {
            #expect(entry.forwardSeconds.count == 2 && entry.backwardSeconds.count == 2, "\(entry.name)")
        }
        for row in convolutions {
            let entry = try #require(byName[row.name])
            if row.name != "classifier.1" {
                let bn = try #require(byName[row.name + "_bn"])
                #expect(bn.implementation == "swift" && bn.forwardFLOPs == 0)
            }
            #expect(entry.forwardFLOPs == 2 * row.macs * s.n, "\(row.name)")
            #expect(entry.backwardFLOPs == (row.name == "features.0" ? 2 : 4) * row.macs * s.n, "\(row.name)")
            let oneDNN = blocked ? row.name != "classifier.1" : row.name.hasSuffix("expand3x3")
            #expect((entry.implementation.contains("sgemm")) == !oneDNN, "\(row.name): \(entry.implementation)")
        }
        #expect(byName["features.0"]?.implementation.contains("sgemm") == !blocked)
        #expect((byName["classifier.0.reorder"] != nil) == blocked)
        #expect(byName["classifier.0"] != nil && byName["features.5"] != nil && byName["features.8"] != nil && byName["classifier.3"] != nil)

        profile.clearSamples()
        net.profile = nil
        _ = lossAndGradients(net, x.tensor, labels: [1, 2])
        #expect(profile.entries.allSatisfy { $0.forwardSeconds.isEmpty && $0.backwardSeconds.isEmpty })
    }
}
