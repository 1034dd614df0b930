import Foundation
import Testing
import SqueezeEngine
@testable import SqueezeCompress

/// A weights or .sqz file whose metadata describes an absurd model is refused before anything is
/// allocated for it, naming the field.
@Suite struct AbsurdModelTests {
    static let absurd: [(String, String)] = [
        (#"{"architecture":"squeezenet1_1","fire":{"baseE":65536}}"#, "--base-e"),
        (#"{"architecture":"alexnet","classes":100000}"#, "--classes"),
    ]

    /// A model configuration as the files hold it: the defaults with `json`'s fields over them.
    func configJSON(_ json: String) throws -> String {
        var base = try JSONSerialization.jsonObject(with: JSONEncoder().encode(ModelConfig())) as! [String: Any]
        let over = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [String: Any]
        for (k, v) in over {
            if let inner = v as? [String: Any], var merged = base[k] as? [String: Any] {
                for (ik, iv) in inner { merged[ik] = iv }
                base[k] = merged
            } else {
                base[k] = v
            }
        }
        return String(decoding: try JSONSerialization.data(withJSONObject: base), as: UTF8.self)
    }

    @Test(arguments: absurd)
    func safetensorsMetadata(_ json: String, field: String) throws {
        let path = NSTemporaryDirectory() + "absurd-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).safetensors"
        defer { unlink(path) }
        let one: [Float] = [1]
        try one.withUnsafeBufferPointer { b in
            try Safetensors.write(path: path, tensors: [("x", [1], b)], metadata: ["squeezetrain.model": try configJSON(json)])
        }
        #expect { _ = try Network.savedConfig(path: path) } throws: { "\($0)".contains(field) && "\($0)".contains("parameters") }
    }

    @Test(arguments: absurd)
    func compressedModelHeader(_ json: String, field: String) throws {
        let config = Array(try configJSON(json).utf8)
        var bytes = CompressedModel.magic
        func u16(_ v: Int) { bytes += [UInt8(v & 0xFF), UInt8(v >> 8)] }
        func u32(_ v: Int) { for i in 0..<4 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
        u16(Int(CompressedModel.version)); u16(0); u32(config.count); bytes += config; u32(0)
        u32(Int(crc32(bytes)))
        #expect { _ = try CompressedModel.decode(bytes, file: "absurd.sqz") } throws: { "\($0)".contains(field) && "\($0)".contains("parameters") }
    }
}
