import SqueezeEngine
import SqueezeTraining

/// Deep Compression's retraining: the per-layer densities of magnitude pruning, and the two
/// constraints a `Trainer` applies around its SGD step (pruned weights held at zero; shared weights
/// moved only through their codebook).

/// Per-layer densities of magnitude pruning. Keys are a layer group of the model's architecture
/// (`groups(of:)`) or a weight tensor's name (which wins over its group).
public struct DensityPolicy: Equatable, Sendable {
    /// SqueezeNet: the released compressed SqueezeNet's shape (Han et al.): the small layers kept
    /// nearly whole, the 3×3 expand filters at about a third, the classifier at about a fifth.
    /// AlexNet: Deep Compression's pruned AlexNet (Han et al., 2016, Table 4): 84% of conv1, 35–38% of
    /// conv2–5, 9% of fc6 and fc7, 25% of fc8 (11% overall).
    public static func defaults(of architecture: ModelConfig.Architecture) -> [String: Double] {
        architecture == .alexnet
            ? ["conv1": 0.84, "conv2": 0.38, "conv3": 0.35, "conv4": 0.37, "conv5": 0.37, "fc6": 0.09, "fc7": 0.09, "fc8": 0.25]
            : ["conv1": 0.99, "squeeze": 0.99, "expand1x1": 0.99, "expand3x3": 0.33, "conv10": 0.21, "other": 1.0]
    }

    /// The layer groups `--density` accepts for an architecture, in order.
    public static func groups(of architecture: ModelConfig.Architecture) -> [String] {
        architecture == .alexnet
            ? ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
            : ["conv1", "squeeze", "expand1x1", "expand3x3", "conv10", "other"]
    }

    /// torchvision's AlexNet weight names → the paper's layer names.
    static let alexNetLayers = ["features.0.weight": "conv1", "features.3.weight": "conv2", "features.6.weight": "conv3",
                                "features.8.weight": "conv4", "features.10.weight": "conv5", "classifier.1.weight": "fc6",
                                "classifier.4.weight": "fc7", "classifier.6.weight": "fc8"]

    public let architecture: ModelConfig.Architecture
    public var densities: [String: Double]

    /// The architecture's defaults with `overrides` (key → density) applied.
    public init(_ architecture: ModelConfig.Architecture, overrides: [String: Double] = [:]) {
        self.architecture = architecture
        densities = DensityPolicy.defaults(of: architecture).merging(overrides) { $1 }
    }

    /// The group a weight tensor belongs to.
    public func group(of name: String) -> String {
        if architecture == .alexnet { return DensityPolicy.alexNetLayers[name] ?? "other" }
        if name == "features.0.weight" { return "conv1" }
        if name == "classifier.1.weight" { return "conv10" }
        for g in ["squeeze", "expand1x1", "expand3x3"] where name.hasSuffix(".\(g).weight") { return g }
        return "other"
    }

    public func density(of name: String) -> Double {
        densities[name] ?? densities[group(of: name)] ?? 1
    }
}

extension Network {
    /// The weight tensors Deep Compression prunes and shares: every parameter of rank 2 or more
    /// (convolution and linear weights); biases and BatchNorm tensors stay plain.
    public var compressibleWeights: [ParameterSpec] { parameters.specs.filter { $0.shape.count >= 2 } }

    /// Copies every parameter and buffer of `other` (a network of the same configuration).
    public func copyState(from other: Network) {
        precondition(other.config == config, "copyState: different models")
        parameters.values.pointer.update(from: other.parameters.values.pointer, count: parameters.count)
        buffers.values.pointer.update(from: other.buffers.values.pointer, count: buffers.count)
    }
}

/// Retraining after magnitude pruning: the pruned weights stay exactly zero. Before every SGD step
/// their gradients and momentum are set to zero, so the update g ← ∇ + λ·p, b ← μ·b + g, p ← p − η·b
/// leaves them at 0 (weight decay of a zero weight is zero), and a checkpoint holds zeros in both.
public final class PrunedTraining: ParameterConstraint {
    /// Per pruned tensor: its place in the parameter buffer and its mask (1 keeps, 0 prunes).
    public let masks: [(spec: ParameterSpec, mask: [Float])]

