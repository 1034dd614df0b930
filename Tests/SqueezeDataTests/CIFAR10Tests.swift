import Foundation
import Testing
@testable import SqueezeData
import SqueezeTestSupport

@Suite(.needsRealCIFAR10) struct RealDataTests {
    @Test func trainSplitHas50000RecordsWithValidLabels() throws {
        let train = try cachedTrain.get()
        #expect(train.count == 50_000)
        #expect(train.images.count == 50_000 * 3072)
        #expect(train.labels.allSatisfy { $0 <= 9 })
        // CIFAR-10's train split has 5,000 images of each class.
        var perClass = [Int](repeating: 0, count: 10)
        for l in train.labels { perClass[Int(l)] += 1 }
        #expect(perClass == [Int](repeating: 5_000, count: 10))
    }

    @Test func testSplitHas10000RecordsWithValidLabels() throws {
        let test = try cachedTest.get()
        #expect(test.count == 10_000)
        #expect(test.images.count == 10_000 * 3072)
        var perClass = [Int](repeating: 0, count: 10)
        for l in test.labels { perClass[Int(l)] += 1 }
        #expect(perClass == [Int](repeating: 1_000, count: 10))
    }

    @Test func recordsEqualRawFileBytes() throws {
        let dir = try realDataDirectory()
        let test = try cachedTest.get()
        let raw = [UInt8](try Data(contentsOf: URL(fileURLWithPath: dir + "/test_batch.bin")))
        // Known first record of test_batch.bin: a cat whose first red/green/blue pixels are 161, 180, 222.
        #expect(raw[0] == 3 && test.labels[0] == 3)
        #expect(CIFAR10.classNames[Int(test.labels[0])] == "cat")
        #expect(Array(test.image(0).prefix(1)) == [161])
        #expect(test.images[1024] == 180 && test.images[2048] == 222)
        // Every byte of a few records (first, one in the middle, last) equals the file.
        for r in [0, 1, 4_321, 9_999] {
            #expect(test.labels[r] == raw[r * 3073])
            #expect(Array(test.image(r)) == Array(raw[(r * 3073 + 1)..<((r + 1) * 3073)]))
        }
        // Train records are the five batch files in order: record 40,000 is data_batch_5's first,
        // record 49,999 its last.
        let train = try cachedTrain.get()
        let batch5 = [UInt8](try Data(contentsOf: URL(fileURLWithPath: dir + "/data_batch_5.bin")))
        #expect(train.labels[40_000] == batch5[0])
        #expect(Array(train.image(40_000)) == Array(batch5[1..<3073]))
        #expect(train.labels[49_999] == batch5[9_999 * 3073])
        #expect(Array(train.image(49_999)) == Array(batch5[(9_999 * 3073 + 1)...]))
        let batch1 = [UInt8](try Data(contentsOf: URL(fileURLWithPath: dir + "/data_batch_1.bin")))
        #expect(train.labels[0] == batch1[0])
        #expect(Array(train.image(1)) == Array(batch1[3074..<6146]))
    }

    @Test func normalisedValuesMatchHandComputation() throws {
        let test = try cachedTest.get()
        let (out, labels) = assemble(test, [0, 1])
        #expect(labels == [3, Int32(test.labels[1])])
        // (161/255 − 0.4914) / 0.2470 = 0.566690…, (180/255 − 0.4822) / 0.2435 = 0.918613…,
        // (222/255 − 0.4465) / 0.2616 = 1.621132…
        #expect(abs(out[0] - 0.566690) < 1e-5)                 // [c=0][n=0][0][0]
        #expect(abs(out[(1 * 2 + 0) * 1024] - 0.918613) < 1e-5)  // [c=1][n=0][0][0]
        #expect(abs(out[(2 * 2 + 0) * 1024] - 1.621132) < 1e-5)  // [c=2][n=0][0][0]
        // Pixel (5, 7) of the red plane is byte 99: (99/255 − 0.4914) / 0.2470 = −0.417671…
        #expect(test.images[5 * 32 + 7] == 99)
        #expect(abs(out[5 * 32 + 7] - (-0.417671)) < 1e-5)
    }
}

