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
