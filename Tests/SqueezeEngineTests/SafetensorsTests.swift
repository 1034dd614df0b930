import Foundation
import Testing
@testable import SqueezeEngine
import SqueezeTestSupport

/// A fresh directory under the system temporary directory, removed when released.
private final class TemporaryDirectory {
    let path: String

    init() throws {
        path = FileManager.default.temporaryDirectory
            .appendingPathComponent("safetensors-tests-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    func file(_ name: String) -> String { path + "/" + name }

    /// Writes a hand-made file: the 8-byte length (of `header`, unless `declaredLength` is given),
    /// the header text, then `data`.
    func makeFile(_ name: String, header: String, data: [UInt8] = [], declaredLength: UInt64? = nil) throws -> String {
        let headerBytes = Array(header.utf8)
        var bytes = withUnsafeBytes(of: (declaredLength ?? UInt64(headerBytes.count)).littleEndian) { Array($0) }
        bytes += headerBytes + data
        let path = file(name)
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    func contents() throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: path).sorted()
    }
}

/// The error `body` throws, if it is a SafetensorsError.
private func safetensorsError(_ body: () throws -> Void) -> SafetensorsError? {
    do {
        try body()
        return nil
    } catch let error as SafetensorsError {
        return error
    } catch {
        return nil
    }
}

private func readError(_ path: String) -> SafetensorsError? {
    safetensorsError { _ = try Safetensors.read(path: path) }
}

private func bits(_ values: [Float]) -> [UInt32] { values.map(\.bitPattern) }

private func fileBytes(_ path: String) throws -> [UInt8] {
    Array(try Data(contentsOf: URL(fileURLWithPath: path)))
}

// MARK: - Round trips

@Test func roundTripKeepsValuesBitForBitAndMetadata() throws {
    let directory = try TemporaryDirectory()
    let path = directory.file("weights.safetensors")
    let conv: [Float] = (0..<(4 * 3 * 3 * 3)).map { Float($0) * 0.37 - 9.5 }
    let specials: [Float] = [
        .nan, -.nan, Float(bitPattern: 0x7FC0_1234), .infinity, -.infinity, -0.0, 0.0,
        .leastNonzeroMagnitude, -.greatestFiniteMagnitude, 1.0 / 3.0,
    ]
    let scalar: [Float] = [42.5]
    let steps: [Int64] = [Int64.min, -1, 0, 7, Int64.max]
    let metadata = ["format": "pt", "epoch": "3", "note": "quote \" backslash \\ newline \n tab \t é"]

    try conv.withUnsafeBufferPointer { convData in
        try specials.withUnsafeBufferPointer { specialData in
            try scalar.withUnsafeBufferPointer { scalarData in
                try Safetensors.write(
                    path: path,
                    tensors: [
                        (name: "features.0.weight", shape: [4, 3, 3, 3], data: convData),
                        (name: "a.specials", shape: [2, 5], data: specialData),
                        (name: "scalar", shape: [], data: scalarData),
                        (name: "empty", shape: [0, 3], data: UnsafeBufferPointer(start: nil, count: 0)),
                    ],
                    int64Tensors: [(name: "bn.num_batches_tracked", shape: [5], data: steps)],
                    metadata: metadata)
            }
        }
    }

    let (tensors, readMetadata) = try Safetensors.read(path: path)
    #expect(readMetadata == metadata)
    #expect(Set(tensors.keys) == ["features.0.weight", "a.specials", "scalar", "empty", "bn.num_batches_tracked"])

    let convTensor = try #require(tensors["features.0.weight"])
    #expect(convTensor.dtype == .f32)
    #expect(convTensor.shape == [4, 3, 3, 3])
    #expect(convTensor.elementCount == 108)
    #expect(bits(try convTensor.floats()) == bits(conv))

    let specialTensor = try #require(tensors["a.specials"])
    #expect(specialTensor.shape == [2, 5])
    #expect(bits(try specialTensor.floats()) == bits(specials))

    let scalarTensor = try #require(tensors["scalar"])
    #expect(scalarTensor.shape == [])
    #expect(scalarTensor.elementCount == 1)
    #expect(try scalarTensor.floats() == [42.5])

    let emptyTensor = try #require(tensors["empty"])
    #expect(emptyTensor.shape == [0, 3])
    #expect(emptyTensor.elementCount == 0)
    #expect(try emptyTensor.floats() == [])

    let stepTensor = try #require(tensors["bn.num_batches_tracked"])
    #expect(stepTensor.dtype == .i64)
    #expect(try stepTensor.int64s() == steps)
    #expect(stepTensor.file == path)

    // Layout: header padded with spaces to a multiple of 8; the 8-byte I64 tensor comes first, then
    // the F32 tensors by name; no temporary file is left behind.
    let raw = try fileBytes(path)
    let headerLength = raw[0..<8].reversed().reduce(0) { $0 << 8 | Int($1) }
    #expect(headerLength % 8 == 0)
    let header = String(decoding: raw[8..<(8 + headerLength)], as: UTF8.self)
    #expect(header.hasPrefix("{\"__metadata__\":{"))
    #expect(header.contains("\"bn.num_batches_tracked\":{\"dtype\":\"I64\",\"shape\":[5],\"data_offsets\":[0,40]}"))
    #expect(header.contains("\"a.specials\":{\"dtype\":\"F32\",\"shape\":[2,5],\"data_offsets\":[40,80]}"))
    #expect(raw.count == 8 + headerLength + 40 + 40 + 0 + 432 + 4)
    #expect(try directory.contents() == ["weights.safetensors"])
}

@Test func roundTripOfAnyDTypeThroughTensorValues() throws {
    let directory = try TemporaryDirectory()
    let path = directory.file("mixed.safetensors")
    let tensors = [
        SafetensorsTensor(name: "x", shape: [2, 2], floats: [1, -2, 3.5, 1e-30]),
        SafetensorsTensor(name: "y", shape: [3], int64s: [9, 6, 1 << 40]),
        SafetensorsTensor(name: "mask", dtype: .u8, shape: [5], bytes: [0, 1, 2, 254, 255]),
        SafetensorsTensor(name: "half", dtype: .f16, shape: [3], bytes: [0x00, 0x3C, 0x00, 0xC0, 0xFF, 0x7B]),
        SafetensorsTensor(name: "brain", dtype: .bf16, shape: [1], bytes: [0x80, 0x3F]),
    ]
    try Safetensors.write(path: path, tensors: tensors)
    let (read, metadata) = try Safetensors.read(path: path)
    #expect(metadata.isEmpty)
    #expect(read.count == tensors.count)
    for tensor in tensors {
        #expect(read[tensor.name] == tensor)
    }
    #expect(try read["y"]?.int64s() == [9, 6, 1 << 40])
}

@Test func overwritingReplacesTheFileAndLeavesNoTemporaryFiles() throws {
    let directory = try TemporaryDirectory()
    let path = directory.file("checkpoint.safetensors")
    try Safetensors.write(path: path, tensors: [SafetensorsTensor(name: "w", shape: [3], floats: [1, 2, 3])])
    try Safetensors.write(path: path, tensors: [SafetensorsTensor(name: "v", shape: [1], floats: [7])],
                          metadata: ["step": "2"])
    let (tensors, metadata) = try Safetensors.read(path: path)
    #expect(Array(tensors.keys) == ["v"])
    #expect(try tensors["v"]?.floats() == [7])
    #expect(metadata == ["step": "2"])
    #expect(try directory.contents() == ["checkpoint.safetensors"])
}

@Test func writeErrorsLeaveTheDestinationUntouched() throws {
    let directory = try TemporaryDirectory()
    let path = directory.file("keep.safetensors")
    let original = [SafetensorsTensor(name: "w", shape: [2], floats: [1, 2])]
    try Safetensors.write(path: path, tensors: original)
    let before = try fileBytes(path)

    let shortData = safetensorsError {
        try Safetensors.write(path: path, tensors: [SafetensorsTensor(name: "w", shape: [3], floats: [1, 2])])
    }
    #expect(shortData == .invalidTensor(file: path, tensor: "w", reason: "8 bytes of data, but F32 [3] needs 12"))

    let twice = safetensorsError {
        try Safetensors.write(path: path, tensors: original + original)
    }
    #expect(twice == .invalidTensor(file: path, tensor: "w", reason: "the name is used twice"))

    let reserved = safetensorsError {
        try Safetensors.write(path: path, tensors: [SafetensorsTensor(name: "__metadata__", shape: [], floats: [0])])
    }
    guard case .invalidTensor(_, "__metadata__", _) = reserved else {
        Issue.record("expected invalidTensor for a reserved name, got \(String(describing: reserved))")
        return
    }

    #expect(try fileBytes(path) == before)
    #expect(try directory.contents() == ["keep.safetensors"])

    let nowhere = directory.file("no/such/dir/w.safetensors")
    let missingDirectory = safetensorsError { try Safetensors.write(path: nowhere, tensors: original) }
    guard case let .io(file, operation, _) = missingDirectory else {
        Issue.record("expected an io error, got \(String(describing: missingDirectory))")
        return
    }
    #expect(file == nowhere)
    #expect(operation.hasPrefix("create temporary file"))
    #expect(missingDirectory?.description.contains(nowhere) == true)
}

// MARK: - Files written by PyTorch

@Test(.needsPyTorchReference) func readsTheReferenceInitialWeights() throws {
    let path = goldenDirectory + "/init.safetensors"
    let (tensors, metadata) = try Safetensors.read(path: path)
    #expect(tensors.count == 52)
    #expect(metadata.isEmpty)
    #expect(tensors.values.allSatisfy { $0.dtype == .f32 })
    #expect(tensors.values.reduce(0) { $0 + $1.elementCount } == 727_626)

    let first = try #require(tensors["features.0.weight"])
    #expect(first.shape == [64, 3, 3, 3])
    let firstValues = try first.floats()
    #expect(firstValues.count == 1728)
    #expect(bits(Array(firstValues.prefix(3))) == [0x3EBB_8C63, 0xBE7E_448E, 0x3E9F_CE0E])
    #expect(abs(firstValues.reduce(0.0) { $0 + Double($1) } - -2.041926647318178) < 1e-9)

    let last = try #require(tensors["classifier.1.weight"])
    #expect(last.shape == [10, 512, 1, 1])
    let lastValues = try last.floats()
    #expect(bits(Array(lastValues.suffix(2))) == [0x3D54_7EE5, 0xBCB2_F383])
    #expect(abs(lastValues.reduce(0.0) { $0 + Double($1) } - -6.0007925286836326) < 1e-9)
    #expect(tensors["classifier.1.bias"]?.shape == [10])
}

@Test(.needsPyTorchReference) func readsTheReferenceBatch() throws {
    let path = goldenDirectory + "/batch.safetensors"
    let (tensors, _) = try Safetensors.read(path: path)
    #expect(Set(tensors.keys) == ["x", "y"])

    let x = try #require(tensors["x"])
    #expect(x.dtype == .f32)
    #expect(x.shape == [8, 3, 32, 32])
    let xValues = try x.floats()
    #expect(bits(Array(xValues.prefix(2))) == [0x3F8E_93A2, 0xBF40_0B42])
    #expect(abs(xValues.reduce(0.0) { $0 + Double($1) } - -90.81763580931147) < 1e-9)

    let y = try #require(tensors["y"])
    #expect(y.dtype == .i64)
    #expect(y.shape == [8])
    #expect(try y.int64s() == [9, 6, 9, 3, 3, 2, 6, 4])

    let error = safetensorsError { _ = try y.floats() }
    #expect(error == .wrongDType(file: path, tensor: "y", expected: .f32, found: .i64))
    #expect(error?.description == "\(path): tensor 'y' is I64, but F32 is required")
}

/// The committed fixtures were written by safetensors.torch too: rewriting them gives the same bytes.
@Test func rewritingFixturesReproducesTorchsBytes() throws {
    let directory = try TemporaryDirectory()
    for name in ["squeezenet-step.safetensors", "alexnet-step.safetensors"] {
        let source = TestInputs.fixtures + "/" + name
        let (tensors, metadata) = try Safetensors.read(path: source)
        let copy = directory.file(name)
        try Safetensors.write(path: copy, tensors: Array(tensors.values), metadata: metadata)
        #expect(try fileBytes(copy) == fileBytes(source), "rewriting \(name)")
    }
}

@Test(.needsPyTorchReference) func rewritingReferenceFilesReproducesTorchsBytes() throws {
    let directory = try TemporaryDirectory()
    for name in ["init.safetensors", "batch.safetensors"] {
        let source = goldenDirectory + "/" + name
        let (tensors, metadata) = try Safetensors.read(path: source)
        let copy = directory.file(name)
        try Safetensors.write(path: copy, tensors: Array(tensors.values), metadata: metadata)
        #expect(try fileBytes(copy) == fileBytes(source), "rewriting \(name)")
    }
}

// MARK: - Malformed files

@Test func missingFile() throws {
    let directory = try TemporaryDirectory()
    let path = directory.file("absent.safetensors")
    let error = readError(path)
    #expect(error == .io(file: path, operation: "open", reason: String(cString: strerror(ENOENT))))
    #expect(error?.description.contains(path) == true)
}

@Test func directoryIsNotAFile() throws {
    let directory = try TemporaryDirectory()
    let error = readError(directory.path)
    #expect(error == .io(file: directory.path, operation: "read", reason: "not a regular file"))
}

@Test func fileShorterThanTheLength() throws {
    let directory = try TemporaryDirectory()
    let path = directory.file("short.safetensors")
    try Data([1, 2, 3, 4, 5]).write(to: URL(fileURLWithPath: path))
    let error = readError(path)
    #expect(error == .tooShort(file: path, size: 5))
    #expect(error?.description.hasPrefix(path + ": ") == true)
}

@Test func headerLengthBeyondTheFile() throws {
    let directory = try TemporaryDirectory()
    let path = try directory.makeFile("long.safetensors", header: "{}", declaredLength: 1000)
    #expect(readError(path) == .headerBeyondFile(file: path, headerLength: 1000, fileSize: 10))
    let huge = try directory.makeFile("huge.safetensors", header: "{}", declaredLength: UInt64.max)
    #expect(readError(huge) == .headerBeyondFile(file: huge, headerLength: .max, fileSize: 10))
}

@Test func headerNotJSONOrNotAnObject() throws {
    let directory = try TemporaryDirectory()
    let garbage = try directory.makeFile("garbage.safetensors", header: "{\"x\": {\"dtype\": ")
    guard case let .invalidHeader(file, reason) = readError(garbage) else {
        Issue.record("expected invalidHeader for broken JSON")
        return
    }
    #expect(file == garbage)
    #expect(reason.hasPrefix("not valid JSON: "))
    #expect(readError(garbage)?.description.hasPrefix("\(garbage): invalid safetensors header: not valid JSON") == true)

    let array = try directory.makeFile("array.safetensors", header: "[1, 2]")
    #expect(readError(array) == .invalidHeader(file: array, reason: "not a JSON object"))

    let metadata = try directory.makeFile("metadata.safetensors", header: "{\"__metadata__\": {\"epoch\": 3}}")
    #expect(readError(metadata) == .invalidHeader(
        file: metadata, reason: "\"__metadata__\" value for \"epoch\" is not a string"))
}

