/// Every error the data module throws: bad or missing CIFAR-10 files and invalid sampler settings.
///
/// The description names the file (and the record index, counting from 0 within that file, where
/// one record is at fault) so the user can tell exactly what to fix.
public enum DataError: Error, CustomStringConvertible, Equatable, Sendable {
    /// No data directory was given and none of the default places exists.
    case dataNotFound(tried: [String])
    /// A directory given explicitly (flag or `$CIFAR10_DIR`) does not exist.
    case missingDirectory(String)
    /// A path given as the data directory exists but is not a directory (a regular file, say).
    case notADirectory(String)
    /// A batch file's path exists but is not a regular file (a directory, say).
    case notARegularFile(String)
    /// The directory or file exists but this user may not read it.
    case permissionDenied(String)
    /// An expected batch file is missing.
    case missingFile(String)
    /// The file exists but could not be read.
    case unreadableFile(String, reason: String)
    /// The file's size is not a positive multiple of the record size (3,073 bytes).
    case badFileSize(file: String, size: Int)
    /// A record's label byte is above 9.
    case badLabel(file: String, record: Int, label: UInt8)
    /// A record index outside the data set's 0..<count.
    case recordOutOfRange(record: Int, count: Int)
    /// Inconsistent sampler or batching settings (e.g. a global batch not divisible by the shard count).
    case invalidConfiguration(String)

    public var description: String {
        switch self {
        case .dataNotFound(let tried):
            return "CIFAR-10 data not found; tried: " + tried.joined(separator: ", ")
                + ". Run scripts/get-cifar10, set $CIFAR10_DIR, or pass --data DIR."
        case .missingDirectory(let dir):
            return "CIFAR-10 directory \(dir) does not exist (run scripts/get-cifar10 to download the data)"
        case .notADirectory(let path):
            return "CIFAR-10 directory \(path) is not a directory (give the folder holding data_batch_1.bin … test_batch.bin)"
        case .notARegularFile(let path):
            return "CIFAR-10 file \(path) is not a regular file"
        case .permissionDenied(let path):
            return "CIFAR-10 data \(path): permission denied (this user may not read it)"
        case .missingFile(let file):
            return "CIFAR-10 file \(file) is missing (run scripts/get-cifar10 to download the data)"
        case .unreadableFile(let file, let reason):
            return "CIFAR-10 file \(file) could not be read: \(reason)"
        case .badFileSize(let file, let size):
            return "CIFAR-10 file \(file) has \(size) bytes, not a positive multiple of the "
                + "\(CIFAR10.recordSize)-byte record size (truncated or not a CIFAR-10 binary batch?)"
        case .badLabel(let file, let record, let label):
            return "CIFAR-10 file \(file), record \(record): label \(label) is not in 0...9"
        case .recordOutOfRange(let record, let count):
            return "record index \(record) is outside the data set's \(count) records"
        case .invalidConfiguration(let message):
            return "invalid data configuration: \(message)"
        }
    }
}
