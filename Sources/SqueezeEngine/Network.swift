import SqueezeSystem

/// A model: an ordered list of layers whose parameters live in one `ParameterStore`.
public final class Network {
    public let config: ModelConfig
    public let layers: [any Layer]
    public let parameters: ParameterStore
    /// Non-trained state (BatchNorm running statistics), saved with the weights.
    public let buffers: ParameterStore
    /// The flat range of `parameters` owned by each layer (contiguous, in layer order).
    public let layerRanges: [Range<Int>]
    private let workspace = Workspace()
    /// Records each layer's forward and backward in a timeline (nil: not traced).
    public var tracer: Tracer?

    /// The arithmetic of the convolution GEMMs (`Precision`); fp32 unless set.
    public var precision: Precision {
        get { workspace.precision }
        set { workspace.precision = newValue }
    }

    /// How training-mode fp32 convolutions are computed: `automatic` (the default) picks per layer
    /// shape; `gemm` and `onednn` force one algorithm everywhere (for debugging and measurements).
    public var convolutionAlgorithm: ConvolutionAlgorithm {
        get { workspace.convolutionAlgorithm }
        set { workspace.convolutionAlgorithm = newValue }
    }

    /// Records per-layer times of training-mode forward and backward passes while set (`bench train --layers`).
    public var profile: LayerProfile? {
        get { workspace.profile }
        set { workspace.profile = newValue }
    }

    /// Builds the model and initialises it as torchvision does. SqueezeNet: kaiming-uniform
    /// convolutions (bound √(6 / fan_in)), normal(0, 0.01) for the final classifier convolution, zero
    /// biases; BatchNorm γ = 1, β = 0, running mean 0, variance 1. AlexNet keeps PyTorch's layer
    /// defaults: weights and biases uniform in ±1/√fan_in. `seed` makes it reproducible.
    public init(config: ModelConfig, seed: UInt64 = 0) {
        self.config = config
        layers = Network.layers(config, workspace: workspace, seed: seed)
        parameters = ParameterStore(layers.flatMap(\.parameterSpecs))
        buffers = ParameterStore(layers.flatMap(\.bufferSpecs))
        var ranges = [Range<Int>](), offset = 0
        for layer in layers {
            let n = layer.parameterSpecs.reduce(0) { $0 + $1.count }
            ranges.append(offset..<(offset + n))
            offset += n
        }
        layerRanges = ranges
        for layer in layers { layer.bind(parameters: parameters, buffers: buffers) }
        initialize(seed: seed)
    }

    public func initialize(seed: UInt64) {
        var rng = SeededRNG(seed: seed, stream: 0x1417)
        if config.architecture == .alexnet {
            var bound: Float = 0
            for spec in parameters.specs {  // each weight precedes its bias
                if spec.shape.count > 1 { bound = 1 / Float(spec.shape.dropFirst().reduce(1, *)).squareRoot() }
                let p = parameters.values.pointer + spec.offset
                for i in 0..<spec.count { p[i] = rng.uniform(-bound, bound) }
            }
            return
        }
        for spec in parameters.specs {
            let p = parameters.values.pointer + spec.offset
            if spec.shape.count == 4 {
                let fanIn = spec.shape[1] * spec.shape[2] * spec.shape[3]
                if spec.name == "classifier.1.weight" {
                    for i in 0..<spec.count { p[i] = 0.01 * rng.normal() }
                } else {
                    let bound = Float((6.0 / Double(fanIn)).squareRoot())
                    for i in 0..<spec.count { p[i] = rng.uniform(-bound, bound) }
                }
            } else {
                let one = spec.name.hasSuffix("_bn.weight")
                p.update(repeating: one ? 1 : 0, count: spec.count)
            }
        }
        for spec in buffers.specs {
            (buffers.values.pointer + spec.offset).update(repeating: spec.name.hasSuffix("running_var") ? 1 : 0, count: spec.count)
        }
    }

    public var dropouts: [Dropout] { layers.compactMap { $0 as? Dropout } }

    public func outputShape(batch: Int, height: Int, width: Int) -> Shape {
        layers.reduce(Shape(c: 3, n: batch, h: height, w: width)) { $1.outputShape($0) }
    }

    /// x is (3, N, H, W) channel-major. Returns the logits as (classes, N, 1, 1). The input is not modified.
    /// Training mode keeps what `backward` needs; eval mode keeps nothing (its activations rotate
    /// through three shared buffers, and the logits are valid until the next forward).
    /// A training step runs in oneDNN's blocked layout (Blocked.swift) from the stem on, as long as the
    /// layers take it, and is reordered to channel-major before the first that does not (the classifier,
    /// or a Fire module whose channels are no multiple of the block); channel-major from there on.
    public func forward(_ x: Tensor, training: Bool) -> Tensor {
        workspace.block = training ? trainingBlock : 0
        let profile = training ? workspace.profile : nil
        var h = x
        for (i, layer) in layers.enumerated() {
            if h.block > 0 && !Network.accepts(layer, block: h.block) {
                let blocked = h, slot = unblocked[i] ?? Slot()
                unblocked[i] = slot
                h = slot.tensor(h.shape)
                profiled(profile, layer.name + ".reorder", "swift", backward: false) { BlockedKernels.toChannelMajor(blocked, into: h) }
                reblock[i] = blocked.block
                workspace.block = 0
            } else {
                reblock[i] = nil
            }
            let input = h
            h = traced(tracer, .compute, "forward", "forward " + layer.name) {
                profiledUnlessSplit(profile, layer, backward: false) { layer.forward(input, training: training) }
            }
        }
        return h
    }