@Test func entryMissingFields() throws {
    let directory = try TemporaryDirectory()
    let cases: [(header: String, reason: String)] = [
        ("{\"w\": [1]}", "not a JSON object"),
        ("{\"w\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", "missing \"dtype\""),
        ("{\"w\": {\"dtype\": \"F32\", \"data_offsets\": [0, 4]}}", "missing \"shape\""),
        ("{\"w\": {\"dtype\": \"F32\", \"shape\": [1]}}", "missing \"data_offsets\""),
        ("{\"w\": {\"dtype\": 5, \"shape\": [1], \"data_offsets\": [0, 4]}}", "\"dtype\" is not a string"),
        ("{\"w\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}",
         "\"shape\" is not a list of non-negative integers"),
        ("{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0]}}",
         "\"data_offsets\" is not a pair of integers"),
    ]
    for (index, testCase) in cases.enumerated() {
        let path = try directory.makeFile("entry\(index).safetensors", header: testCase.header, data: [0, 0, 0, 0])
        let error = readError(path)
        #expect(error == .invalidEntry(file: path, tensor: "w", reason: testCase.reason), "\(testCase.header)")
        #expect(error?.description.contains("tensor 'w'") == true)
    }
}

@Test func unknownDType() throws {
    let directory = try TemporaryDirectory()
    let path = try directory.makeFile(
        "dtype.safetensors", header: "{\"w\": {\"dtype\": \"F31\", \"shape\": [1], \"data_offsets\": [0, 4]}}",
        data: [0, 0, 0, 0])
    let error = readError(path)
    #expect(error == .unknownDType(file: path, tensor: "w", dtype: "F31"))
    #expect(error?.description == "\(path): tensor 'w': unknown dtype \"F31\"")
}

