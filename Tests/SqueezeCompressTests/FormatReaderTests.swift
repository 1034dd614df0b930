// The file formats as a stranger reads them: scripts/read-squeezetrain.py, written from
// docs/compressed-format.md and docs/model-config.md alone, must decode every tensor as squeezetrain does;
// and the model configuration carries the preprocessing and BatchNorm ε, refused when the engine differs.

import Foundation
import Testing
import SqueezeEngine
@testable import SqueezeCompress
@testable import SqueezeTraining
import SqueezeTestSupport

/// A python3 that imports numpy ($SQUEEZETRAIN_PYTHON, python3 on the PATH, or /tmp/pt/bin/python), or
/// why there is none (none is looked for in the quick tier, which starts no process).
let numpyPython: (path: String?, reason: String) = {
    if TestTier.isQuick { return (nil, "starts python: in the full tier (scripts/test), not scripts/test --quick") }
    var candidates = ["python3", "/tmp/pt/bin/python"]
    if let chosen = ProcessInfo.processInfo.environment["SQUEEZETRAIN_PYTHON"] { candidates.insert(chosen, at: 0) }
    for python in candidates where (try? runPython(python, ["-c", "import numpy"]).status) == 0 { return (python, "") }
    return (nil, "no python3 with numpy (tried \(candidates.joined(separator: ", ")); set SQUEEZETRAIN_PYTHON)")
}()

/// Runs `python arguments` (a bare name is looked up on the PATH); its exit status and output.
func runPython(_ python: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = [python] + arguments
    return try runCollectingOutput(process)
}

/// Runs the independent reader on `file`, writing `output`; fails the test with its output if it fails.
func independentRead(_ file: String, to output: String) throws {
    let python = try #require(numpyPython.path)
    let run = try runPython(python, [TestInputs.packageRoot + "/scripts/read-squeezetrain.py", file, "--output", output])
    try #require(run.status == 0, "\(run.output)")
}

/// Every tensor of two safetensors files: same names, dtypes, shapes and bytes.
func expectSameTensors(_ a: String, _ b: String) throws {
    let (x, _) = try Safetensors.read(path: a), (y, _) = try Safetensors.read(path: b)
    #expect(x.keys.sorted() == y.keys.sorted())
    for (name, t) in x {
        let u = try #require(y[name], "\(name) missing from \(b)")
        #expect(t.dtype == u.dtype && t.shape == u.shape, "\(name): \(t.dtype) \(t.shape) vs \(u.dtype) \(u.shape)")
        #expect(t.bytes == u.bytes, "\(name): the values differ")
    }
}

let shippedCompressed = TestInputs.packageRoot + "/docs/results/squeezenet-deep-compression.sqz"
let shippedWeights = TestInputs.packageRoot + "/docs/results/squeezenet-bn-late-80-epochs.safetensors"

/// `json` (a model configuration) with `key` set to `value`.
func configJSON(_ json: String, setting key: String, to value: Any) throws -> String {
    var object = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
    object[key] = value
    return String(decoding: try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]), as: UTF8.self)
}

/// The configuration of a `.sqz` file's bytes, and the bytes with another configuration (checksum redone).
func sqzConfig(_ data: [UInt8]) -> String {
    let n = Int(data[8]) | Int(data[9]) << 8 | Int(data[10]) << 16 | Int(data[11]) << 24
    return String(decoding: data[12..<12 + n], as: UTF8.self)
}
func sqz(_ data: [UInt8], withConfig json: String) -> [UInt8] {
    let n = Int(data[8]) | Int(data[9]) << 8 | Int(data[10]) << 16 | Int(data[11]) << 24
    let config = Array(json.utf8), length = UInt32(config.count)
    var out = Array(data[0..<8]) + (0..<4).map { UInt8(truncatingIfNeeded: length >> (8 * $0)) } + config
    out += data[(12 + n)..<(data.count - 4)]
    let crc = crc32(out)
    return out + (0..<4).map { UInt8(truncatingIfNeeded: crc >> (8 * $0)) }
}

/// Values the engine does not implement, per new configuration key.
func unsupportedSettings() -> [(key: String, value: Any)] {
    [("batchNormEps", 0.001), ("inputMean", [0.5, 0.5, 0.5]), ("inputStd", [0.5, 0.5, 0.5]), ("inputMean", [0.4914, 0.4822])]
}

