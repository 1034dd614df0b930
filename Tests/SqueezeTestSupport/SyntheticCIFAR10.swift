// CIFAR-10-format files for tests: valid records to train on when the real data set is absent, and the
// malformed files the data tests need.
import Foundation

/// The binary format of CIFAR-10 (https://www.cs.toronto.edu/~kriz/cifar.html): records of a label byte
/// (0–9) and 3,072 pixel bytes (1,024 red, 1,024 green, 1,024 blue, rows top to bottom), one file per batch.
public enum SyntheticCIFAR10 {
    public static let imageBytes = 3072
    public static let recordBytes = 1 + imageBytes
    /// The train split `writeDirectory` writes: five files of this many records, 10,000 in all, so that an
    /// epoch lasts 625 steps at batch 16 (tests that run `--steps 100000` and expect no epoch's end soon).
    public static let recordsPerTrainFile = 2_000
    public static let testRecords = 1_000

    /// `count` × 3,072 pixel bytes, pseudo-random from `seed` (a 64-bit LCG's top byte).
    public static func pixels(images count: Int, seed: UInt64 = 1) -> [UInt8] {
        var x = seed
        return (0..<(count * imageBytes)).map { _ in
            x = x &* 6364136223846793005 &+ 1442695040888963407
            return UInt8(truncatingIfNeeded: x >> 56)
        }
    }

    /// `count` valid records: record r has label `label(r)` (default r mod 10) and pseudo-random pixels.
    public static func records(_ count: Int, seed: UInt64 = 1, label: (Int) -> UInt8 = { UInt8($0 % 10) }) -> [UInt8] {
        let images = pixels(images: count, seed: seed)
        var bytes = [UInt8]()
        bytes.reserveCapacity(count * recordBytes)
        for r in 0..<count {
            bytes.append(label(r))
            bytes += images[(r * imageBytes)..<((r + 1) * imageBytes)]
        }
        return bytes
    }

    /// `count` records whose 3,072 pixels all equal `pixel(r)`: easy to recognise after loading. A `label`
    /// above 9 makes the file malformed (the reader names the file and the record).
    public static func uniformRecords(_ count: Int, label: (Int) -> UInt8 = { UInt8($0 % 10) },
                                      pixel: (Int) -> UInt8 = { UInt8($0 % 256) }) -> [UInt8] {
        (0..<count).flatMap { [label($0)] + [UInt8](repeating: pixel($0), count: imageBytes) }
    }

    /// 3,072 × `images` bytes: whole images without their label bytes, so not a whole number of records
    /// (0 bytes, an empty file, when `images` is 0).
    public static func imagesWithoutLabels(_ images: Int) -> [UInt8] {
        [UInt8](repeating: 1, count: imageBytes * images)
    }

    public static func write(_ bytes: [UInt8], to path: String) throws {
        try Data(bytes).write(to: URL(fileURLWithPath: path))
    }

    /// A complete data set in `directory`: data_batch_1…5.bin of `recordsPerTrainFile` records each and
    /// test_batch.bin of `testRecords`, every file with its own seed.
    public static func writeDirectory(_ directory: String, recordsPerTrainFile: Int = recordsPerTrainFile,
                                      testRecords: Int = testRecords) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        for i in 1...5 {
            try write(records(recordsPerTrainFile, seed: UInt64(i)), to: directory + "/data_batch_\(i).bin")
        }
        try write(records(testRecords, seed: 6), to: directory + "/test_batch.bin")
    }
}