    /// Prunes `network` now: each tensor in `densities` (name → density in (0, 1]) keeps its
    /// largest-magnitude weights (`magnitudeMask`), the others are set to 0.
    public init(pruning network: Network, densities: [String: Double]) {
        masks = network.compressibleWeights.compactMap { spec in
            guard let density = densities[spec.name] else { return nil }
            let p = network.parameters.values.pointer + spec.offset
            let mask = magnitudeMask(Array(UnsafeBufferPointer(start: p, count: spec.count)), density: density)
            for i in 0..<spec.count where mask[i] == 0 { p[i] = 0 }
            return (spec, mask)
        }
    }

    /// The masks of an already pruned `network` (after a resume): its zero weights are the pruned ones.
    public init(zerosOf network: Network, names: Set<String>) {
        masks = network.compressibleWeights.filter { names.contains($0.name) }.map { spec in
            let p = network.parameters.values.pointer + spec.offset
            return (spec, (0..<spec.count).map { p[$0] == 0 ? 0 : 1 })
        }
    }

    /// Kept weights over all masked weights.
    public var density: Double {
        let kept = masks.reduce(0.0) { $0 + Double($1.mask.reduce(0, +)) }
        return kept / Double(max(masks.reduce(0) { $0 + $1.spec.count }, 1))
    }

    public func willUpdate(_ parameters: ParameterStore, optimizer: SGD, learningRate: Float) {
        let g = parameters.gradients.pointer, b = optimizer.velocity.pointer
        for (spec, mask) in masks {
            for i in 0..<spec.count where mask[i] == 0 { g[spec.offset + i] = 0; b[spec.offset + i] = 0 }
        }
    }

    public func didUpdate(_ parameters: ParameterStore) {}
}

/// Trained quantization: every compressible weight tensor of the network shares the values of a
/// per-layer codebook (k-means with linear initialisation over its nonzero weights; zeros stay pruned).
/// After each SGD step (which trains the plain tensors: biases, BatchNorm) the codebook moves by the
/// gradients summed per cluster (`WeightSharing.step`, at the step's learning rate) and the shared
/// weights are rewritten from it, so they never leave their codebook.
public final class SharedTraining: ParameterConstraint {
    public private(set) var layers: [(spec: ParameterSpec, sharing: WeightSharing)]

    /// Clusters the nonzero weights of each tensor in `names` into at most 2^bits − 1 shared values
    /// and writes the shared values into `network`.
    public init(quantizing network: Network, names: Set<String>, bits: Int) {
        layers = network.compressibleWeights.filter { names.contains($0.name) }.map { spec in
            let weights = Array(UnsafeBufferPointer(start: network.parameters.values.pointer + spec.offset, count: spec.count))
            return (spec, WeightSharing(weights: weights, mask: weights.map { $0 == 0 ? 0 : 1 }, bits: bits))
        }
        write(network.parameters)
    }

    public func willUpdate(_ parameters: ParameterStore, optimizer: SGD, learningRate: Float) {
        let g = parameters.gradients.pointer
        for i in layers.indices {
            let spec = layers[i].spec
            layers[i].sharing.step(gradients: Array(UnsafeBufferPointer(start: g + spec.offset, count: spec.count)), rate: learningRate)
        }
    }

    public func didUpdate(_ parameters: ParameterStore) { write(parameters) }

    /// Overwrites the shared tensors with their codebook values (pruned positions 0).
    private func write(_ parameters: ParameterStore) {
        for (spec, sharing) in layers {
            (parameters.values.pointer + spec.offset).update(from: sharing.values, count: spec.count)
        }
    }

    /// The network as a compressed model: the shared tensors as codebook, codes and relative indices
    /// (`indexBits` wide), every other parameter and buffer plain.
    public func compressedModel(of network: Network, indexBits: Int = 4) -> CompressedModel {
        let shared = Dictionary(uniqueKeysWithValues: layers.map { ($0.spec.name, $0.sharing) })
        func plain(_ spec: ParameterSpec, _ base: UnsafeMutablePointer<Float>) -> CompressedTensor {
            CompressedTensor(name: spec.name, shape: spec.shape,
                             storage: .plain(Array(UnsafeBufferPointer(start: base + spec.offset, count: spec.count))))
        }
        let parameters = network.parameters.specs.map { spec in
            shared[spec.name].map { CompressedTensor(name: spec.name, shape: spec.shape, storage: .shared($0.shared(indexBits: indexBits))) }
                ?? plain(spec, network.parameters.values.pointer)
        }
        return CompressedModel(config: network.config, tensors: parameters + network.buffers.specs.map { plain($0, network.buffers.values.pointer) })
    }
}