    /// Channel-major copies of blocked activations, by the index of the layer they feed.
    private var unblocked = [Int: Slot]()
    /// The block to give back to the input gradient of each layer whose input was reordered (by index).
    private var reblock = [Int: Int]()
    private let reblocked = Slot()

    /// The channel block of a training step's blocked layout on this CPU, 0 for channel-major: fp32,
    /// SqueezeNet, oneDNN's primitives allowed and a stem that can write blocked outputs.
    var trainingBlock: Int {
        guard workspace.precision == .fp32, workspace.convolutionAlgorithm != .gemm, config.architecture != .alexnet,
              let stem = layers.first as? Conv2d else { return 0 }
        let block = DirectConvolution.preferredBlock
        return block > 0 && stem.acceptsBlocked(block) ? block : 0
    }

    private static func accepts(_ layer: any Layer, block: Int) -> Bool {
        switch layer {
        case let conv as Conv2d: return conv.acceptsBlocked(block)
        case let fire as Fire: return fire.acceptsBlocked(block)
        case is MaxPool: return true
        default: return false
        }
    }

    /// Times `layer` as a whole, unless it times its own parts (convolutions, their BatchNorms).
    private func profiledUnlessSplit<R>(_ profile: LayerProfile?, _ layer: any Layer, backward: Bool, _ body: () -> R) -> R {
        guard !(layer is Conv2d || layer is Fire) else { return body() }
        return profiled(profile, layer.name, "swift", backward: backward, body)
    }

    /// Backward from dL/dlogits (modified in place). Parameter gradients are overwritten.
    /// `gradientsReady` is called with each layer's flat parameter range as soon as its gradients
    /// are final, in reverse layer order (for overlapping the all-reduce with the rest of backward).
    public func backward(_ dLogits: Tensor, gradientsReady: ((Range<Int>) -> Void)? = nil) {
        var g: Tensor? = dLogits
        for i in layers.indices.reversed() {
            g = traced(tracer, .compute, "backward", "backward " + layers[i].name) {
                profiledUnlessSplit(workspace.profile, layers[i], backward: true) { layers[i].backward(g!, needInputGradient: i > 0) }
            }
            if let block = reblock[i], let gradient = g {
                let blocked = reblocked.tensor(gradient.shape, block: block)
                profiled(workspace.profile, layers[i].name + ".reorder", "swift", backward: true) {
                    BlockedKernels.toBlocked(gradient, into: blocked)
                }
                g = blocked
            }
            if let gradientsReady, !layerRanges[i].isEmpty { gradientsReady(layerRanges[i]) }
        }
    }

    /// Eval-mode logits (no gradients), class-major: element `c * n + j` is class `c` of image `j`.
    public func predict(_ x: Tensor) -> [Float] {
        let logits = forward(x, training: false)
        return Array(UnsafeBufferPointer(start: logits.data, count: logits.shape.count))
    }
}

/// One row of a parameter table (the paper's Table 1): a convolution with its weight shape,
/// its parameter count (weight, bias and BatchNorm γ/β), its output size (C, H, W) and its
/// multiply-accumulates for one image, forward: Cout·Hout·Wout·Cin·k·k (weights only; bias,
/// BatchNorm, ReLU and pooling are not counted, as fvcore and the papers count).
public struct LayerSummary: Sendable {
    public var name: String
    public var weightShape: [Int]
    public var parameters: Int
    public var output: [Int]
    public var macs: Int
}

extension Network {
    /// Per-convolution summary for inputs of `inputSize`×`inputSize`.
    public func summary(inputSize: Int) -> [LayerSummary] {
        var rows = [LayerSummary]()
        var shape = Shape(c: 3, n: 1, h: inputSize, w: inputSize)
        func add(_ conv: Conv2d, _ input: Shape) {
            let out = conv.outputShape(input)
            rows.append(LayerSummary(name: conv.name, weightShape: conv.weightSpec.shape,
                                     parameters: conv.parameterSpecs.reduce(0) { $0 + $1.count },
                                     output: [out.c, out.h, out.w],
                                     macs: out.c * out.h * out.w * conv.cin * conv.kernel * conv.kernel))
        }
        for layer in layers {
            if let conv = layer as? Conv2d { add(conv, shape) }
            if let fire = layer as? Fire {
                add(fire.squeeze, shape)
                let s = fire.squeeze.outputShape(shape)
                add(fire.expand1x1, s)
                add(fire.expand3x3, s)
            }
            shape = layer.outputShape(shape)
        }
        return rows
    }

    /// Multiply-accumulates of one image's forward pass (the sum of `summary`'s). A training step
    /// costs about three times this per image: forward, backward-data and backward-weights.
    public func forwardMACs(inputSize: Int) -> Int { summary(inputSize: inputSize).reduce(0) { $0 + $1.macs } }
}
