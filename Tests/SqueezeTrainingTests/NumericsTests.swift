import Foundation
import Testing
import SqueezeData
import SqueezeTestSupport
@testable import SqueezeEngine
@testable import SqueezeTraining

/// The PyTorch step fixture's four SGD steps in Double, on `Reference`'s plain kernels: the float64
/// truth that squeezetrain's and PyTorch's float32 runs are both measured against.
///
/// It follows the engine's own layer list (convolutions with ReLU, Fire modules, ceil-mode max-pools,
/// dropout with p = 0, global average pooling), so the topology is the model under test; BatchNorm
/// and bypasses are refused (the fixture's model has neither).
final class DoubleReferenceModel {
    let layers: [any Layer]
    var values: [String: [Double]]
    private var velocity = [String: [Double]]()
    private var gradients = [String: [Double]]()

    init(_ net: Network) {
        layers = net.layers
        let flat = net.parameters.copyValues()
        values = Dictionary(uniqueKeysWithValues: net.parameters.specs.map { ($0.name, flat[$0.range].map(Double.init)) })
    }

    /// Loss before the step; then SGD as `torch.optim.SGD` (dampening 0, no Nesterov).
    func step(x: [Double], shape: Shape, labels: [Int], learningRate lr: Double, momentum mu: Double, weightDecay wd: Double) -> Double {
        var backward = [([Double]) -> [Double]]()
        var (a, s) = (x, shape)
        for layer in layers {
            let (y, ys, back) = forward(layer, a, s)
            (a, s) = (y, ys)
            backward.append(back)
        }
        let (loss, dLogits) = Reference.softmaxCrossEntropy(a, classes: s.c, labels: labels)
        _ = backward.reversed().reduce(dLogits) { g, back in back(g) }
        for (name, g) in gradients {
            var p = values[name]!
            let d = zip(g, p).map { $0 + wd * $1 }
            let v = velocity[name].map { zip($0, d).map { mu * $0 + $1 } } ?? d
            for i in p.indices { p[i] -= lr * v[i] }
            values[name] = p
            velocity[name] = v
        }
        return loss
    }

    private typealias Result = (y: [Double], shape: Shape, backward: ([Double]) -> [Double])

    private func forward(_ layer: any Layer, _ x: [Double], _ s: Shape) -> Result {
        switch layer {
        case let c as Conv2d:
            return convolution(c, x, s)
        case let f as Fire:
            precondition(!f.bypass, "the Double reference has no bypass")
            let (sq, ss, backSqueeze) = convolution(f.squeeze, x, s)
            let (e1, s1, back1) = convolution(f.expand1x1, sq, ss)
            let (e3, s3, back3) = convolution(f.expand3x3, sq, ss)
            // channel-major: the concatenation along channels is the two arrays one after the other
            return (e1 + e3, Shape(c: s1.c + s3.c, n: s.n, h: s1.h, w: s1.w), { dy in
                let d1 = back1(Array(dy[..<e1.count])), d3 = back3(Array(dy[e1.count...]))
                return backSqueeze(zip(d1, d3).map(+))
            })
        case let p as MaxPool:
            precondition(p.ceilMode, "the Double reference pools in ceil mode")
            let r = Reference.maxPool(x, s, kernel: p.kernel, stride: p.stride)
            return (r.y, r.shape, { Reference.maxPoolBackward(dy: $0, argmax: r.argmax, inputCount: x.count) })
        case let d as Dropout:
            precondition(d.p == 0, "the Double reference has no dropout")
            return (x, s, { $0 })
        case is GlobalAvgPool:
            return (Reference.globalAvgPool(x, s), Shape(c: s.c, n: s.n, h: 1, w: 1), { Reference.globalAvgPoolBackward(dy: $0, s) })
        default:
            preconditionFailure("the Double reference has no \(type(of: layer))")
        }
    }

    private func convolution(_ c: Conv2d, _ x: [Double], _ s: Shape) -> Result {
        precondition(c.bn == nil, "the Double reference has no BatchNorm")
        let w = values[c.name + ".weight"]!
        var (y, ys) = Reference.conv2d(x, s, weight: w, bias: values[c.name + ".bias"]!, cout: c.cout,
                                       kernel: c.kernel, stride: c.stride, padding: c.padding)
        if c.relu { y = Reference.relu(y) }
        return (y, ys, { [unowned self] dy in
            let dz = c.relu ? Reference.reluBackward(y, dy: dy) : dy
            let g = Reference.conv2dBackward(x, s, weight: w, dy: dz, cout: c.cout, kernel: c.kernel, stride: c.stride, padding: c.padding)
            gradients[c.name + ".weight"] = g.dw
            gradients[c.name + ".bias"] = g.db
            return g.dx
        })
    }
}