@Suite("The formats as documented (independent reader, model configuration)")
struct FormatReaderTests {
    @Test(.enabled(if: numpyPython.path != nil, Comment(rawValue: numpyPython.reason)))
    func theIndependentReaderDecodesTheShippedModelAsExportDoes() throws {
        let dir = try temporaryDirectory("format-reader")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let exported = dir + "/exported.safetensors", independent = dir + "/independent.safetensors"
        let run = try runSqueezetrain(["export", "--weights", shippedCompressed, "--output", exported])
        try #require(run.status == 0, "\(run.output)")
        try independentRead(shippedCompressed, to: independent)
        try expectSameTensors(independent, exported)
        #expect(try Network.savedConfig(path: independent) == CompressedModel.load(path: shippedCompressed).config)
        // Its safetensors path too, on what export wrote.
        let reread = dir + "/reread.safetensors"
        try independentRead(exported, to: reread)
        try expectSameTensors(reread, exported)
    }

    @Test(.enabled(if: numpyPython.path != nil, Comment(rawValue: numpyPython.reason)))
    func theIndependentReaderReadsTheShippedWeightsAsSqueezetrainDoes() throws {
        let dir = try temporaryDirectory("format-reader")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let independent = dir + "/independent.safetensors"
        try independentRead(shippedWeights, to: independent)
        try expectSameTensors(independent, shippedWeights)
        #expect(try Network.savedConfig(path: independent) == Network.savedConfig(path: shippedWeights))
        // And its .npz holds the same tensors.
        let npz = dir + "/w.npz"
        try independentRead(shippedWeights, to: npz)
        let python = try #require(numpyPython.path)
        let count = try runPython(python, ["-c", "import numpy as n; z = n.load('\(npz)'); print(len(z.files), sum(a.size for a in z.values()))"])
        let (tensors, _) = try Safetensors.read(path: shippedWeights)
        #expect(count.output.trimmingCharacters(in: .whitespacesAndNewlines) == "\(tensors.count) \(tensors.values.reduce(0) { $0 + $1.elementCount })")
    }

    /// The documented edge cases: no kept entries, a single-symbol code, fillers for long gaps, 1- to 8-bit
    /// codes and relative indices.
    @Test(.enabled(if: numpyPython.path != nil, Comment(rawValue: numpyPython.reason)))
    func theIndependentReaderDecodesEveryKindOfTensor() throws {
        let dir = try temporaryDirectory("format-reader")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var config = ModelConfig()
        config.batchNorm = true; config.fire.baseE = 16; config.fire.incrE = 16
        let net = Network(config: config, seed: 3)
        var tensors = [CompressedTensor](), kinds = Set<String>()
        var weights = 0
        for spec in net.parameters.specs + net.buffers.specs {
            let store = spec.name.contains("running_") ? net.buffers : net.parameters
            let values = Array(UnsafeBufferPointer(start: store.values.pointer + spec.offset, count: spec.count))
            guard spec.shape.count > 1 else { tensors.append(CompressedTensor(name: spec.name, shape: spec.shape, storage: .plain(values))); continue }
            let shared: SharedWeights
            weights += 1
            switch weights % 4 {
            case 0:  // nothing kept
                shared = SharedWeights(assignment: [Int](repeating: 0, count: spec.count), codebook: [0], bits: 1, indexBits: 1); kinds.insert("empty")
            case 1:  // one value everywhere: a one-symbol code table
                shared = SharedWeights(assignment: [Int](repeating: 1, count: spec.count), codebook: [0, 0.25], bits: 1, indexBits: 2); kinds.insert("single")
            case 2:  // every 37th position, 2-bit gaps: fillers
                shared = SharedWeights(assignment: (0..<spec.count).map { $0 % 37 == 5 ? 1 + $0 % 7 : 0 },
                                       codebook: [0] + (1...7).map { Float($0) / 8 }, bits: 3, indexBits: 2); kinds.insert("fillers")
            default:  // 8-bit codes, 8-bit gaps, half kept
                shared = SharedWeights(assignment: values.map { $0 > 0 ? 1 + Int(($0 * 1000).magnitude) % 255 : 0 },
                                       codebook: [0] + (1...255).map { Float($0) / 256 - 0.5 }, bits: 8, indexBits: 8); kinds.insert("8-bit")
            }
            tensors.append(CompressedTensor(name: spec.name, shape: spec.shape, storage: .shared(shared)))
        }
        #expect(kinds.count == 4)
        let file = dir + "/m.sqz", independent = dir + "/independent.safetensors"
        try CompressedModel(config: config, tensors: tensors).save(path: file)
        try independentRead(file, to: independent)
        let (decoded, _) = try Safetensors.read(path: independent)
        #expect(decoded.count == tensors.count)
        for t in tensors {
            #expect(try decoded[t.name]?.floats() == t.dense(), "\(t.name)")
            #expect(decoded[t.name]?.shape == t.shape, "\(t.name)")
        }
    }

