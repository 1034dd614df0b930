import Foundation
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
