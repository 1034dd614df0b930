import Testing
@testable import SqueezeEngine

@Suite("SqueezeNet models")
struct ModelTests {
    func config(_ arch: ModelConfig.Architecture, classes: Int, stem: ModelConfig.Stem) -> ModelConfig {
        var c = ModelConfig()
        c.architecture = arch; c.classes = classes; c.stem = stem
        return c
    }

    @Test func parameterTotalsMatchTorchvision() {
        #expect(Network(config: config(.squeezenet1_0, classes: 1000, stem: .imagenet)).parameters.count == 1_248_424)
        #expect(Network(config: config(.squeezenet1_1, classes: 1000, stem: .imagenet)).parameters.count == 1_235_496)
        #expect(Network(config: config(.squeezenet1_1, classes: 10, stem: .cifar)).parameters.count == 727_626)
    }

    /// Forward multiply-accumulates per image, against two independent sources: torchvision's
    /// published figures for the ImageNet models (0.82 and 0.35 "GFLOPS", which count MACs), and
    /// the CIFAR model worked out by hand, layer by layer (Cout·H·W·Cin·k·k, Fire = squeeze + 1×1 + 3×3).
    @Test func forwardMACsMatchTorchvisionAndAHandCount() {
        let v10 = Network(config: config(.squeezenet1_0, classes: 1000, stem: .imagenet)).forwardMACs(inputSize: 224)
        let v11 = Network(config: config(.squeezenet1_1, classes: 1000, stem: .imagenet)).forwardMACs(inputSize: 224)
        #expect((815_000_000...825_000_000).contains(v10), "squeezenet1_0: \(v10)")
        #expect((345_000_000...355_000_000).contains(v11), "squeezenet1_1: \(v11)")
        let cifar = [64 * 32 * 32 * 27,                                                  // conv1, 3×3 on 32×32
                     (16 * 64 + 64 * 16 + 64 * 16 * 9) * 256, (16 * 128 + 64 * 16 + 64 * 16 * 9) * 256,     // fire3, fire4 at 16×16
                     (32 * 128 + 128 * 32 + 128 * 32 * 9) * 64, (32 * 256 + 128 * 32 + 128 * 32 * 9) * 64,  // fire6, fire7 at 8×8
                     (48 * 256 + 192 * 48 * 10) * 16, (48 * 384 + 192 * 48 * 10) * 16,                     // fire9, fire10 at 4×4
                     (64 * 384 + 256 * 64 * 10) * 16, (64 * 512 + 256 * 64 * 10) * 16,                     // fire11, fire12
                     10 * 512 * 16]                                                                           // classifier
        let rows = Network(config: config(.squeezenet1_1, classes: 10, stem: .cifar)).summary(inputSize: 32)
        #expect(rows.reduce(0) { $0 + $1.macs } == cifar.reduce(0, +))
        #expect(rows.first?.macs == 1_769_472)
    }

    @Test func stateDictNamesAndShapesFollowTorchvision() {
        let net = Network(config: config(.squeezenet1_1, classes: 10, stem: .cifar))
        let names = net.parameters.specs.map(\.name)
        #expect(names.count == 52)
        #expect(names.prefix(4) == ["features.0.weight", "features.0.bias", "features.3.squeeze.weight", "features.3.squeeze.bias"])
        #expect(names.contains("features.12.expand3x3.weight"))
        #expect(names.suffix(2) == ["classifier.1.weight", "classifier.1.bias"])
        #expect(net.parameters.spec("features.0.weight")?.shape == [64, 3, 3, 3])
        #expect(net.parameters.spec("features.6.expand3x3.weight")?.shape == [128, 32, 3, 3])
        #expect(net.parameters.spec("classifier.1.weight")?.shape == [10, 512, 1, 1])
        // 1.0 pools after features.2, .6, .11: Fire modules at 3, 4, 5, 7, 8, 9, 10, 12.
        let v10 = Network(config: config(.squeezenet1_0, classes: 1000, stem: .imagenet))
        let fires = Set(v10.parameters.specs.compactMap { $0.name.hasSuffix(".squeeze.weight") ? $0.name : nil })
        #expect(fires == Set([3, 4, 5, 7, 8, 9, 10, 12].map { "features.\($0).squeeze.weight" }))
        #expect(v10.parameters.spec("features.0.weight")?.shape == [96, 3, 7, 7])
    }

