import Testing
@testable import SqueezeEngine

/// A training step in oneDNN's blocked layout (Blocked.swift) against the same step channel-major.
@Suite("Blocked layouts")
struct BlockedLayoutTests {
    /// x (channel-major) in the blocked layout and back, through the network's reorders.
    func blocked(_ x: HostTensor, block: Int) -> (Tensor, FloatBuffer) {
        let buffer = FloatBuffer(count: x.shape.count)
        let t = Tensor(blocked: buffer.pointer, shape: x.shape, block: block)
        BlockedKernels.toBlocked(x.tensor, into: t)
        return (t, buffer)
    }

    func channelMajor(_ t: Tensor) -> [Float] {
        let out = HostTensor([Float](repeating: 0, count: t.shape.count), t.shape)
        BlockedKernels.toChannelMajor(t, into: out.tensor)
        return array(out.tensor)
    }

    @Test(arguments: [8, 16])
    func reordersRoundTripAndPlaceEachChannel(block: Int) {
        let s = Shape(c: 32, n: 3, h: 5, w: 7)
        let values: [Float] = randomArray(s.count, seed: 3)
        let (t, keep) = blocked(HostTensor(values, s), block: block)
        // element [n][c][h][w] at n·C·H·W + (c / B)·H·W·B + (h·W + w)·B + c % B
        let (c, n, h, w) = (19, 2, 3, 4)
        #expect(t.data[n * s.c * s.plane + (c / block) * s.plane * block + (h * s.w + w) * block + c % block]
                == values[((c * s.n + n) * s.h + h) * s.w + w])
        #expect(channelMajor(t) == values)
        #expect(channelMajor(t.channels(block, 16)) == Array(values[(block * s.columns)..<((block + 16) * s.columns)]))
        withExtendedLifetime(keep) {}
    }

    /// The blocked max-pool equals the channel-major one (ceil-mode edges, ties to the first maximum).
    @Test(arguments: [8, 16], [false, true])
    func maxPool(block: Int, ties: Bool) {
        let s = Shape(c: 16, n: 3, h: 13, w: 13)
        let random: [Float] = randomArray(s.count, seed: 12)
        let xs = ties ? random.map { max(0, ($0 * 2).rounded()) } : random
        let x = HostTensor(xs, s)
        let plain = MaxPool(name: "p"), pool = MaxPool(name: "p")
        let y = plain.forward(x.tensor, training: true)
        let (xb, keep) = blocked(x, block: block)
        let yb = pool.forward(xb, training: true)
        #expect(yb.block == block)
        #expect(channelMajor(yb) == array(y))
        let dy = HostTensor(randomArray(y.shape.count, seed: 13), y.shape)
        let dx = plain.backward(dy.tensor, needInputGradient: true)!
        let (dyb, keepGradient) = blocked(dy, block: block)
        let dxb = pool.backward(dyb, needInputGradient: true)!
        #expect(channelMajor(dxb) == array(dx))
        withExtendedLifetime((x, dy, keep, keepGradient)) {}
    }

    /// One training step of each model variant blocked (the default) and channel-major (`gemm`): the
    /// same loss, gradients and running statistics up to summation order. The algorithms round
    /// differently, so a ReLU mask at z ≈ μ may flip: one flipped element moved a bias gradient by 1.8%
    /// of its largest element (features.12.expand1x1 of the recipe's model here), while a misplaced channel
    /// or image moves it by O(1); NumericsTests measures the accuracy against float64.
    @Test(arguments: [(false, false, ModelConfig.Bypass.none), (true, true, .none), (true, false, .simple)])
    func trainingStepMatchesChannelMajor(batchNorm: Bool, lateDownsample: Bool, bypass: ModelConfig.Bypass) throws {
        var c = ModelConfig()
        (c.batchNorm, c.lateDownsample, c.bypass) = (batchNorm, lateDownsample, bypass)
        try compareStep(c)
    }

    /// Section 5's meta-parameters with base_e = incr_e = 32 give Fire modules of 8 and 24 squeeze and
    /// expand channels: the step leaves the blocked layout before the first that cannot take it.
    @Test func aFireWithChannelsOffTheBlockRunsChannelMajor() throws {
        var c = ModelConfig()
        c.batchNorm = true
        c.fire.baseE = 32; c.fire.incrE = 32
        try compareStep(c)
    }

    func compareStep(_ c: ModelConfig) throws {
        try #require(DirectConvolution.preferredBlock > 0, "oneDNN picks no blocked layout on this CPU")
        let batchNorm = c.batchNorm
        let blockedNet = Network(config: c, seed: 5), plainNet = Network(config: c, seed: 5)
        plainNet.convolutionAlgorithm = .gemm
        #expect(blockedNet.trainingBlock == DirectConvolution.preferredBlock)
        #expect(plainNet.trainingBlock == 0)
        let s = Shape(c: 3, n: 3, h: 16, w: 16)
        let x = HostTensor(randomArray(s.count, seed: 41), s)
        let labels: [Int32] = [1, 4, 9]
        let a = lossAndGradients(blockedNet, x.tensor, labels: labels)
        let b = lossAndGradients(plainNet, x.tensor, labels: labels)
        #expect(abs(a.loss - b.loss) < 1e-5 * abs(b.loss), "loss \(a.loss) vs \(b.loss)")
        #expect((blockedNet.layers[0] as? Conv2d)?.implementation.contains("sgemm") == false)
        let gradients = blockedNet.parameters.copyGradients(), references = plainNet.parameters.copyGradients()
        for spec in blockedNet.parameters.specs {
            let g = Array(gradients[spec.range]), ref = Array(references[spec.range])
            let error = spec.name.hasSuffix(".bias") && batchNorm && !spec.name.contains("_bn") && spec.name != "classifier.1.bias"
                ? maxAbsDiff(g, ref) : relativeError(g, ref)  // a bias before BatchNorm: Σ dz = 0 up to rounding
            #expect(error < 5e-2, "\(spec.name): \(error)")
        }
        let runningStatistics = relativeError(blockedNet.buffers.copyValues(), plainNet.buffers.copyValues())
        #expect(runningStatistics < 1e-5)
        withExtendedLifetime(x) {}
    }
}
