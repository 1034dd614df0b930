// A small, dependency-free reader and writer for the safetensors format:
//
//     [8 bytes: N, little-endian UInt64] [N bytes: JSON header] [data section]
//
// The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into
// the data section) and may hold "__metadata__": {string: string}. Element data is raw little-endian,
// row-major. Only the header goes through JSON; tensor bytes are moved with plain reads, writes and
// memory copies.

import Foundation
import SqueezeSystem
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

#if !_endian(little)
#error("Safetensors.swift copies tensor bytes as they are in memory, so it needs a little-endian host.")
#endif

/// Element types of the safetensors format, spelled as in the header's "dtype" field.
public enum SafetensorsDType: String, Sendable, CaseIterable {
    case bool = "BOOL", u8 = "U8", i8 = "I8", f8e5m2 = "F8_E5M2", f8e4m3 = "F8_E4M3"
    case i16 = "I16", u16 = "U16", f16 = "F16", bf16 = "BF16"
    case i32 = "I32", u32 = "U32", f32 = "F32"
    case i64 = "I64", u64 = "U64", f64 = "F64"

    /// Bytes per element.
    public var byteCount: Int {
        switch self {
        case .bool, .u8, .i8, .f8e5m2, .f8e4m3: 1
        case .i16, .u16, .f16, .bf16: 2
        case .i32, .u32, .f32: 4
        case .i64, .u64, .f64: 8
        }
    }
}

/// One tensor of a safetensors file: its raw little-endian, row-major element bytes and what they are.
public struct SafetensorsTensor: Sendable, Equatable {
    public var name: String
    public var dtype: SafetensorsDType
    /// PyTorch's shape, e.g. [64, 3, 3, 3] for a convolution weight; [] for a scalar.
    public var shape: [Int]
    /// `elementCount * dtype.byteCount` bytes.
    public var bytes: [UInt8]
    /// The file the tensor was read from, for error messages; nil for a tensor made in memory.
    /// Not part of equality.
    public var file: String?

    public init(name: String, dtype: SafetensorsDType, shape: [Int], bytes: [UInt8]) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.bytes = bytes
        self.file = nil
    }

    /// An F32 tensor holding `floats` (bit for bit).
    public init(name: String, shape: [Int], floats: [Float]) {
        self.init(name: name, dtype: .f32, shape: shape, bytes: floats.withUnsafeBytes { Array($0) })
    }

    /// An I64 tensor holding `int64s` (e.g. labels, or BatchNorm's `num_batches_tracked`).
    public init(name: String, shape: [Int], int64s: [Int64]) {
        self.init(name: name, dtype: .i64, shape: shape, bytes: int64s.withUnsafeBytes { Array($0) })
    }

    /// The number of elements: the product of `shape` (1 for a scalar).
    public var elementCount: Int { shape.reduce(1, *) }

    /// The elements of an F32 tensor. Throws `SafetensorsError.wrongDType` for any other dtype.
    public func floats() throws -> [Float] { try elements(Float.self, dtype: .f32) }

    /// The elements of an I64 tensor. Throws `SafetensorsError.wrongDType` for any other dtype.
    public func int64s() throws -> [Int64] { try elements(Int64.self, dtype: .i64) }

    private func elements<T: BitwiseCopyable>(_: T.Type, dtype required: SafetensorsDType) throws -> [T] {
        let source = file ?? "(in memory)"
        guard dtype == required else {
            throw SafetensorsError.wrongDType(file: source, tensor: name, expected: required, found: dtype)
        }
        let count = elementCount
        guard bytes.count == count * MemoryLayout<T>.stride else {
            throw SafetensorsError.invalidTensor(
                file: source, tensor: name,
                reason: "\(bytes.count) bytes do not hold \(dtype.rawValue) \(shape)")
        }
        return [T](unsafeUninitializedCapacity: count) { buffer, initialized in
            bytes.withUnsafeBytes { UnsafeMutableRawBufferPointer(buffer).copyMemory(from: $0) }
            initialized = count
        }
    }

    public static func == (a: SafetensorsTensor, b: SafetensorsTensor) -> Bool {
        a.name == b.name && a.dtype == b.dtype && a.shape == b.shape && a.bytes == b.bytes
    }
}