    @Test func outputShapes() {
        let cifar = Network(config: config(.squeezenet1_1, classes: 10, stem: .cifar))
        #expect(cifar.outputShape(batch: 2, height: 32, width: 32) == Shape(c: 10, n: 2, h: 1, w: 1))
        var late = config(.squeezenet1_1, classes: 10, stem: .cifar)
        late.lateDownsample = true
        let lateNet = Network(config: late)
        #expect(lateNet.layers.compactMap { $0 as? MaxPool }.map(\.name) == ["features.5", "features.8"])
        #expect(lateNet.parameters.count == 727_626)
    }

    @Test func metaParametersGenerateTheFireStack() {
        let meta = ModelConfig.FireMeta()
        #expect(meta.fire(0) == (16, 64, 64))
        #expect(meta.fire(3) == (32, 128, 128))
        #expect(meta.fire(7) == (64, 256, 256))
        var c = config(.squeezenet1_0, classes: 1000, stem: .imagenet)
        c.fire.squeezeRatio = 0.75  // the paper's Figure 2 sweep
        c.fire.pct3x3 = 0.25
        let net = Network(config: c)
        #expect(net.parameters.spec("features.3.squeeze.weight")?.shape == [96, 96, 1, 1])
        #expect(net.parameters.spec("features.3.expand3x3.weight")?.shape == [32, 96, 3, 3])
    }

    @Test func variantsAddTheirParameters() {
        var bn = config(.squeezenet1_1, classes: 10, stem: .cifar)
        bn.batchNorm = true
        let net = Network(config: bn)
        // γ and β for every convolution but the classifier (25 of them)
        let convChannels = net.parameters.specs.filter { $0.name.hasSuffix(".bias") && !$0.name.contains("_bn") && $0.name != "classifier.1.bias" }
            .reduce(0) { $0 + $1.count }
        #expect(net.parameters.count == 727_626 + 2 * convChannels)
        #expect(net.buffers.count == 2 * convChannels)
        var bypass = config(.squeezenet1_0, classes: 10, stem: .cifar)
        bypass.bypass = .simple
        let b = Network(config: bypass)
        // 1.0: Fire modules at 3, 4, 5, 7, 8, 9, 10, 12; those keeping their width are 4 (128), 7 (256), 9 (384), 12 (512).
        #expect(b.layers.compactMap { $0 as? Fire }.filter(\.bypass).map(\.name) == ["features.4", "features.7", "features.9", "features.12"])
    }

    @Test func initialisationIsSeededAndFollowsTorchvision() {
        let a = Network(config: ModelConfig(), seed: 7), b = Network(config: ModelConfig(), seed: 7)
        let c = Network(config: ModelConfig(), seed: 8)
        // Compared outside #expect, which would diff the 727,626 values one by one on a failure.
        let sameSeed = a.parameters.copyValues() == b.parameters.copyValues()
        let otherSeed = a.parameters.copyValues() != c.parameters.copyValues()
        #expect(sameSeed && otherSeed)
        let values = a.parameters.copyValues()
        let w0 = values[a.parameters.spec("features.0.weight")!.range]
        let bound = Float((6.0 / 27.0).squareRoot())
        #expect(w0.allSatisfy { abs($0) <= bound } && w0.contains { abs($0) > 0.9 * bound })
        #expect(values[a.parameters.spec("features.0.bias")!.range].allSatisfy { $0 == 0 })
        let cls = values[a.parameters.spec("classifier.1.weight")!.range]
        let std = (cls.reduce(0) { $0 + Double($1 * $1) } / Double(cls.count)).squareRoot()
        #expect(abs(std - 0.01) < 0.001)
    }

    @Test func sgdFollowsPyTorchsRule() throws {
        let store = ParameterStore([ParameterSpec(name: "p", shape: [2])])
        try store.load([1, -2])
        let sgd = SGD(parameterCount: 2, momentum: 0.9, weightDecay: 0.1, nesterov: false)
        store.gradients.pointer[0] = 0.5; store.gradients.pointer[1] = 0.25
        sgd.step(store, learningRate: 0.1)
        // d = g + 0.1 p = (0.6, 0.05); b = d; p -= 0.1 b
        #expect(store.copyValues() == [1 - 0.1 * Float(0.6), -2 - 0.1 * Float(0.05)])
        sgd.step(store, learningRate: 0.1)
        let p1 = Float(1 - 0.1 * Float(0.6)), d1 = Float(0.5) + 0.1 * p1, b1 = 0.9 * Float(0.6) + d1
        #expect(store.copyValues()[0] == p1 - 0.1 * b1)

        let n = ParameterStore([ParameterSpec(name: "p", shape: [1])])
        try n.load([1])
        #expect(throws: ParameterCountMismatch(expected: 1, found: 2)) { try n.load([1, 2]) }
        let nesterov = SGD(parameterCount: 1, momentum: 0.9, weightDecay: 0, nesterov: true)
        n.gradients.pointer[0] = 1
        nesterov.step(n, learningRate: 0.1)
        let b: Float = 0.9 * 0 + 1, d: Float = 1 + 0.9 * b, lr: Float = 0.1
        #expect(n.copyValues()[0] == 1 - lr * d)
    }