/// Relative error of one tensor's update (after − before) against the float64 reference's update:
/// max |Δ − Δref| / max |Δref|. The update, not the value: 4 steps move the weights by about 1%, so
/// errors relative to the weights themselves would hide what summation order does.
func updateError(_ after: [Float], _ before: [Float], reference: [Double], referenceBefore: [Double]) -> Double {
    var worst = 0.0, scale = 0.0
    for i in after.indices {
        let d = Double(after[i]) - Double(before[i]), r = reference[i] - referenceBefore[i]
        worst = max(worst, abs(d - r)); scale = max(scale, abs(r))
    }
    return worst / max(scale, 1e-30)
}

@Suite("Numerics against a float64 reference (the PyTorch step fixture's four steps)", .needsRealCIFAR10, .needsPyTorchReference)
struct NumericsTests {
    let golden = TestInputs.initialWeights

    /// The fixture's records as the fixture script computes them (float32 arithmetic), channel-major.
    func records(batch: Int, step: Int) throws -> (x: [Double], labels: [Int]) {
        let mean = ModelConfig.engineInputMean, std = ModelConfig.engineInputStd, plane = 32 * 32
        var x = [Double](repeating: 0, count: 3 * batch * plane)
        for j in 0..<batch {
            let image = try firstTrainingFile.image(step * batch + j)
            for c in 0..<3 {
                for p in 0..<plane {
                    let byte = Float(image[image.startIndex + c * plane + p])
                    x[(c * batch + j) * plane + p] = Double((byte / 255 - mean[c]) / std[c])
                }
            }
        }
        let labels = try firstTrainingFile.labels
        return (x, (0..<batch).map { Int(labels[step * batch + $0]) })
    }

    /// With the default convolutions (`automatic`) and with oneDNN's everywhere, squeezetrain's float32
    /// updates must be no further from the float64 ones than PyTorch's float32 updates are (the
    /// fixture), tensor by tensor: PyTorch's error on a tensor is that tensor's tolerance. This is the
    /// evidence that sets the fixture test's tolerances and let oneDNN's summation order become the
    /// default. (`gemm`, im2col + sgemm, is PyTorch's own algorithm: its errors equal PyTorch's to
    /// three or four digits, sometimes a hair above, so it is not held to this; docs/engine.md.)
    @Test func everyUpdateIsAsCloseToFloat64AsPyTorchs() throws {
        let fixture = try Safetensors.read(path: testsDirectory.path + "/Fixtures/pytorch-4-steps.safetensors").tensors
        let config = deterministicConfig(steps: 4)
        var results = [ConvolutionAlgorithm: Trainer]()
        for algorithm in [ConvolutionAlgorithm.automatic, .onednn] {
            let trainer = try Trainer(config: config, trainSet: firstTrainingFile)
            try trainer.network.loadWeights(from: golden)
            trainer.network.convolutionAlgorithm = algorithm
            _ = try train(trainer, steps: 4)
            results[algorithm] = trainer
        }
        let start = Network(config: config.model)
        try start.loadWeights(from: golden)
        let reference = DoubleReferenceModel(start)
        let initial = reference.values
        let pytorchLosses = try fixture["losses"]!.floats()
        for step in 0..<4 {
            let (x, labels) = try records(batch: config.batchSize, step: step)
            let loss = reference.step(x: x, shape: Shape(c: 3, n: config.batchSize, h: 32, w: 32), labels: labels,
                               learningRate: Double(config.learningRate), momentum: Double(config.momentum),
                               weightDecay: Double(config.weightDecay))
            // The reference computes the same steps: PyTorch's losses agree with it (measured: within 1e-6).
            #expect(abs(loss - Double(pytorchLosses[step])) / loss < 1e-5, "loss before step \(step): \(loss) vs PyTorch's \(pytorchLosses[step])")
        }
        let before = start.parameters.copyValues()
        for spec in start.parameters.specs {
            let initialValues = Array(before[spec.range])
            let ref = reference.values[spec.name]!, refBefore = initial[spec.name]!
            let pytorch = updateError(try fixture["after." + spec.name]!.floats(), initialValues, reference: ref, referenceBefore: refBefore)
            #expect(pytorch < 0.02, "\(spec.name): PyTorch's update error \(pytorch): is the reference the same computation?")
            for algorithm in [ConvolutionAlgorithm.automatic, .onednn] {
                let values = results[algorithm]!.network.parameters.copyValues()
                let ours = updateError(Array(values[spec.range]), initialValues, reference: ref, referenceBefore: refBefore)
                #expect(ours <= pytorch, "\(spec.name), \(algorithm.rawValue): update error \(ours) against PyTorch's \(pytorch)")
            }
        }
    }
}
