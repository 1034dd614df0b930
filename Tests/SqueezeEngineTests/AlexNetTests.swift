import Foundation
import Testing
@testable import SqueezeEngine
import SqueezeTestSupport

/// Tests/Fixtures: small committed inputs.
let fixturesDirectory = TestInputs.fixtures

/// scale × (2u − 1), u the top 53 bits of splitmix64(i) as a fraction, rounded once to Float: the values
/// scripts/make-alexnet-fixture.py computes for flat index i.
func formulaValue(_ i: UInt64, scale: Double) -> Float {
    var z = i &+ 0x9E37_79B9_7F4A_7C15
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    z ^= z >> 31
    return Float(scale * (2 * (Double(z >> 11) * 0x1p-53) - 1))
}

/// AlexNet, the study's large model. `oneStepMatchesPyTorch` is its numeric oracle (a committed fixture);
/// the end-to-end comparison with PyTorch (two SGD steps from torchvision's weights on real CIFAR-10
/// records) is `scripts/check-alexnet.py`, run by hand: it needs torch and 228 MB of weights.
@Suite("AlexNet")
struct AlexNetTests {
    var alexnet: ModelConfig {
        var c = ModelConfig()
        c.architecture = .alexnet
        return c
    }

    @Test func parametersAndStateDictFollowTorchvision() {
        let net = Network(config: alexnet)
        #expect(net.parameters.count == 57_044_810)
        let expected: [(String, [Int])] = [
            ("features.0.weight", [64, 3, 11, 11]), ("features.0.bias", [64]),
            ("features.3.weight", [192, 64, 5, 5]), ("features.3.bias", [192]),
            ("features.6.weight", [384, 192, 3, 3]), ("features.6.bias", [384]),
            ("features.8.weight", [256, 384, 3, 3]), ("features.8.bias", [256]),
            ("features.10.weight", [256, 256, 3, 3]), ("features.10.bias", [256]),
            ("classifier.1.weight", [4096, 9216]), ("classifier.1.bias", [4096]),
            ("classifier.4.weight", [4096, 4096]), ("classifier.4.bias", [4096]),
            ("classifier.6.weight", [10, 4096]), ("classifier.6.bias", [10]),
        ]
        #expect(net.parameters.specs.map(\.name) == expected.map(\.0))
        #expect(net.parameters.specs.map(\.shape) == expected.map(\.1))
        #expect(alexnet.inputSize == 64 && alexnet.cifarImageSize == 64)
        #expect(net.outputShape(batch: 3, height: 64, width: 64) == Shape(c: 10, n: 3, h: 1, w: 1))
        #expect(net.dropouts.map(\.name) == ["classifier.0", "classifier.3"])
    }

    @Test func initialisationIsPyTorchsLayerDefault() {
        let net = Network(config: alexnet, seed: 3)
        for spec in net.parameters.specs {
            let layer = String(spec.name.dropLast(spec.name.hasSuffix(".bias") ? 5 : 7))
            let weight = net.parameters.spec(layer + ".weight")!
            let bound = 1 / Float(weight.shape.dropFirst().reduce(1, *)).squareRoot()
            let v = UnsafeBufferPointer(start: net.parameters.values.pointer + spec.offset, count: spec.count)
            let largest = v.reduce(0) { max($0, abs($1)) }
            #expect(largest <= bound && largest > 0.9 * bound, "\(spec.name): max |w| \(largest), bound \(bound)")
        }
    }

    /// One forward and backward against PyTorch: Tests/Fixtures/alexnet-step.safetensors, written by
    /// scripts/make-alexnet-fixture.py. The weights and the two images come from a formula both sides
    /// compute, so nothing large is committed; the fixture holds the logits, the loss, and each
    /// gradient's norm and 64 of its elements.
    @Test func oneStepMatchesPyTorch() throws {
        let expected = try Safetensors.read(path: fixturesDirectory + "/alexnet-step.safetensors").tensors
        var config = alexnet
        config.dropout = 0
        let net = Network(config: config)
        setFormulaWeights(net) { spec in  // a bias shares its weight's bound
            let layer = String(spec.name.dropLast(spec.name.hasSuffix(".bias") ? 5 : 7))
            return 1 / Double(net.parameters.spec(layer + ".weight")!.shape.dropFirst().reduce(1, *)).squareRoot()
        }
        let x = formulaImages(2, side: 64)

        let logits = net.predict(x.tensor)                       // (10, 2)
        let want = try expected["logits"]!.floats()              // (2, 10)
        #expect(relativeError(logits, (0..<20).map { want[($0 % 2) * 10 + $0 / 2] }) < 1e-4)
        let (loss, _) = lossAndGradients(net, x.tensor, labels: [3, 7])
        let wantLoss = try expected["loss"]!.floats()[0]
        #expect(abs(loss - wantLoss) / wantLoss < 1e-5, "loss \(loss), PyTorch \(wantLoss)")
        #expect(net.parameters.specs.count == 16)
        try expectSampled(net.parameters.copyGradients(), of: net, expected, key: "grad", tolerance: 1e-3,
                          normKey: "gradnorm", normTolerance: 1e-4)
    }

