import SqueezeEngine

extension Network {
    /// name → shape of every tensor a model of `config` saves (parameters and buffers).
    static func stateShapes(_ config: ModelConfig) -> [String: [Int]] {
        Dictionary(uniqueKeysWithValues: config.stateShapes.map { ($0.name, $0.shape) })
    }

    /// Sets every parameter and buffer from `values` (name → values); throws, changing nothing, unless
    /// every tensor is there with the right number of values.
    func loadState(_ values: [String: [Float]]) throws {
        let all = [(parameters, parameters.specs), (buffers, buffers.specs)]
        for (_, specs) in all {
            for spec in specs where values[spec.name]?.count != spec.count {
                throw CompressedFormatError(file: "<model>", reason: "tensor '\(spec.name)' is missing or has the wrong size")
            }
        }
        for (store, specs) in all {
            for spec in specs { (store.values.pointer + spec.offset).update(from: values[spec.name]!, count: spec.count) }
        }
    }
}