/// Everything that can go wrong reading, writing or checking a safetensors file. Every message names
/// the file and, where one is involved, the tensor.
public enum SafetensorsError: Error, CustomStringConvertible, Equatable, Sendable {
    /// An operating-system call failed (the file is missing or unreadable, the disk is full, ...).
    case io(file: String, operation: String, reason: String)
    /// The file cannot even hold the 8-byte header length.
    case tooShort(file: String, size: Int)
    /// The header length says the header runs past the end of the file.
    case headerBeyondFile(file: String, headerLength: UInt64, fileSize: Int)
    /// The header is not valid JSON, not a JSON object, or has a malformed "__metadata__".
    case invalidHeader(file: String, reason: String)
    /// A tensor's entry is not an object or lacks (or mistypes) "dtype", "shape" or "data_offsets".
    case invalidEntry(file: String, tensor: String, reason: String)
    /// A tensor's dtype is not one of `SafetensorsDType`.
    case unknownDType(file: String, tensor: String, dtype: String)
    /// A tensor's data_offsets fall outside the data section.
    case offsetsOutOfRange(file: String, tensor: String, begin: Int, end: Int, dataSize: Int)
    /// A tensor's data_offsets span a different number of bytes than its shape and dtype need.
    case sizeMismatch(file: String, tensor: String, dtype: SafetensorsDType, shape: [Int],
                      expectedBytes: Int, foundBytes: Int)
    /// Two tensors' data ranges overlap.
    case overlap(file: String, tensor: String, other: String)
    /// A tensor has another dtype than the one required (e.g. `floats()` on an I64 tensor).
    case wrongDType(file: String, tensor: String, expected: SafetensorsDType, found: SafetensorsDType)
    /// A tensor given to the writer is inconsistent (shape vs. data, duplicate or reserved name).
    case invalidTensor(file: String, tensor: String, reason: String)
    /// The tensors of a file do not match what a model expects; lists every problem found.
    case mismatchedTensors(file: String, problems: [Problem])

    /// One way a file's tensors differ from a model's expected tensors.
    public enum Problem: Equatable, Sendable, CustomStringConvertible {
        case missing(tensor: String, shape: [Int])
        case unexpected(tensor: String, dtype: SafetensorsDType, shape: [Int])
        case wrongShape(tensor: String, expected: [Int], found: [Int])
        case wrongDType(tensor: String, found: SafetensorsDType, allowed: [SafetensorsDType])

        public var description: String {
            switch self {
            case let .missing(tensor, shape):
                "missing tensor '\(tensor)' (expected shape \(shape))"
            case let .unexpected(tensor, dtype, shape):
                "unexpected tensor '\(tensor)' (\(dtype.rawValue) \(shape))"
            case let .wrongShape(tensor, expected, found):
                "tensor '\(tensor)' has shape \(found), expected \(expected)"
            case let .wrongDType(tensor, found, allowed):
                "tensor '\(tensor)' is \(found.rawValue), expected \(allowed.map(\.rawValue).joined(separator: " or "))"
            }
        }
    }

    public var description: String {
        switch self {
        case let .io(file, operation, reason):
            "\(file): cannot \(operation): \(reason)"
        case let .tooShort(file, size):
            "\(file): not a safetensors file: \(size) bytes, too short for the 8-byte header length"
        case let .headerBeyondFile(file, headerLength, fileSize):
            "\(file): header length \(headerLength) runs past the end of the file (\(fileSize) bytes)"
        case let .invalidHeader(file, reason):
            "\(file): invalid safetensors header: \(reason)"
        case let .invalidEntry(file, tensor, reason):
            "\(file): tensor '\(tensor)': invalid header entry: \(reason)"
        case let .unknownDType(file, tensor, dtype):
            "\(file): tensor '\(tensor)': unknown dtype \"\(dtype)\""
        case let .offsetsOutOfRange(file, tensor, begin, end, dataSize):
            "\(file): tensor '\(tensor)': data_offsets [\(begin), \(end)] are outside the data section of \(dataSize) bytes"
        case let .sizeMismatch(file, tensor, dtype, shape, expectedBytes, foundBytes):
            "\(file): tensor '\(tensor)': data_offsets span \(foundBytes) bytes but \(dtype.rawValue) \(shape) needs \(expectedBytes)"
        case let .overlap(file, tensor, other):
            "\(file): tensor '\(tensor)' overlaps tensor '\(other)' in the data section"
        case let .wrongDType(file, tensor, expected, found):
            "\(file): tensor '\(tensor)' is \(found.rawValue), but \(expected.rawValue) is required"
        case let .invalidTensor(file, tensor, reason):
            "\(file): tensor '\(tensor)': \(reason)"
        case let .mismatchedTensors(file, problems):
            "\(file): the tensors do not match the model (\(problems.count) problem\(problems.count == 1 ? "" : "s")):"
                + problems.map { "\n  - \($0)" }.joined()
        }
    }
}

