import Foundation

/// The CIFAR-10 data set (binary version), held in memory.
///
/// File format: each `.bin` file is a sequence of 3,073-byte records: one label byte (0–9), then the
/// 32×32 image as 1,024 red, 1,024 green and 1,024 blue bytes, each plane row-major.
///
/// In memory, `images` is all images back to back in that same layout: image `i`, channel `c`,
/// row `y`, column `x` is `images[i * 3072 + c * 1024 + y * 32 + x]` (a byte, 0–255).
/// `labels[i]` is image `i`'s class (0–9), an index into `classNames`.
/// Records keep file order: the train split is `data_batch_1.bin` … `data_batch_5.bin` in turn.
public struct CIFAR10: Sendable {
    public static let imageSide = 32
    public static let channels = 3
    /// Bytes per image: 3 × 32 × 32.
    public static let imageBytes = 3 * 32 * 32
    /// Bytes per record in a `.bin` file: a label byte and an image.
    public static let recordSize = 1 + imageBytes
    public static let classNames = [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    ]

    public enum Split: String, Sendable, CaseIterable {
        case train, test

        /// The files making up the split, in load order.
        public var fileNames: [String] {
            switch self {
            case .train: return (1...5).map { "data_batch_\($0).bin" }
            case .test: return ["test_batch.bin"]
            }
        }
    }

    /// Images, `count × 3072` bytes, layout (N, C, H, W) as described above.
    public let images: [UInt8]
    /// Labels, `count` bytes, each 0–9.
    public let labels: [UInt8]

    public var count: Int { labels.count }

    /// Wraps images and labels already in memory (e.g. synthetic data in tests).
    /// Throws if the sizes disagree or a label is above 9.
    public init(images: [UInt8], labels: [UInt8]) throws {
        guard images.count == labels.count * Self.imageBytes else {
            throw DataError.invalidConfiguration(
                "\(images.count) image bytes for \(labels.count) labels (expected \(labels.count * Self.imageBytes))")
        }
        if let bad = labels.firstIndex(where: { $0 > 9 }) {
            throw DataError.badLabel(file: "<memory>", record: bad, label: labels[bad])
        }
        self.images = images
        self.labels = labels
    }

    /// Loads a whole split from `directory`. Throws `DataError` for a missing directory or file, a
    /// file size that is not a positive multiple of 3,073, or a label above 9; never returns partial data.
    public init(directory: String, split: Split) throws {
        try self.init(directory: directory, files: split.fileNames)
    }

    /// Loads the given files from `directory`, concatenated in order.
    public init(directory: String, files: [String]) throws {
        try Self.checkDirectory(directory)
        var contents: [(path: String, data: Data)] = []
        var total = 0
        for name in files {
            let path = (directory as NSString).appendingPathComponent(name)
            let data = try Self.readFile(path)
            guard data.count > 0, data.count % Self.recordSize == 0 else {
                throw DataError.badFileSize(file: path, size: data.count)
            }
            contents.append((path, data))
            total += data.count / Self.recordSize
        }

        var images = [UInt8](repeating: 0, count: total * Self.imageBytes)
        var labels = [UInt8](repeating: 0, count: total)
        var next = 0
        try images.withUnsafeMutableBufferPointer { img in
            try labels.withUnsafeMutableBufferPointer { lab in
                for (path, data) in contents {
                    try data.withUnsafeBytes { (raw: UnsafeRawBufferPointer) in
                        let src = raw.bindMemory(to: UInt8.self).baseAddress!
                        for r in 0..<(raw.count / Self.recordSize) {
                            let record = src + r * Self.recordSize
                            let label = record[0]
                            guard label <= 9 else { throw DataError.badLabel(file: path, record: r, label: label) }
                            lab[next] = label
                            (img.baseAddress! + next * Self.imageBytes)
                                .update(from: record + 1, count: Self.imageBytes)
                            next += 1
                        }
                    }
                }
            }
        }
        self.images = images
        self.labels = labels
    }