@Test func offsetsOutOfRange() throws {
    let directory = try TemporaryDirectory()
    let past = try directory.makeFile(
        "past.safetensors", header: "{\"w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12]}}",
        data: [UInt8](repeating: 0, count: 8))
    #expect(readError(past) == .offsetsOutOfRange(file: past, tensor: "w", begin: 4, end: 12, dataSize: 8))

    let backwards = try directory.makeFile(
        "backwards.safetensors", header: "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 4]}}",
        data: [UInt8](repeating: 0, count: 8))
    #expect(readError(backwards) == .offsetsOutOfRange(file: backwards, tensor: "w", begin: 8, end: 4, dataSize: 8))
}

@Test func offsetsNotMatchingShapeAndDType() throws {
    let directory = try TemporaryDirectory()
    let path = try directory.makeFile(
        "size.safetensors", header: "{\"w\": {\"dtype\": \"F32\", \"shape\": [2, 3], \"data_offsets\": [0, 20]}}",
        data: [UInt8](repeating: 0, count: 24))
    let error = readError(path)
    #expect(error == .sizeMismatch(file: path, tensor: "w", dtype: .f32, shape: [2, 3], expectedBytes: 24, foundBytes: 20))
    #expect(error?.description == "\(path): tensor 'w': data_offsets span 20 bytes but F32 [2, 3] needs 24")
}