/// Reading, writing and checking safetensors files.
public enum Safetensors {
    // MARK: Reading

    /// Reads every tensor of the file at `path`, checking the header and all data offsets first.
    /// The data of each tensor is read straight into its `bytes`.
    public static func read(path: String) throws -> (tensors: [String: SafetensorsTensor], metadata: [String: String]) {
        try withHeader(path: path) { fd, entries, metadata, dataStart in
            var tensors = [String: SafetensorsTensor](minimumCapacity: entries.count)
            for entry in entries {
                let bytes = try readExactly(fd, count: entry.end - entry.begin, offset: dataStart + entry.begin, path: path)
                var tensor = SafetensorsTensor(name: entry.name, dtype: entry.dtype, shape: entry.shape, bytes: bytes)
                tensor.file = path
                tensors[entry.name] = tensor
            }
            return (tensors, metadata)
        }
    }

    /// The "__metadata__" of the file at `path` (its header checked as `read` checks it; no tensor data read).
    public static func readMetadata(path: String) throws -> [String: String] {
        try withHeader(path: path) { _, _, metadata, _ in metadata }
    }

    /// Decodes the bytes of a whole safetensors file held in memory (`encode`'s, or received), with the
    /// checks `read` makes; `source` names them in errors, as a file's path would.
    public static func decode(_ bytes: [UInt8], source: String) throws -> (tensors: [String: SafetensorsTensor], metadata: [String: String]) {
        guard bytes.count >= 8 else { throw SafetensorsError.tooShort(file: source, size: bytes.count) }
        let headerLength = bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        guard headerLength <= UInt64(bytes.count - 8) else {
            throw SafetensorsError.headerBeyondFile(file: source, headerLength: headerLength, fileSize: bytes.count)
        }
        let dataStart = 8 + Int(headerLength)
        let (entries, metadata) = try parseHeader(Array(bytes[8..<dataStart]), path: source, dataSize: bytes.count - dataStart)
        var tensors = [String: SafetensorsTensor](minimumCapacity: entries.count)
        for entry in entries {
            tensors[entry.name] = SafetensorsTensor(name: entry.name, dtype: entry.dtype, shape: entry.shape,
                                                    bytes: Array(bytes[(dataStart + entry.begin)..<(dataStart + entry.end)]))
        }
        return (tensors, metadata)
    }

    /// Opens `path`, reads and checks its header, and passes the open file, the entries, the metadata
    /// and the offset of the data section to `body`.
    private static func withHeader<R>(
        path: String, _ body: (Int32, [Entry], [String: String], Int) throws -> R
    ) throws -> R {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw osError(path, "open") }
        defer { close(fd) }

        var info = stat()
        guard fstat(fd, &info) == 0 else { throw osError(path, "stat") }
        guard (info.st_mode & S_IFMT) == S_IFREG else {
            throw SafetensorsError.io(file: path, operation: "read", reason: "not a regular file")
        }
        let fileSize = Int(info.st_size)
        guard fileSize >= 8 else { throw SafetensorsError.tooShort(file: path, size: fileSize) }