    /// DGC's momentum correction: the gradient arrives with its momentum; the optimizer's momentum acts
    /// on the weight decay alone (DGC's DGCSGD), and with no weight decay the step is plain SGD.
    @Test func sgdWithMomentumCorrectionAppliesMomentumToTheDecayOnly() throws {
        let store = ParameterStore([ParameterSpec(name: "p", shape: [1])])
        try store.load([2])
        let sgd = SGD(parameterCount: 1, momentum: 0.9, weightDecay: 0.1, nesterov: false)
        sgd.momentumCorrected = true
        store.gradients.pointer[0] = 0.5
        sgd.step(store, learningRate: 0.1)
        // b = 0.1·2 = 0.2; p = 2 − 0.1·(0.5 + 0.2) = 1.93
        let p1: Float = 2 - 0.1 * (0.5 + 0.2)
        #expect(store.copyValues() == [p1])
        sgd.step(store, learningRate: 0.1)
        // b = 0.9·0.2 + 0.1·p1; p = p1 − 0.1·(0.5 + b): the gradient gets no momentum of its own.
        let b2: Float = 0.9 * 0.2 + 0.1 * p1
        #expect(store.copyValues() == [p1 - 0.1 * (0.5 + b2)])
        let plain = SGD(parameterCount: 1, momentum: 0.9, weightDecay: 0, nesterov: true)
        plain.momentumCorrected = true
        try store.load([1])
        store.gradients.pointer[0] = 0.5
        var expected: Float = 1
        for _ in 0..<3 {
            plain.step(store, learningRate: 0.1)
            expected -= Float(0.1) * Float(0.5)
        }
        #expect(store.copyValues() == [expected])
    }

    @Test func learningRateSchedules() {
        let cos = LearningRateSchedule(kind: .cosine, baseRate: 0.1, totalSteps: 110, warmupSteps: 10)
        #expect(cos.rate(at: 0) == 0.01)
        #expect(cos.rate(at: 9) == 0.1)
        #expect(abs(cos.rate(at: 60) - 0.05) < 1e-6)
        #expect(cos.rate(at: 110) == 0)
        let step = LearningRateSchedule(kind: .step, baseRate: 1, totalSteps: 100)
        #expect(step.rate(at: 49) == 1 && step.rate(at: 50) == Float(0.1) && step.rate(at: 75) == Float(0.1) * Float(0.1))
        #expect(LearningRateSchedule(kind: .constant, baseRate: 0.3, totalSteps: 5).rate(at: 4) == 0.3)
    }

    @Test func smallModelOverfitsATinyBatch() {
        // With torchvision's initialisation SqueezeNet (and PyTorch's alike) learns slowly and erratically
        // at first: the classifier's ReLU leaves few logits alive. The BatchNorm variant trains at once.
        var c = ModelConfig()
        c.dropout = 0
        c.batchNorm = true
        let net = Network(config: c, seed: 1)
        let s = Shape(c: 3, n: 8, h: 32, w: 32)
        let x = HostTensor(randomArray(s.count, seed: 40), s)
        let labels: [Int32] = [0, 1, 2, 3, 4, 5, 6, 7]
        let sgd = SGD(parameterCount: net.parameters.count, momentum: 0.9, weightDecay: 0)
        var losses = [Float]()
        for _ in 0..<30 {
            losses.append(lossAndGradients(net, x.tensor, labels: labels).loss)
            sgd.step(net.parameters, learningRate: 0.05)
        }
        // ln 10 ≈ 2.30 at the start; memorising 8 images must bring it below 0.05.
        #expect(losses[0] > 2.0)
        #expect(losses.last! < 0.05, "losses: \(losses)")
        #expect(lossAndGradients(net, x.tensor, labels: labels).correct == 8)  // batch statistics, as trained
    }
}