@Test func overlappingTensors() throws {
    let directory = try TemporaryDirectory()
    let path = try directory.makeFile(
        "overlap.safetensors",
        header: """
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
            """,
        data: [UInt8](repeating: 0, count: 12))
    let error = readError(path)
    #expect(error == .overlap(file: path, tensor: "b", other: "a"))
    #expect(error?.description == "\(path): tensor 'b' overlaps tensor 'a' in the data section")

    // Empty tensors take no bytes, so they overlap nothing.
    let empty = try directory.makeFile(
        "empty.safetensors",
        header: """
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}}
            """,
        data: [UInt8](repeating: 0, count: 8))
    #expect(try Safetensors.read(path: empty).tensors["e"]?.elementCount == 0)
}

// MARK: - Checking against a model

@Test func validationListsEveryProblemAtOnce() throws {
    let tensors: [String: SafetensorsTensor] = [
        "features.0.weight": SafetensorsTensor(name: "features.0.weight", shape: [64, 3, 3, 3],
                                               floats: [Float](repeating: 0, count: 1728)),
        "features.0.bias": SafetensorsTensor(name: "features.0.bias", shape: [32],
                                             floats: [Float](repeating: 0, count: 32)),
        "classifier.1.bias": SafetensorsTensor(name: "classifier.1.bias", dtype: .f16, shape: [10],
                                               bytes: [UInt8](repeating: 0, count: 20)),
        "bn.num_batches_tracked": SafetensorsTensor(name: "bn.num_batches_tracked", shape: [], int64s: [12]),
        "bn.running_mean": SafetensorsTensor(name: "bn.running_mean", shape: [1], int64s: [0]),
        "extra.b": SafetensorsTensor(name: "extra.b", shape: [1], floats: [0]),
        "extra.a": SafetensorsTensor(name: "extra.a", shape: [2], floats: [0, 0]),
    ]
    let expected: [(name: String, shape: [Int])] = [
        ("features.0.weight", [64, 3, 3, 3]),
        ("features.0.bias", [64]),
        ("classifier.1.weight", [10, 512, 1, 1]),
        ("classifier.1.bias", [10]),
        ("bn.running_mean", [1]),
        ("bn.num_batches_tracked", []),
    ]
    let error = safetensorsError {
        try Safetensors.validate(tensors, expected: expected, file: "model.safetensors",
                                 allowInt64: { $0.hasSuffix(".num_batches_tracked") })
    }
    let problems: [SafetensorsError.Problem] = [
        .wrongShape(tensor: "features.0.bias", expected: [64], found: [32]),
        .missing(tensor: "classifier.1.weight", shape: [10, 512, 1, 1]),
        .wrongDType(tensor: "classifier.1.bias", found: .f16, allowed: [.f32]),
        .wrongDType(tensor: "bn.running_mean", found: .i64, allowed: [.f32]),
        .unexpected(tensor: "extra.a", dtype: .f32, shape: [2]),
        .unexpected(tensor: "extra.b", dtype: .f32, shape: [1]),
    ]
    #expect(error == .mismatchedTensors(file: "model.safetensors", problems: problems))
    #expect(error?.description == """
        model.safetensors: the tensors do not match the model (6 problems):
          - tensor 'features.0.bias' has shape [32], expected [64]
          - missing tensor 'classifier.1.weight' (expected shape [10, 512, 1, 1])
          - tensor 'classifier.1.bias' is F16, expected F32
          - tensor 'bn.running_mean' is I64, expected F32
          - unexpected tensor 'extra.a' (F32 [2])
          - unexpected tensor 'extra.b' (F32 [1])
        """)
}

@Test(.needsPyTorchReference) func validationAcceptsTheReferenceWeights() throws {
    let path = goldenDirectory + "/init.safetensors"
    let (tensors, _) = try Safetensors.read(path: path)
    // The shapes the model config asks for (squeezenet1_1, CIFAR stem, 10 classes: the reference's model).
    let expected = Network(config: ModelConfig()).stateSpecs
    #expect(expected.count == 52 && expected.reduce(0) { $0 + $1.shape.reduce(1, *) } == 727_626)
    #expect(expected.first { $0.name == "features.0.weight" }?.shape == [64, 3, 3, 3])
    #expect(expected.first { $0.name == "classifier.1.weight" }?.shape == [10, 512, 1, 1])
    try Safetensors.validate(tensors, expected: expected, file: path)

    var fewer = expected
    fewer.removeAll { $0.name == "features.0.weight" }
    let error = safetensorsError { try Safetensors.validate(tensors, expected: fewer, file: path) }
    #expect(error == .mismatchedTensors(
        file: path, problems: [.unexpected(tensor: "features.0.weight", dtype: .f32, shape: [64, 3, 3, 3])]))
}

// MARK: The model configuration in the metadata

@Test func weightsCarryTheirModelConfiguration() throws {
    let dir = try TemporaryDirectory()
    var config = ModelConfig()
    config.batchNorm = true; config.lateDownsample = true; config.fire.baseE = 96; config.classes = 7
    let net = Network(config: config)
    try net.saveWeights(to: dir.file("w.safetensors"))
    #expect(try Network.savedConfig(path: dir.file("w.safetensors")) == config)
    #expect(try Safetensors.readMetadata(path: dir.file("w.safetensors"))["squeezetrain.model"] != nil)

    // A file without the metadata (PyTorch's, say) has no saved configuration.
    #expect(try Network.savedConfig(path: TestInputs.fixtures + "/squeezenet-step.safetensors") == nil)
}

@Test func malformedModelMetadataIsAnErrorNamingTheFile() throws {
    let dir = try TemporaryDirectory()
    func saved(_ metadataValue: String) throws -> SafetensorsError? {
        let escaped = metadataValue.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
        let path = try dir.makeFile("m.safetensors", header: "{\"__metadata__\":{\"squeezetrain.model\":\"\(escaped)\"}}")
        return safetensorsError { _ = try Network.savedConfig(path: path) }
    }
    var good = String(decoding: try JSONEncoder().encode(ModelConfig()), as: UTF8.self)
    #expect(try saved(good) == nil)
    for bad in ["not json", "{\"architecture\":\"resnet50\"}", "[1,2]"] {
        let error = try saved(bad)
        #expect(error.map { "\($0)".contains("m.safetensors") && "\($0)".contains("squeezetrain.model") } == true, "\(bad): \(String(describing: error))")
    }
    // Decodes, but would allocate a model of absurd size: refused before anything is built.
    good = good.replacingOccurrences(of: "\"baseE\":128", with: "\"baseE\":1000000000")
    #expect(try saved(good).map { "\($0)".contains("--base-e") } == true)
}
