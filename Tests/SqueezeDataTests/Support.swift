import Foundation
import Testing
import SqueezeData
import SqueezeTestSupport

/// The real CIFAR-10 directory: $CIFAR10_DIR, else <root>/data/…, else <root>/../shared/data/… (tests that read
/// it carry `.needsRealCIFAR10`).
func realDataDirectory() throws -> String {
    try TestInputs.realCIFAR10 ?? CIFAR10.resolveDirectory(explicit: nil, base: TestInputs.packageRoot)
}

/// Loaded once and shared by every test (globals initialise lazily and thread-safely).
let cachedTrain = Result { try CIFAR10(directory: realDataDirectory(), split: .train) }
let cachedTest = Result { try CIFAR10(directory: realDataDirectory(), split: .test) }

/// A fresh temporary directory, removed by `body`'s caller via `defer`.
func makeTempDirectory() throws -> String {
    let dir = FileManager.default.temporaryDirectory
        .appendingPathComponent("squeezedata-tests-\(UUID().uuidString)").path
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

/// `count` synthetic records with pseudo-random pixels and labels `i % 10`.
func syntheticDataset(count: Int, seed: UInt64 = 1) throws -> CIFAR10 {
    try CIFAR10(images: SyntheticCIFAR10.pixels(images: count, seed: seed), labels: (0..<count).map { UInt8($0 % 10) })
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

/// Runs `executable arguments` as user and group nobody (65534, through setpriv; the caller is root);
/// returns its exit status and its standard output and error together.
func runAsNobody(_ executable: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
    process.arguments = ["--reuid=65534", "--regid=65534", "--clear-groups", executable] + arguments
    return try runCollectingOutput(process)
}