        let lengthBytes = try readExactly(fd, count: 8, offset: 0, path: path)
        let headerLength = lengthBytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        guard headerLength <= UInt64(fileSize - 8) else {
            throw SafetensorsError.headerBeyondFile(file: path, headerLength: headerLength, fileSize: fileSize)
        }
        let dataStart = 8 + Int(headerLength)
        let header = try readExactly(fd, count: Int(headerLength), offset: 8, path: path)
        let (entries, metadata) = try parseHeader(header, path: path, dataSize: fileSize - dataStart)
        return try body(fd, entries, metadata, dataStart)
    }

    private struct Entry {
        var name: String
        var dtype: SafetensorsDType
        var shape: [Int]
        var begin: Int
        var end: Int
    }

    /// Parses and checks the JSON header; entries come back sorted by name.
    private static func parseHeader(_ header: [UInt8], path: String, dataSize: Int) throws
        -> (entries: [Entry], metadata: [String: String])
    {
        let json: Any
        do {
            json = try JSONSerialization.jsonObject(with: Data(header), options: [.fragmentsAllowed])
        } catch {
            let detail = (error as NSError).userInfo[NSDebugDescriptionErrorKey] as? String ?? "\(error)"
            throw SafetensorsError.invalidHeader(file: path, reason: "not valid JSON: \(detail)")
        }
        guard let object = json as? [String: Any] else {
            throw SafetensorsError.invalidHeader(file: path, reason: "not a JSON object")
        }

        var metadata = [String: String]()
        var entries = [Entry]()
        for name in object.keys.sorted() {
            let value = object[name]!
            if name == "__metadata__" {
                guard let fields = value as? [String: Any] else {
                    throw SafetensorsError.invalidHeader(file: path, reason: "\"__metadata__\" is not an object")
                }
                for (key, item) in fields {
                    guard let text = item as? String else {
                        throw SafetensorsError.invalidHeader(
                            file: path, reason: "\"__metadata__\" value for \"\(key)\" is not a string")
                    }
                    metadata[key] = text
                }
                continue
            }
            entries.append(try parseEntry(name: name, value: value, path: path, dataSize: dataSize))
        }

        // No two non-empty byte ranges may share a byte.
        let ranged = entries.filter { $0.end > $0.begin }.sorted { ($0.begin, $0.end) < ($1.begin, $1.end) }
        if var previous = ranged.first {
            for entry in ranged.dropFirst() {
                if entry.begin < previous.end {
                    throw SafetensorsError.overlap(file: path, tensor: entry.name, other: previous.name)
                }
                previous = entry
            }
        }
        return (entries, metadata)
    }

    private static func parseEntry(name: String, value: Any, path: String, dataSize: Int) throws -> Entry {
        func invalid(_ reason: String) -> SafetensorsError {
            .invalidEntry(file: path, tensor: name, reason: reason)
        }
        guard let fields = value as? [String: Any] else { throw invalid("not a JSON object") }
        guard let dtypeValue = fields["dtype"] else { throw invalid("missing \"dtype\"") }
        guard let dtypeName = dtypeValue as? String else { throw invalid("\"dtype\" is not a string") }
        guard let shapeValue = fields["shape"] else { throw invalid("missing \"shape\"") }
        guard let shapeItems = shapeValue as? [Any] else { throw invalid("\"shape\" is not an array") }
        let shape = shapeItems.compactMap { $0 as? Int }
        guard shape.count == shapeItems.count, shape.allSatisfy({ $0 >= 0 }) else {
            throw invalid("\"shape\" is not a list of non-negative integers")
        }
        guard let offsetsValue = fields["data_offsets"] else { throw invalid("missing \"data_offsets\"") }
        let offsets = (offsetsValue as? [Any])?.compactMap { $0 as? Int } ?? []
        guard offsets.count == 2, ((offsetsValue as? [Any])?.count ?? 0) == 2 else {
            throw invalid("\"data_offsets\" is not a pair of integers")
        }
        guard let dtype = SafetensorsDType(rawValue: dtypeName) else {
            throw SafetensorsError.unknownDType(file: path, tensor: name, dtype: dtypeName)
        }
        let (begin, end) = (offsets[0], offsets[1])
        guard 0 <= begin, begin <= end, end <= dataSize else {
            throw SafetensorsError.offsetsOutOfRange(file: path, tensor: name, begin: begin, end: end, dataSize: dataSize)
        }
        guard let needed = byteCount(shape: shape, dtype: dtype) else { throw invalid("shape \(shape) is too large") }
        guard end - begin == needed else {
            throw SafetensorsError.sizeMismatch(
                file: path, tensor: name, dtype: dtype, shape: shape, expectedBytes: needed, foundBytes: end - begin)
        }
        return Entry(name: name, dtype: dtype, shape: shape, begin: begin, end: end)
    }

    /// Bytes needed by `shape` of `dtype`, or nil if that overflows (or a dimension is negative).
    private static func byteCount(shape: [Int], dtype: SafetensorsDType) -> Int? {
        var total = dtype.byteCount
        for dimension in shape {
            guard dimension >= 0 else { return nil }
            let (product, overflow) = total.multipliedReportingOverflow(by: dimension)
            guard !overflow else { return nil }
            total = product
        }
        return total
    }

    // MARK: Writing

    /// Writes F32 tensors (read through `data`, no copies) plus optional I64 tensors such as BatchNorm's
    /// `num_batches_tracked`, and string metadata, to `path`, atomically (see `write(path:tensors:metadata:)`).
    public static func write(
        path: String,
        tensors: [(name: String, shape: [Int], data: UnsafeBufferPointer<Float>)],
        int64Tensors: [(name: String, shape: [Int], data: [Int64])] = [],
        metadata: [String: String] = [:]
    ) throws {
        var items = tensors.map { tensor in
            Item(name: tensor.name, dtype: .f32, shape: tensor.shape,
                 byteCount: tensor.data.count * MemoryLayout<Float>.stride,
                 withBytes: { body in try body(UnsafeRawBufferPointer(tensor.data)) })
        }
        items += int64Tensors.map { tensor in
            Item(name: tensor.name, dtype: .i64, shape: tensor.shape,
                 byteCount: tensor.data.count * MemoryLayout<Int64>.stride,
                 withBytes: { body in try tensor.data.withUnsafeBytes(body) })
        }
        try write(path: path, items: items, metadata: metadata)
    }

    /// Writes `tensors` (any dtypes) and string `metadata` to `path`.
    ///
    /// The layout is torch's: tensors ordered by element size (largest first, so every tensor is
    /// aligned to its element size), then by name; the JSON header is compact and padded with spaces
    /// to a multiple of 8 bytes. The file is written atomically: to a temporary file in the same
    /// directory, which is fsync'ed and renamed over `path`, and then the directory is fsync'ed, so
    /// `path` always holds either the old file or the complete new one.
    public static func write(path: String, tensors: [SafetensorsTensor], metadata: [String: String] = [:]) throws {
        let items = tensors.map { tensor in
            Item(name: tensor.name, dtype: tensor.dtype, shape: tensor.shape, byteCount: tensor.bytes.count,
                 withBytes: { body in try tensor.bytes.withUnsafeBytes(body) })
        }
        try write(path: path, items: items, metadata: metadata)
    }

    /// A tensor to write; `withBytes` lends its data for the duration of a call.
    private struct Item {
        var name: String
        var dtype: SafetensorsDType
        var shape: [Int]
        var byteCount: Int
        var withBytes: ((UnsafeRawBufferPointer) throws -> Void) throws -> Void
    }

    /// The F32 `tensors` and string `metadata` as the bytes of a safetensors file, in memory (the
    /// layout `write` gives a file).
    public static func encode(tensors: [(name: String, shape: [Int], data: UnsafeBufferPointer<Float>)],
                              metadata: [String: String] = [:]) throws -> [UInt8] {
        let (prefix, items) = try layout(tensors.map { tensor in
            Item(name: tensor.name, dtype: .f32, shape: tensor.shape, byteCount: tensor.data.count * MemoryLayout<Float>.stride,
                 withBytes: { body in try body(UnsafeRawBufferPointer(tensor.data)) })
        }, metadata: metadata, file: "safetensors in memory")
        var bytes = prefix
        bytes.reserveCapacity(prefix.count + items.reduce(0) { $0 + $1.byteCount })
        for item in items { try item.withBytes { bytes += $0 } }
        return bytes
    }

    private static func write(path: String, items unordered: [Item], metadata: [String: String]) throws {
        let (prefix, items) = try layout(unordered, metadata: metadata, file: path)
        do {
            try AtomicFile.write(to: path) { file in
                try file.write(prefix)
                for item in items {
                    try item.withBytes { try file.write($0) }
                }
            }
        } catch let error as SystemError {
            throw SafetensorsError.io(file: path, operation: error.operation ?? error.function, reason: error.message)
        }
    }

    /// Checks `unordered` (`file` names them in errors), orders them as the layout wants and returns the
    /// file's first bytes (header length and header) with the items in the order their data follows.
    private static func layout(_ unordered: [Item], metadata: [String: String], file path: String) throws -> (prefix: [UInt8], items: [Item]) {
        var seen = Set<String>()
        for item in unordered {
            func invalid(_ reason: String) -> SafetensorsError {
                .invalidTensor(file: path, tensor: item.name, reason: reason)
            }
            guard item.name != "__metadata__" else { throw invalid("the name is reserved for metadata") }
            guard seen.insert(item.name).inserted else { throw invalid("the name is used twice") }
            guard let needed = byteCount(shape: item.shape, dtype: item.dtype) else {
                throw invalid("shape \(item.shape) is invalid")
            }
            guard needed == item.byteCount else {
                throw invalid("\(item.byteCount) bytes of data, but \(item.dtype.rawValue) \(item.shape) needs \(needed)")
            }
        }
        let items = unordered.sorted { a, b in
            a.dtype.byteCount != b.dtype.byteCount
                ? a.dtype.byteCount > b.dtype.byteCount
                : a.name.utf8.lexicographicallyPrecedes(b.name.utf8)
        }

        var json = "{"
        if !metadata.isEmpty {
            json += jsonString("__metadata__") + ":{"
            json += metadata.sorted { $0.key.utf8.lexicographicallyPrecedes($1.key.utf8) }
                .map { jsonString($0.key) + ":" + jsonString($0.value) }
                .joined(separator: ",")
            json += "}"
        }
        var offset = 0
        for item in items {
            if json.utf8.count > 1 { json += "," }
            json += jsonString(item.name)
            json += ":{\"dtype\":\"\(item.dtype.rawValue)\",\"shape\":["
            json += item.shape.map(String.init).joined(separator: ",")
            json += "],\"data_offsets\":[\(offset),\(offset + item.byteCount)]}"
            offset += item.byteCount
        }
        json += "}"
        var header = Array(json.utf8)
        header += repeatElement(UInt8(ascii: " "), count: (8 - header.count % 8) % 8)
        var prefix = withUnsafeBytes(of: UInt64(header.count).littleEndian) { Array($0) }
        prefix += header
        return (prefix, items)
    }

    /// `text` as a JSON string literal.
    private static func jsonString(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }

    // MARK: Checking

    /// Checks a file's tensors against a model's `expected` names and shapes, and throws ONE
    /// `SafetensorsError.mismatchedTensors` listing every problem: missing tensors, mis-shaped tensors
    /// and tensors of the wrong dtype (in `expected` order), then unexpected extra tensors (by name).
    /// Tensors must be F32, except that those for which `allowInt64` is true may also be I64
    /// (e.g. `{ $0.hasSuffix(".num_batches_tracked") }`). `file` is used in the message.
    public static func validate(
        _ tensors: [String: SafetensorsTensor],
        expected: [(name: String, shape: [Int])],
        file: String,
        allowInt64: (String) -> Bool = { _ in false }
    ) throws {
        var problems = [SafetensorsError.Problem]()
        var expectedNames = Set<String>()
        for (name, shape) in expected where expectedNames.insert(name).inserted {
            guard let tensor = tensors[name] else {
                problems.append(.missing(tensor: name, shape: shape))
                continue
            }
            if tensor.shape != shape {
                problems.append(.wrongShape(tensor: name, expected: shape, found: tensor.shape))
            }
            let allowed: [SafetensorsDType] = allowInt64(name) ? [.f32, .i64] : [.f32]
            if !allowed.contains(tensor.dtype) {
                problems.append(.wrongDType(tensor: name, found: tensor.dtype, allowed: allowed))
            }
        }
        for name in tensors.keys.filter({ !expectedNames.contains($0) }).sorted() {
            let tensor = tensors[name]!
            problems.append(.unexpected(tensor: name, dtype: tensor.dtype, shape: tensor.shape))
        }
        if !problems.isEmpty {
            throw SafetensorsError.mismatchedTensors(file: file, problems: problems)
        }
    }

    // MARK: System calls

    private static func osError(_ path: String, _ operation: String) -> SafetensorsError {
        .io(file: path, operation: operation, reason: String(cString: strerror(errno)))
    }

    /// Reads exactly `count` bytes at `offset`; running out of file is an error.
    private static func readExactly(_ fd: Int32, count: Int, offset: Int, path: String) throws -> [UInt8] {
        try [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            var done = 0
            while done < count {
                let n = pread(fd, buffer.baseAddress! + done, count - done, off_t(offset + done))
                if n < 0 {
                    if errno == EINTR { continue }
                    throw osError(path, "read")
                }
                if n == 0 {
                    throw SafetensorsError.io(file: path, operation: "read", reason: "unexpected end of file")
                }
                done += n
            }
            initialized = count
        }
    }
}