@Suite struct BadInputTests {
    /// Writes `records` records (label `labelFor(r)`, pixels = record number) to `path`.
    func writeBatch(_ path: String, records: Int, labelFor: (Int) -> UInt8 = { UInt8($0 % 10) }) throws {
        try SyntheticCIFAR10.write(SyntheticCIFAR10.uniformRecords(records, label: labelFor), to: path)
    }

    @Test func missingDirectory() throws {
        let dir = "/nonexistent/squeezedata/\(UUID().uuidString)"
        let error = #expect(throws: DataError.self) { try CIFAR10(directory: dir, split: .test) }
        #expect(error == .missingDirectory(dir))
        #expect(error?.description.contains(dir) == true)
    }

    @Test func aFileGivenAsTheDirectoryIsNotCalledMissing() throws {
        let dir = try makeTempDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let file = dir + "/test_batch.bin"
        try writeBatch(file, records: 1)
        let error = #expect(throws: DataError.self) { try CIFAR10(directory: file, split: .test) }
        #expect(error == .notADirectory(file))
        #expect(error?.description.contains("is not a directory") == true)
        #expect(throws: DataError.notADirectory(file)) { try CIFAR10.resolveDirectory(explicit: file, environment: [:]) }
        // A path running through a file.
        #expect(throws: DataError.notADirectory(file + "/x")) { try CIFAR10(directory: file + "/x", split: .test) }
    }

    @Test func aDirectoryWhereABatchFileShouldBe() throws {
        let dir = try makeTempDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try FileManager.default.createDirectory(atPath: dir + "/test_batch.bin", withIntermediateDirectories: true)
        let error = #expect(throws: DataError.self) { try CIFAR10(directory: dir, split: .test) }
        #expect(error == .notARegularFile(dir + "/test_batch.bin"))
    }

    // Root reads any file whatever its mode, so as root the reads are made by a child that is user
    // nobody (setpriv), through squeezetrain's own reader (`eval` reads the test split first).
    @Test(.enabled(if: getuid() != 0 || FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv"),
                   "runs as root without /usr/bin/setpriv: cannot become another user, whom permission checks apply to"))
    func unreadableDirectoryAndFileSayPermissionDenied() throws {
        let dir = try makeTempDirectory()
        defer { chmod(dir, 0o755); try? FileManager.default.removeItem(atPath: dir) }
        let file = dir + "/test_batch.bin"
        try writeBatch(file, records: 1)
        chmod(file, 0o000)
        try expectPermissionDenied(reading: dir, naming: file)
        chmod(dir, 0o000)
        try expectPermissionDenied(reading: dir, naming: dir)
    }

    func expectPermissionDenied(reading dir: String, naming path: String) throws {
        guard getuid() == 0 else {
            #expect(throws: DataError.permissionDenied(path)) { try CIFAR10(directory: dir, split: .test) }
            return
        }
        let nobody = try runAsNobody(squeezetrain, ["eval", "--weights", dir + "/none.safetensors", "--data", dir])
        #expect(nobody.status == 1 && nobody.output.contains(DataError.permissionDenied(path).description), "\(nobody.output)")
    }

    @Test func missingFile() throws {
        let dir = try makeTempDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for i in 1...4 { try writeBatch(dir + "/data_batch_\(i).bin", records: 2) }
        let error = #expect(throws: DataError.self) { try CIFAR10(directory: dir, split: .train) }
        #expect(error == .missingFile(dir + "/data_batch_5.bin"))
        #expect(error?.description.contains("data_batch_5.bin") == true)
        #expect(error?.description.contains("scripts/get-cifar10") == true)
    }

    @Test(arguments: [0, 1, 3])
    func fileSizeNotAMultipleOfTheRecordSize(records: Int) throws {
        let dir = try makeTempDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/test_batch.bin"
        // 3,072 × k bytes: a multiple of the image size but not of the record size (0 bytes when k = 0).
        try SyntheticCIFAR10.write(SyntheticCIFAR10.imagesWithoutLabels(records), to: path)
        let error = #expect(throws: DataError.self) { try CIFAR10(directory: dir, split: .test) }
        #expect(error == .badFileSize(file: path, size: 3072 * records))
        #expect(error?.description.contains(path) == true)
        #expect(error?.description.contains("\(3072 * records) bytes") == true)
    }

