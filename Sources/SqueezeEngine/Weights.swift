import Foundation

extension Network {
    /// Every tensor saved with the weights, parameters first, then buffers (BatchNorm running statistics).
    var stateSpecs: [(name: String, shape: [Int])] {
        (parameters.specs + buffers.specs).map { ($0.name, $0.shape) }
    }

    /// Writes parameters and buffers as F32 safetensors with torchvision's names (atomically).
    /// The model configuration goes into the metadata as JSON under "squeezetrain.model".
    public func saveWeights(to path: String, metadata: [String: String] = [:]) throws {
        var meta = metadata
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys  // the same weights always make the same file
        meta["squeezetrain.model"] = String(decoding: try encoder.encode(config), as: UTF8.self)
        func views(_ store: ParameterStore) -> [(name: String, shape: [Int], data: UnsafeBufferPointer<Float>)] {
            store.specs.map { ($0.name, $0.shape, UnsafeBufferPointer(start: store.values.pointer + $0.offset, count: $0.count)) }
        }
        try Safetensors.write(path: path, tensors: views(parameters) + views(buffers), metadata: meta)
    }

    /// Loads parameters (and buffers) from safetensors written here or by PyTorch with torchvision's
    /// names. Missing, extra, mis-shaped or non-F32 tensors give one error listing all of them;
    /// nothing is changed unless the whole file fits. BatchNorm's `num_batches_tracked` is ignored.
    public func loadWeights(from path: String) throws {
        var (tensors, _) = try Safetensors.read(path: path)
        tensors = tensors.filter { !$0.key.hasSuffix(".num_batches_tracked") }
        try Safetensors.validate(tensors, expected: stateSpecs, file: path)
        var staged = [(UnsafeMutablePointer<Float>, [Float])]()
        for (store, specs) in [(parameters, parameters.specs), (buffers, buffers.specs)] {
            for spec in specs { staged.append((store.values.pointer + spec.offset, try tensors[spec.name]!.floats())) }
        }
        for (dst, values) in staged { dst.update(from: values, count: values.count) }
    }
}

extension ModelConfig {
    /// Why this configuration is not a model that can be built (named by the command-line option that sets
    /// each field, or by its JSON key where no option does), or nil. Checked for options and for configurations
    /// read from files alike.
    public var invalidReason: String? {
        guard (1...100_000).contains(classes) else { return "--classes must be in 1...100000 (got \(classes))" }
        guard (2...65_536).contains(fire.baseE) else { return "--base-e must be in 2...65536 (got \(fire.baseE))" }
        guard (0...65_536).contains(fire.incrE) else { return "--incr-e must be in 0...65536 (got \(fire.incrE))" }
        guard (1...64).contains(fire.freq) else { return "--freq must be in 1...64 (got \(fire.freq))" }
        guard fire.pct3x3 > 0, fire.pct3x3 < 1 else { return "--pct-3x3 must be strictly between 0 and 1 (got \(fire.pct3x3))" }
        guard fire.squeezeRatio > 0, fire.squeezeRatio <= 1 else { return "--sr must be in (0, 1] (got \(fire.squeezeRatio))" }
        guard dropout >= 0, dropout < 1 else { return "--dropout must be in [0, 1) (got \(dropout))" }
        // No option sets these (files do): named by their JSON keys.
        guard inputMean == Self.engineInputMean else {
            return "inputMean must be \(Self.engineInputMean), CIFAR-10's, the only input normalisation this build implements (got \(inputMean))"
        }
        guard inputStd == Self.engineInputStd else {
            return "inputStd must be \(Self.engineInputStd), CIFAR-10's, the only input normalisation this build implements (got \(inputStd))"
        }
        guard batchNormEps == Self.engineBatchNormEps else {
            return "batchNormEps must be \(Self.engineBatchNormEps), the only BatchNorm epsilon this build implements (got \(batchNormEps))"
        }
        if architecture == .alexnet {
            for (flag, set) in [("--batch-norm", batchNorm), ("--late-downsample", lateDownsample), ("--bypass simple", bypass == .simple)] where set {
                return "\(flag) applies to SqueezeNet only; --model alexnet is torchvision's AlexNet as it is"
            }
        }
        if bypass == .simple && fire.incrE > 0 && fire.freq == 1 {
            return "--bypass simple needs Fire modules of equal width in and out; with --freq 1 none are"
        }
        // Last, on a configuration whose layers can be described: counted without allocating them.
        let count = parameterCount
        guard count <= ModelConfig.maxParameters else {
            let fields = architecture == .alexnet ? "--classes \(classes)"
                : "--base-e \(fire.baseE), --incr-e \(fire.incrE), --sr \(fire.squeezeRatio), --classes \(classes)"
            return "the model would have \(count) parameters, more than the \(ModelConfig.maxParameters) supported "
                + "(4 bytes each for weights, gradients and momentum); lower \(fields)"
        }
        return nil
    }

    /// The most parameters a model may have: 2^28, four times torchvision's AlexNet for ImageNet.
    public static let maxParameters = 1 << 28

    /// Every tensor the model holds, parameters then buffers (as `Network` lays them out), described
    /// without allocating anything: a file's metadata can be checked before a model is built from it.
    public var stateShapes: [(name: String, shape: [Int])] {
        let layers = Network.layers(self, workspace: Workspace(), seed: 0)
        return (layers.flatMap(\.parameterSpecs) + layers.flatMap(\.bufferSpecs)).map { ($0.name, $0.shape) }
    }

    /// The model's trained parameters, counted without allocating them.
    public var parameterCount: Int {
        Network.layers(self, workspace: Workspace(), seed: 0).flatMap(\.parameterSpecs).reduce(0) { $0 + $1.count }
    }
}

extension Network {
    /// The model configuration saved in a weights file's metadata ("squeezetrain.model", written by
    /// `saveWeights`), or nil when the file has none (PyTorch's files, or ones written by other tools).
    /// Metadata that does not decode, or describes a model that cannot be built, is an error naming the file.
    public static func savedConfig(path: String) throws -> ModelConfig? {
        let metadata = try Safetensors.readMetadata(path: path)
        guard let text = metadata["squeezetrain.model"] else { return nil }
        let config: ModelConfig
        do {
            config = try JSONDecoder().decode(ModelConfig.self, from: Data(text.utf8))
        } catch {
            throw SafetensorsError.invalidHeader(file: path, reason: "metadata \"squeezetrain.model\" is not a model configuration (\(error))")
        }
        if let reason = config.invalidReason {
            throw SafetensorsError.invalidHeader(file: path, reason: "metadata \"squeezetrain.model\" describes no valid model: \(reason)")
        }
        return config
    }
}
