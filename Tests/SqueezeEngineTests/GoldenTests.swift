import Foundation
import Testing
@testable import SqueezeEngine
import SqueezeTestSupport

/// PyTorch's full reference (`shared/reference/squeezenet_cifar_golden` beside the checkout: initial weights,
/// batch and every gradient in full), or a path that does not exist; tests reading it carry `.needsPyTorchReference`.
let goldenDirectory = TestInputs.pytorchReference ?? TestInputs.shared + "/reference/squeezenet_cifar_golden"

/// One training-mode forward, the mean softmax cross-entropy and backward, as `Trainer.trainStep`
/// runs them (without the optimizer); parameter gradients are left in `net.parameters`.
func lossAndGradients(_ net: Network, _ x: Tensor, labels: [Int32], labelSmoothing: Float = 0) -> (loss: Float, correct: Int) {
    let logits = net.forward(x, training: true)
    let dl = FloatBuffer(count: logits.shape.count)
    let result = softmaxCrossEntropy(logits: logits.data, classes: logits.shape.c, batch: logits.shape.n,
                                     labels: labels, labelSmoothing: labelSmoothing, gradient: dl.pointer)
    net.backward(Tensor(data: dl.pointer, shape: logits.shape))
    return result
}

/// Relative error against the largest magnitude of the expected tensor.
func relativeError(_ a: [Float], _ b: [Float]) -> Float { maxAbsDiff(a, b) / max(maxAbs(b), 1e-12) }

/// Sets every parameter from the fixtures' formula: element i of the flat vector (the tensors in order, each
/// row-major) is `formulaValue(i, scale: bound(its tensor))`.
func setFormulaWeights(_ net: Network, bound: (ParameterSpec) -> Double) {
    for spec in net.parameters.specs {
        let p = net.parameters.values.pointer + spec.offset, scale = bound(spec)
        for j in 0..<spec.count { p[j] = formulaValue(UInt64(spec.offset + j), scale: scale) }
    }
}

/// `n` images of 3 × `side` × `side` from the formula (NCHW flat index i gives `formulaValue(2^40 + i, scale: 2)`),
/// laid out channel-major (C, N, H, W) as the model takes them.
func formulaImages(_ n: Int, side: Int) -> HostTensor {
    let plane = side * side
    var cnhw = [Float](repeating: 0, count: 3 * n * plane)
    for i in 0..<n { for c in 0..<3 { for q in 0..<plane {
        cnhw[(c * n + i) * plane + q] = formulaValue(1 << 40 + UInt64((i * 3 + c) * plane + q), scale: 2)
    } } }
    return HostTensor(cnhw, Shape(c: 3, n: n, h: side, w: side))
}