    /// docs/compressed-format.md's worked example: canonical codes, bytes filled from 0x80 down.
    @Test func theDocumentedHuffmanExampleHolds() throws {
        let code = try HuffmanCode(lengths: [2, 1, 3, 3])
        #expect(code.encode([1, 0, 3]) == [0x5C])
        #expect(try code.decode([0x5C], count: 3) == [1, 0, 3])
        #expect(HuffmanCode(frequencies: [0, 5, 0]).lengths == [0, 1, 0])  // one symbol: a 1-bit code
        #expect(HuffmanCode(frequencies: [5, 0, 0]).encode([0, 0, 0, 0, 0, 0, 0, 0, 0]) == [0, 0])
    }

    @Test func savedFilesCarryThePreprocessingAndBatchNormEpsilon() throws {
        let dir = try temporaryDirectory("format-config")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var config = ModelConfig()
        config.fire.baseE = 16; config.fire.incrE = 16
        try Network(config: config).saveWeights(to: dir + "/w.safetensors")
        let sqzBytes = try CompressedModel(config: config, tensors: []).encoded()
        for json in [try #require(try Safetensors.readMetadata(path: dir + "/w.safetensors")["squeezetrain.model"]), sqzConfig(sqzBytes)] {
            let object = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
            #expect((object["inputMean"] as? [Double])?.map(Float.init) == [0.4914, 0.4822, 0.4465], "\(json)")
            #expect((object["inputStd"] as? [Double])?.map(Float.init) == [0.2470, 0.2435, 0.2616], "\(json)")
            #expect((object["batchNormEps"] as? Double).map(Float.init) == 1e-5, "\(json)")
        }
    }

    @Test func filesWithoutTheNewKeysLoadWithTheDefaults() throws {
        let data = try readWholeFile(shippedCompressed)
        let old = sqzConfig(data)
        #expect(!old.contains("batchNormEps") && !old.contains("inputMean"), "the shipped file is meant to predate the keys")
        let fromSqz = try CompressedModel.decode(data, file: shippedCompressed).config
        let fromWeights = try #require(try Network.savedConfig(path: shippedWeights))
        #expect(fromSqz == fromWeights)
        let reencoded = String(decoding: try JSONEncoder().encode(fromSqz), as: UTF8.self)
        for key in ["architecture", "batchNorm", "lateDownsample"] { #expect(reencoded.contains(key)) }
    }

    @Test func aConfigurationTheEngineDoesNotImplementIsRefusedNamingTheKey() throws {
        let dir = try temporaryDirectory("format-config")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let data = try readWholeFile(shippedCompressed)
        let (tensors, metadata) = try Safetensors.read(path: shippedWeights)
        for (key, value) in unsupportedSettings() {
            let changed = try configJSON(sqzConfig(data), setting: key, to: value)
            let sqzError = #expect(throws: CompressedFormatError.self) { try CompressedModel.decode(sqz(data, withConfig: changed), file: "m.sqz") }
            #expect(sqzError.map { "\($0)".contains(key) } == true, "\(key): \(String(describing: sqzError))")

            let path = dir + "/w.safetensors"
            var meta = metadata
            meta["squeezetrain.model"] = try configJSON(try #require(metadata["squeezetrain.model"]), setting: key, to: value)
            try Safetensors.write(path: path, tensors: Array(tensors.values), metadata: meta)
            let error = #expect(throws: SafetensorsError.self) { try Network.savedConfig(path: path) }
            #expect(error.map { "\($0)".contains(key) && "\($0)".contains(path) } == true, "\(key): \(String(describing: error))")
        }
    }

    @Test func aCheckpointWhoseModelTheEngineDoesNotImplementIsRefused() throws {
        let dir = try temporaryDirectory("format-config")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = try Checkpoint(trainer: try Trainer(config: smallConfig(steps: 0), trainSet: smallTrainingSet)).save(directory: dir)
        let (tensors, metadata) = try Safetensors.read(path: path)
        let trainingJSON = try #require(metadata["config"])
        var training = try #require(try JSONSerialization.jsonObject(with: Data(trainingJSON.utf8)) as? [String: Any])
        var model = try #require(training["model"] as? [String: Any])
        model["batchNormEps"] = 0.001
        training["model"] = model
        var meta = metadata
        meta["config"] = String(decoding: try JSONSerialization.data(withJSONObject: training, options: [.sortedKeys]), as: UTF8.self)
        meta.removeValue(forKey: "checksum")
        meta["checksum"] = Checkpoint.checksum(tensors: try tensors.mapValues { try $0.floats() }, metadata: meta)
        try Safetensors.write(path: path, tensors: Array(tensors.values), metadata: meta)
        let error = #expect(throws: TrainingError.self) { try Checkpoint.load(path: path) }
        #expect(error.map { "\($0)".contains("batchNormEps") } == true, "\(String(describing: error))")
    }
}
