import Foundation
import Testing
@testable import SqueezeEngine

/// The golden files written by PyTorch, in `shared/` beside the package checkout.
let goldenDirectory = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent()  // SqueezeEngineTests
    .deletingLastPathComponent()  // Tests
    .deletingLastPathComponent()  // package root
    .deletingLastPathComponent()  // the directory holding the checkout and shared/
    .appendingPathComponent("shared/reference/squeezenet_cifar_golden").path

/// Tests that read the golden files are reported as skipped, with the reason, when ../shared is absent.
extension Trait where Self == ConditionTrait {
    static var needsGolden: Self {
        .enabled(if: ["init", "batch", "expected"].allSatisfy { FileManager.default.fileExists(atPath: "\(goldenDirectory)/\($0).safetensors") },
                 "needs PyTorch's reference in ../shared/reference/squeezenet_cifar_golden beside the checkout")
    }
}

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

@Suite("PyTorch golden reference (squeezenet1_1, CIFAR stem, batch 8)", .needsGolden)
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

    @Test func weightsRoundTripAndMismatchesAreListed() throws {
        let net = try model()
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