/// Per tensor, `values` (gradients or updates, the whole flat vector) against a fixture: the `m` elements it
/// holds as `<key>.<name>` (flat indices ⌊k × count / m⌋, m = min(64, count)) within `tolerance` of their
/// largest magnitude, and the L2 norm it holds as `<normKey>.<name>` within `normTolerance`.
func expectSampled(_ values: [Float], of net: Network, _ expected: [String: SafetensorsTensor], key: String, tolerance: Float,
                   normKey: String? = nil, normTolerance: Float = 0) throws {
    for spec in net.parameters.specs {
        let v = values[spec.range], m = min(64, spec.count)
        if let normKey {
            let norm = Float(v.reduce(0.0) { $0 + Double($1) * Double($1) }.squareRoot())
            let want = try #require(expected[normKey + "." + spec.name]).floats()[0]
            #expect(abs(norm - want) <= normTolerance * want, "\(spec.name): \(key) norm \(norm), PyTorch \(want)")
        }
        let sampled = (0..<m).map { v[spec.offset + $0 * spec.count / m] }
        let err = relativeError(sampled, try #require(expected[key + "." + spec.name]).floats())
        #expect(err < tolerance, "\(spec.name): \(key) elements, relative error \(err)")
    }
}

/// The golden step that needs nothing beside the checkout: Tests/Fixtures/squeezenet-step.safetensors, written
/// by scripts/make-golden-fixture.py. The reference's model and optimizer; the weights and the 8 images come
/// from the formula both sides compute, so the fixture (40 KB) holds only PyTorch's answers: logits, loss,
/// each gradient's norm and 64 of its elements, three SGD steps' losses and 64 elements of each update.
@Suite("PyTorch step (squeezenet1_1, CIFAR stem, batch 8, committed fixture)")
struct GoldenFixtureTests {
    static let labels: [Int32] = [3, 7, 0, 9, 1, 5, 2, 8]
    let expected: [String: SafetensorsTensor]
    let x = formulaImages(labels.count, side: 32)

    init() throws {
        expected = try Safetensors.read(path: TestInputs.fixtures + "/squeezenet-step.safetensors").tensors
    }

    func model() -> Network {
        var config = ModelConfig()
        config.dropout = 0
        let net = Network(config: config)
        setFormulaWeights(net) { spec in
            if spec.name.hasSuffix(".bias") { return 0.1 }
            if spec.name == "classifier.1.weight" { return 0.05 * Double(3).squareRoot() }
            return (6 / Double(spec.shape.dropFirst().reduce(1, *))).squareRoot()  // kaiming_uniform_'s range
        }
        return net
    }

    @Test func logitsLossAndEveryGradient() throws {
        let net = model()
        let n = Self.labels.count
        let logits = net.predict(x.tensor)                        // (10, n)
        let want = try #require(expected["logits"]).floats()      // (n, 10)
        #expect(relativeError(logits, (0..<(10 * n)).map { want[($0 % n) * 10 + $0 / n] }) < 1e-5)
        let (loss, _) = lossAndGradients(net, x.tensor, labels: Self.labels)
        let wantLoss = try #require(expected["loss"]).floats()[0]
        #expect(abs(loss - wantLoss) / wantLoss < 1e-5, "loss \(loss), PyTorch \(wantLoss)")
        #expect(net.parameters.specs.count == 52)
        try expectSampled(net.parameters.copyGradients(), of: net, expected, key: "grad", tolerance: 1e-4, normKey: "gradnorm", normTolerance: 1e-4)
    }

    @Test func threeSGDSteps() throws {
        let net = model()
        let before = net.parameters.copyValues()
        let sgd = SGD(parameterCount: net.parameters.count, momentum: 0.9, weightDecay: 5e-4)
        let expectedLosses = try #require(expected["sgd_losses"]).floats()
        for step in 0..<3 {
            let (loss, _) = lossAndGradients(net, x.tensor, labels: Self.labels)
            #expect(abs(loss - expectedLosses[step]) / expectedLosses[step] < 1e-5, "loss before step \(step)")
            sgd.step(net.parameters, learningRate: 0.002)
        }
        let update = zip(net.parameters.copyValues(), before).map { $0 - $1 }
        try expectSampled(update, of: net, expected, key: "sgd_update", tolerance: 1e-3)
    }

    @Test func weightsRoundTripAndMismatchesAreListed() throws {
        let net = model()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("squeezetrain-weights-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("w.safetensors").path
        try net.saveWeights(to: path)
        let other = Network(config: net.config, seed: 99)
        try other.loadWeights(from: path)
        let same = other.parameters.copyValues() == net.parameters.copyValues()  // outside #expect: no element-wise diff
        #expect(same)

        // A 1000-class torchvision-shaped model cannot take the 10-class file: one error names the tensors.
        var wide = ModelConfig()
        wide.classes = 1000
        wide.architecture = .squeezenet1_0
        let wrong = Network(config: wide)
        let before = wrong.parameters.copyValues()
        do {
            try wrong.loadWeights(from: path)
            Issue.record("a mismatched file loaded")
        } catch {
            let message = String(describing: error)
            #expect(message.contains("classifier.1.weight"))
            #expect(message.contains("features.5.squeeze.weight"))  // 1.0 has a Fire module at 5, 1.1 a pool
            #expect(message.contains(path))
        }
        let untouched = wrong.parameters.copyValues() == before  // outside #expect: no element-wise diff
        #expect(untouched)
    }
}

@Suite("PyTorch golden reference (squeezenet1_1, CIFAR stem, batch 8)", .needsPyTorchReference)
struct GoldenTests {
    let expected: [String: SafetensorsTensor]
    let x: HostTensor
    let labels: [Int32]

    init() throws {
        expected = try Safetensors.read(path: goldenDirectory + "/expected.safetensors").tensors
        let batch = try Safetensors.read(path: goldenDirectory + "/batch.safetensors").tensors
        let nchw = try batch["x"]!.floats()
        let (n, c, hw) = (8, 3, 32 * 32)
        // NCHW → channel-major (C, N, H, W)
        var cnhw = [Float](repeating: 0, count: nchw.count)
        for i in 0..<n { for ch in 0..<c { for p in 0..<hw { cnhw[(ch * n + i) * hw + p] = nchw[(i * c + ch) * hw + p] } } }
        x = HostTensor(cnhw, Shape(c: c, n: n, h: 32, w: 32))
        labels = try batch["y"]!.int64s().map { Int32($0) }
    }

    func model() throws -> Network {
        var config = ModelConfig()
        config.dropout = 0  // the reference ran in eval mode
        let net = Network(config: config)
        try net.loadWeights(from: goldenDirectory + "/init.safetensors")
        return net
    }

    @Test func logitsLossAndEveryGradient() throws {
        let net = try model()
        let logits = net.predict(x.tensor)  // (10, 8)
        let expectedLogits = try expected["logits"]!.floats()       // (8, 10)
        let transposed: [Float] = (0..<80).map { (i: Int) -> Float in expectedLogits[(i % 8) * 10 + i / 8] }
        #expect(relativeError(logits, transposed) < 1e-5)

        let (loss, _) = lossAndGradients(net, x.tensor, labels: labels)
        let expectedLoss = try expected["loss"]!.floats()[0]
        #expect(abs(loss - expectedLoss) / expectedLoss < 1e-5)

        let grads = net.parameters.copyGradients()
        for spec in net.parameters.specs {
            let err = relativeError(Array(grads[spec.range]), try expected["grad." + spec.name]!.floats())
            #expect(err < 1e-4, "grad.\(spec.name): relative error \(err)")
        }
    }

    @Test func threeSGDSteps() throws {
        let net = try model()
        let sgd = SGD(parameterCount: net.parameters.count, momentum: 0.9, weightDecay: 5e-4)
        let expectedLosses = try expected["sgd_losses"]!.floats()
        for step in 0..<3 {
            let (loss, _) = lossAndGradients(net, x.tensor, labels: labels)
            #expect(abs(loss - expectedLosses[step]) / expectedLosses[step] < 1e-5, "loss before step \(step)")
            sgd.step(net.parameters, learningRate: 0.002)
        }
        let values = net.parameters.copyValues()
        for spec in net.parameters.specs {
            let err = relativeError(Array(values[spec.range]), try expected["after_sgd." + spec.name]!.floats())
            #expect(err < 1e-5, "after_sgd.\(spec.name): relative error \(err)")
        }
    }
}