    /// Throws unless `path` is a directory this user can list and enter, saying which of these it is not.
    static func checkDirectory(_ path: String) throws {
        var info = stat()
        guard stat(path, &info) == 0 else {
            switch errno {
            case EACCES: throw DataError.permissionDenied(path)
            case ENOTDIR: throw DataError.notADirectory(path)
            default: throw DataError.missingDirectory(path)
            }
        }
        guard (info.st_mode & S_IFMT) == S_IFDIR else { throw DataError.notADirectory(path) }
        guard access(path, R_OK | X_OK) == 0 else { throw DataError.permissionDenied(path) }
    }

    /// The whole file at `path` (read, not mapped: a file truncated while mapped would crash the reader).
    static func readFile(_ path: String) throws -> Data {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            switch errno {
            case ENOENT: throw DataError.missingFile(path)
            case EACCES: throw DataError.permissionDenied(path)
            default: throw DataError.unreadableFile(path, reason: String(cString: strerror(errno)))
            }
        }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw DataError.unreadableFile(path, reason: String(cString: strerror(errno))) }
        guard (info.st_mode & S_IFMT) == S_IFREG else { throw DataError.notARegularFile(path) }
        let size = Int(info.st_size)
        guard size > 0, size % recordSize == 0 else { throw DataError.badFileSize(file: path, size: size) }
        var data = Data(count: size)
        let got = data.withUnsafeMutableBytes { buffer -> Int in
            var done = 0
            while done < size {
                let n = read(fd, buffer.baseAddress! + done, size - done)
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { return n < 0 ? -Int(errno) : done }
                done += n
            }
            return done
        }
        guard got == size else {
            throw DataError.unreadableFile(path, reason: got < 0 ? String(cString: strerror(Int32(-got))) : "the file shrank to \(got) bytes while being read")
        }
        return data
    }

    /// Image `i`'s 3,072 bytes, layout (C, H, W).
    public func image(_ i: Int) -> ArraySlice<UInt8> {
        images[(i * Self.imageBytes)..<((i + 1) * Self.imageBytes)]
    }

    /// Environment variable naming the data directory.
    public static let environmentVariable = "CIFAR10_DIR"

    /// Finds the data directory: `explicit` (a `--data DIR` value) if given, else `$CIFAR10_DIR` if
    /// set, else the first existing one of `<base>/data/cifar-10-batches-bin` and
    /// `<base>/../shared/data/cifar-10-batches-bin`, where `base` defaults to the current directory.
    ///
    /// An explicit directory or `$CIFAR10_DIR` that does not exist is an error (`missingDirectory`),
    /// not a reason to look elsewhere. When nothing is found, throws `dataNotFound` listing the places
    /// tried (its message says to run `scripts/get-cifar10`).
    public static func resolveDirectory(
        explicit: String?,
        environment: [String: String] = ProcessInfo.processInfo.environment,
        base: String = FileManager.default.currentDirectoryPath
    ) throws -> String {
        func isDirectory(_ path: String) -> Bool {
            var isDir: ObjCBool = false
            return FileManager.default.fileExists(atPath: path, isDirectory: &isDir) && isDir.boolValue
        }
        if let explicit, !explicit.isEmpty {
            try checkDirectory(explicit)
            return explicit
        }
        if let env = environment[environmentVariable], !env.isEmpty {
            try checkDirectory(env)
            return env
        }
        let candidates = ["data/cifar-10-batches-bin", "../shared/data/cifar-10-batches-bin"].map {
            ((base as NSString).appendingPathComponent($0) as NSString).standardizingPath
        }
        if let found = candidates.first(where: isDirectory) { return found }
        throw DataError.dataNotFound(tried: ["--data DIR (not given)", "$\(environmentVariable) (not set)"] + candidates)
    }
}
