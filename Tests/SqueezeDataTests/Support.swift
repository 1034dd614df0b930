import Foundation
import Testing
import SqueezeData

/// The package root: this file is <root>/Tests/SqueezeDataTests/Support.swift.
let packageRoot: String = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

/// The real CIFAR-10 directory: $CIFAR10_DIR, else <root>/data/…, else <root>/../shared/data/….
func realDataDirectory() throws -> String {
    try CIFAR10.resolveDirectory(explicit: nil, base: packageRoot)
}

/// Loaded once and shared by every test (globals initialise lazily and thread-safely).
let cachedTrain = Result { try CIFAR10(directory: realDataDirectory(), split: .train) }
let cachedTest = Result { try CIFAR10(directory: realDataDirectory(), split: .test) }

/// Tests of the real files are reported as skipped, with the reason, when no CIFAR-10 directory is found.
extension Trait where Self == ConditionTrait {
    static var needsCIFAR10: Self {
        .enabled(if: (try? realDataDirectory()) != nil,
                 "needs CIFAR-10: $CIFAR10_DIR, data/ or ../shared/data/cifar-10-batches-bin (scripts/get-cifar10)")
    }
}

/// A fresh temporary directory, removed by `body`'s caller via `defer`.
func makeTempDirectory() throws -> String {
    let dir = FileManager.default.temporaryDirectory
        .appendingPathComponent("squeezedata-tests-\(UUID().uuidString)").path
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

/// `count` synthetic records with pseudo-random pixels and labels `i % 10`.
func syntheticDataset(count: Int, seed: UInt64 = 1) throws -> CIFAR10 {
    var x = seed
    var images = [UInt8](repeating: 0, count: count * CIFAR10.imageBytes)
    for i in images.indices {
        x = x &* 6364136223846793005 &+ 1442695040888963407
        images[i] = UInt8(truncatingIfNeeded: x >> 56)
    }
    return try CIFAR10(images: images, labels: (0..<count).map { UInt8($0 % 10) })
}

/// A channel-major (C, N, 32, 32) buffer filled by `fillBatch`, as an array.
func assemble(_ data: CIFAR10, _ indices: [Int], epoch: Int = 0, augmentSeed: UInt64? = nil) -> ([Float], [Int32]) {
    var out = [Float](repeating: .nan, count: 3 * indices.count * 1024)
    let labels = out.withUnsafeMutableBufferPointer {
        try! data.fillBatch(indices: indices, epoch: epoch, augmentSeed: augmentSeed, into: $0.baseAddress!)
    }
    return (out, labels)
}

/// Plane (c, n) of a (C, N, S, S) buffer.
func plane(_ buffer: [Float], c: Int, n: Int, batch: Int, side: Int = 32) -> ArraySlice<Float> {
    let start = (c * batch + n) * side * side
    return buffer[start..<(start + side * side)]
}

/// The `squeezetrain` executable built alongside the tests.
let squeezetrain: String = {
    var candidates = [URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().path]
    candidates += ["release", "debug"].map { packageRoot + "/.build/\($0)" }
    return candidates.map { $0 + "/squeezetrain" }.first { FileManager.default.isExecutableFile(atPath: $0) }
        ?? "squeezetrain executable not found next to the tests (\(candidates)); run `swift build` first"
}()

/// Runs `executable arguments` as user and group nobody (65534, through setpriv; the caller is root);
/// returns its exit status and its standard output and error together.
func runAsNobody(_ executable: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
    process.arguments = ["--reuid=65534", "--regid=65534", "--clear-groups", executable] + arguments
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    try process.run()
    let output = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: output, as: UTF8.self))
}