    /// classifier.1 (a convolution whose kernel covers the whole 6×6 map, weight declared (out, in))
    /// is nn.Linear over PyTorch's per-image flatten order (c, h, w), forward and backward.
    @Test func flatConvolutionIsLinearOverTheFlattenedImage() {
        let (cin, cout, side, n) = (3, 4, 2, 2)
        let layer = Conv2d(name: "fc", cin: cin, cout: cout, kernel: side, relu: false, batchNorm: false, flat: true,
                           workspace: Workspace())
        #expect(layer.parameterSpecs.map(\.shape) == [[cout, cin * side * side], [cout]])
        let store = ParameterStore(layer.parameterSpecs)
        layer.bind(parameters: store, buffers: ParameterStore([]))
        var rng = SeededRNG(seed: 1)
        let w = store.values.pointer, k = cin * side * side
        for i in 0..<store.count { w[i] = rng.uniform(-1, 1) }
        let x = FloatBuffer(count: cin * n * side * side)
        for i in 0..<(cin * n * side * side) { x.pointer[i] = rng.uniform(-1, 1) }
        // Image `img`'s flattened feature f = c·side² + p lives at x[c][img][p] (channel-major).
        func feature(_ img: Int, _ f: Int) -> Float { x.pointer[((f / (side * side)) * n + img) * side * side + f % (side * side)] }
        let y = layer.forward(Tensor(data: x.pointer, shape: Shape(c: cin, n: n, h: side, w: side)), training: true)
        #expect(y.shape == Shape(c: cout, n: n, h: 1, w: 1))
        let dy = FloatBuffer(count: cout * n)
        for i in 0..<(cout * n) { dy.pointer[i] = rng.uniform(-1, 1) }
        let dx = layer.backward(Tensor(data: dy.pointer, shape: y.shape), needInputGradient: true)!
        for img in 0..<n {
            for o in 0..<cout {
                var s = w[cout * k + o]  // bias
                for f in 0..<k { s += w[o * k + f] * feature(img, f) }
                #expect(abs(y.data[o * n + img] - s) < 1e-5)
            }
        }
        let dw = store.gradients.pointer
        for o in 0..<cout {
            for f in 0..<k {
                let expected = (0..<n).reduce(Float(0)) { $0 + dy.pointer[o * n + $1] * feature($1, f) }
                #expect(abs(dw[o * k + f] - expected) < 1e-5)
            }
        }
        for img in 0..<n {
            for f in 0..<k {
                let expected = (0..<cout).reduce(Float(0)) { $0 + dy.pointer[$1 * n + img] * w[$1 * k + f] }
                let got = dx.data[((f / (side * side)) * n + img) * side * side + f % (side * side)]
                #expect(abs(got - expected) < 1e-5)
            }
        }
    }

    @Test func adaptiveAveragePoolUsesPyTorchsBinsAndItsBackwardIsTheAdjoint() {
        let pool = AdaptiveAvgPool(name: "avgpool", size: 2)
        // A 3×3 map to 2×2: bins rows/cols {0,1} and {1,2} (they overlap).
        let x = FloatBuffer(count: 9)
        for i in 0..<9 { x.pointer[i] = Float(i) }
        let y = pool.forward(Tensor(data: x.pointer, shape: Shape(c: 1, n: 1, h: 3, w: 3)), training: true)
        #expect(Array(UnsafeBufferPointer(start: y.data, count: 4)) == [2, 3, 5, 6])
        // 1×1 → 6×6 repeats the value (AlexNet on 64×64 inputs).
        let six = AdaptiveAvgPool(name: "avgpool", size: 6)
        var one: Float = 7
        let big = six.forward(Tensor(data: &one, shape: Shape(c: 1, n: 1, h: 1, w: 1)), training: true)
        #expect(UnsafeBufferPointer(start: big.data, count: 36).allSatisfy { $0 == 7 })
        // <pool(x), dy> == <x, pool'(dy)> for a linear map, on a 5×7 map to 3×3 over 2 planes.
        let p3 = AdaptiveAvgPool(name: "p", size: 3)
        var rng = SeededRNG(seed: 9)
        let shape = Shape(c: 2, n: 1, h: 5, w: 7)
        let a = FloatBuffer(count: shape.count), g = FloatBuffer(count: 18)
        for i in 0..<shape.count { a.pointer[i] = rng.uniform(-1, 1) }
        for i in 0..<18 { g.pointer[i] = rng.uniform(-1, 1) }
        let ya = p3.forward(Tensor(data: a.pointer, shape: shape), training: true)
        let lhs = (0..<18).reduce(Double(0)) { $0 + Double(ya.data[$1] * g.pointer[$1]) }
        let dx = p3.backward(Tensor(data: g.pointer, shape: ya.shape), needInputGradient: true)!
        let rhs = (0..<shape.count).reduce(Double(0)) { $0 + Double(a.pointer[$1] * dx.data[$1]) }
        #expect(abs(lhs - rhs) < 1e-5)
    }

    @Test func floorModePoolsShrinkAsTorchvisionsAlexNet() {
        let pool = MaxPool(name: "p", ceilMode: false), ceil = MaxPool(name: "q")
        #expect(pool.outputShape(Shape(c: 1, n: 1, h: 15, w: 15)).h == 7)
        #expect(pool.outputShape(Shape(c: 1, n: 1, h: 6, w: 6)).h == 2)
        #expect(ceil.outputShape(Shape(c: 1, n: 1, h: 6, w: 6)).h == 3)
    }
}
