import Foundation
import SqueezeCompress
import SqueezeEngine

/// A network holding the weights in `path`: safetensors (model from its metadata, else from the options)
/// or a compressed model (.sqz, decoded). Options given must agree with the model the file holds.
func loadNetwork(weights path: String, model options: ModelOptions) throws -> Network {
    if isCompressedModel(path) {
        let compressed = try CompressedModel.load(path: path)
        let net = Network(config: try options.resolve(saved: compressed.config, path: path))
        try compressed.load(into: net)
        return net
    }
    let net = Network(config: try options.resolve(savedIn: path))
    try net.loadWeights(from: path)
    return net
}

/// True when the file starts with the compressed format's magic.
func isCompressedModel(_ path: String) -> Bool {
    guard let handle = FileHandle(forReadingAtPath: path) else { return false }
    defer { try? handle.close() }
    return (try? handle.read(upToCount: 4)).map { Array($0) == CompressedModel.magic } ?? false
}