    @Test func labelAboveNineNamesFileAndRecord() throws {
        let dir = try makeTempDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/test_batch.bin"
        try writeBatch(path, records: 8) { $0 == 5 ? 10 : 1 }
        let error = #expect(throws: DataError.self) { try CIFAR10(directory: dir, split: .test) }
        #expect(error == .badLabel(file: path, record: 5, label: 10))
        let message = error?.description ?? ""
        #expect(message.contains(path) && message.contains("record 5") && message.contains("label 10"))
    }

    @Test func goodTemporaryFilesLoadInOrder() throws {
        let dir = try makeTempDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for i in 1...5 { try writeBatch(dir + "/data_batch_\(i).bin", records: i) { _ in UInt8(i) } }
        let data = try CIFAR10(directory: dir, split: .train)
        #expect(data.count == 1 + 2 + 3 + 4 + 5)
        #expect(data.labels == [1, 2, 2, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 5])
        #expect(Array(data.image(3)) == [UInt8](repeating: 0, count: 3072))   // batch 3, record 0
        #expect(Array(data.image(14)) == [UInt8](repeating: 4, count: 3072))  // batch 5, record 4
    }

    @Test func inMemoryDataRejectsMismatchedSizesAndBadLabels() {
        #expect(throws: DataError.self) { try CIFAR10(images: [0, 1, 2], labels: [0]) }
        #expect(throws: DataError.self) { try CIFAR10(images: [UInt8](repeating: 0, count: 3072), labels: [12]) }
    }
}

@Suite struct DirectoryResolutionTests {
    @Test func nothingFoundListsPlacesTriedAndTheScript() throws {
        let base = try makeTempDirectory()
        defer { try? FileManager.default.removeItem(atPath: base) }
        let error = #expect(throws: DataError.self) {
            try CIFAR10.resolveDirectory(explicit: nil, environment: [:], base: base)
        }
        guard case .dataNotFound(let tried) = error else {
            Issue.record("expected dataNotFound, got \(String(describing: error))")
            return
        }
        let local = base + "/data/cifar-10-batches-bin"
        let shared = (base as NSString).deletingLastPathComponent + "/shared/data/cifar-10-batches-bin"
        #expect(tried.contains(local) && tried.contains(shared))
        let message = error?.description ?? ""
        #expect(message.contains("scripts/get-cifar10") && message.contains(local) && message.contains("CIFAR10_DIR"))
    }

    @Test func precedenceIsFlagThenEnvironmentThenLocalThenShared() throws {
        let base = try makeTempDirectory()
        defer { try? FileManager.default.removeItem(atPath: base) }
        let local = base + "/data/cifar-10-batches-bin"
        let flag = try makeTempDirectory(), env = try makeTempDirectory()
        defer {
            try? FileManager.default.removeItem(atPath: flag)
            try? FileManager.default.removeItem(atPath: env)
        }
        try FileManager.default.createDirectory(atPath: local, withIntermediateDirectories: true)
        let vars = ["CIFAR10_DIR": env]
        #expect(try CIFAR10.resolveDirectory(explicit: flag, environment: vars, base: base) == flag)
        #expect(try CIFAR10.resolveDirectory(explicit: nil, environment: vars, base: base) == env)
        #expect(try CIFAR10.resolveDirectory(explicit: nil, environment: [:], base: base) == local)
        // A flag or variable naming a missing directory is an error, not a fallback.
        let missing = base + "/nope"
        #expect(throws: DataError.missingDirectory(missing)) {
            try CIFAR10.resolveDirectory(explicit: missing, environment: vars, base: base)
        }
        #expect(throws: DataError.missingDirectory(missing)) {
            try CIFAR10.resolveDirectory(explicit: nil, environment: ["CIFAR10_DIR": missing], base: base)
        }
    }

    @Test func sharedDirectoryBesideTheCheckoutIsFound() throws {
        let parent = try makeTempDirectory()
        defer { try? FileManager.default.removeItem(atPath: parent) }
        let checkout = parent + "/X", shared = parent + "/shared/data/cifar-10-batches-bin"
        try FileManager.default.createDirectory(atPath: checkout, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: shared, withIntermediateDirectories: true)
        #expect(try CIFAR10.resolveDirectory(explicit: nil, environment: [:], base: checkout) == shared)
    }

    @Test func classNames() {
        #expect(CIFAR10.classNames == ["airplane", "automobile", "bird", "cat", "deer",
                                       "dog", "frog", "horse", "ship", "truck"])
    }
}
