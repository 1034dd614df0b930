import Foundation
import SqueezeEngine

/// A model compressed as Deep Compression stores it (Han et al., 2016): per layer a codebook of shared
/// values, one code per kept weight and the gap to the previous kept weight, both Huffman-coded; biases
/// and BatchNorm tensors stored plainly. The byte layout is in docs/compressed-format.md.
public struct CompressedModel: Equatable, Sendable {
    public static let magic: [UInt8] = Array("SQZC".utf8)
    public static let version: UInt16 = 1

    public var config: ModelConfig
    public var tensors: [CompressedTensor]

    public init(config: ModelConfig, tensors: [CompressedTensor]) {
        self.config = config
        self.tensors = tensors
    }
}

/// One tensor of a compressed model, under its torchvision name.
public struct CompressedTensor: Equatable, Sendable {
    public enum Storage: Equatable, Sendable {
        /// Stored as float32 values (biases, BatchNorm parameters and statistics).
        case plain([Float])
        /// Weight sharing with sparse positions.
        case shared(SharedWeights)
    }

    public var name: String
    public var shape: [Int]
    public var storage: Storage

    public init(name: String, shape: [Int], storage: Storage) {
        self.name = name; self.shape = shape; self.storage = storage
    }

    public var count: Int { shape.reduce(1, *) }

    /// The tensor's values, dense (pruned positions are zero).
    public func dense() -> [Float] {
        switch storage {
        case .plain(let values): return values
        case .shared(let shared): return shared.dense(count: count)
        }
    }
}

/// A pruned, quantized weight tensor: `codebook[0]` is 0 (pruned positions and filler entries), the
/// other entries the shared values. Entry e sits `gaps[e] + 1` positions after entry e − 1 (the first
/// at `gaps[0]`); a gap longer than an index field holds is bridged by filler entries (code 0) at
/// the longest gap, as in the paper's relative indexing.
public struct SharedWeights: Equatable, Sendable {
    /// Bits of a code before Huffman coding: the codebook has at most 2^bits entries.
    public var bits: Int
    public var codebook: [Float]
    /// Bits of a relative-index field: gaps run 0 ..< 2^indexBits.
    public var indexBits: Int
    /// Per entry: the codebook index.
    public var codes: [UInt8]
    /// Per entry: the number of positions skipped since the previous entry.
    public var gaps: [UInt8]

    /// Encodes `assignment` (per position: 0 for a pruned weight, else an index into `codebook`).
    public init(assignment: [Int], codebook: [Float], bits: Int, indexBits: Int = 4) {
        precondition((1...8).contains(bits) && codebook.count <= 1 << bits && codebook.first == 0)
        precondition((1...8).contains(indexBits))
        self.bits = bits; self.codebook = codebook; self.indexBits = indexBits
        let maxGap = (1 << indexBits) - 1
        var codes = [UInt8](), gaps = [UInt8]()
        var last = -1
        for (position, code) in assignment.enumerated() where code != 0 {
            var gap = position - last - 1
            while gap > maxGap {  // filler: a zero entry maxGap positions on
                codes.append(0); gaps.append(UInt8(maxGap))
                gap -= maxGap + 1
            }
            codes.append(UInt8(code)); gaps.append(UInt8(gap))
            last = position
        }
        self.codes = codes; self.gaps = gaps
    }

    init(bits: Int, codebook: [Float], indexBits: Int, codes: [UInt8], gaps: [UInt8]) {
        self.bits = bits; self.codebook = codebook; self.indexBits = indexBits; self.codes = codes; self.gaps = gaps
    }

    /// Entries that hold a weight (not fillers).
    public var keptCount: Int { codes.reduce(0) { $0 + ($1 == 0 ? 0 : 1) } }

    /// The dense tensor of `count` values.
    public func dense(count: Int) -> [Float] {
        var out = [Float](repeating: 0, count: count)
        var position = -1
        for (code, gap) in zip(codes, gaps) {
            position += Int(gap) + 1
            out[position] = codebook[Int(code)]
        }
        return out
    }

    /// Checks that the entries fit a tensor of `count` values and use only codebook entries; the
    /// reason otherwise.
    func problem(count: Int) -> String? {
        guard codes.count == gaps.count else { return "\(codes.count) codes but \(gaps.count) relative indices" }
        guard codebook.first == 0, codebook.count <= 1 << bits else { return "the codebook must start with 0 and hold at most 2^\(bits) values" }
        guard codebook.allSatisfy(\.isFinite) else { return "the codebook holds a value that is not finite" }
        var position = -1
        for (code, gap) in zip(codes, gaps) {
            guard Int(code) < codebook.count else { return "code \(code) is beyond the codebook's \(codebook.count) entries" }
            guard Int(gap) < 1 << indexBits else { return "a relative index of \(gap) does not fit \(indexBits) bits" }
            position += Int(gap) + 1
            guard position < count else { return "the relative indices run past the tensor's \(count) values" }
        }
        return nil
    }
}

/// Everything that can be wrong with a compressed model file; each message names the file.
public struct CompressedFormatError: Error, CustomStringConvertible, Equatable {
    public var file: String
    public var reason: String
    public var description: String { "\(file): \(reason)" }
}

// MARK: - Bytes

extension CompressedModel {
    /// What each part of a tensor takes in the file, for `inspect` and the paper's Table 2.
    public struct TensorBytes: Equatable, Sendable {
        public var name: String
        public var parameters: Int
        /// Kept weights over parameters (1 for plain tensors).
        public var density: Double
        /// Code bits before Huffman coding (32 for plain tensors).
        public var bits: Int
        public var codeBytes: Int, indexBytes: Int, codebookBytes: Int, plainBytes: Int
        public var total: Int { codeBytes + indexBytes + codebookBytes + plainBytes }
    }

    /// The file's bytes: header, tensors, then a CRC-32 of everything before it.
    public func encoded() throws -> [UInt8] {
        var out = ByteWriter()
        out.bytes(Self.magic)
        out.u16(Self.version)
        out.u16(0)
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        let json = Array(try encoder.encode(config))
        out.u32(json.count); out.bytes(json)
        out.u32(tensors.count)
        for t in tensors {
            let name = Array(t.name.utf8)
            out.u16(name.count); out.bytes(name)
            out.u8(t.shape.count); for d in t.shape { out.u32(d) }
            switch t.storage {
            case .plain(let values):
                precondition(values.count == t.count)
                out.u8(0)
                for v in values { out.u32(Int(v.bitPattern)) }
            case .shared(let s):
                out.u8(1)
                out.u8(s.bits); out.u16(s.codebook.count)
                for v in s.codebook { out.u32(Int(v.bitPattern)) }
                out.u8(s.indexBits)
                out.u32(s.codes.count)
                let codeTable = HuffmanCode(frequencies: histogram(s.codes, size: s.codebook.count))
                let indexTable = HuffmanCode(frequencies: histogram(s.gaps, size: 1 << s.indexBits))
                out.bytes(codeTable.lengths); out.bytes(indexTable.lengths)
                let codeStream = codeTable.encode(s.codes), indexStream = indexTable.encode(s.gaps)
                out.u32(codeStream.count); out.bytes(codeStream)
                out.u32(indexStream.count); out.bytes(indexStream)
            }
        }
        out.u32(Int(crc32(out.data)))
        return out.data
    }

    /// Per-tensor byte counts of the encoded file (header, names and shapes not included; `fileBytes`
    /// is the whole).
    public func byteCounts() -> [TensorBytes] {
        tensors.map { t in
            switch t.storage {
            case .plain(let values):
                return TensorBytes(name: t.name, parameters: t.count, density: 1, bits: 32, codeBytes: 0, indexBytes: 0,
                                   codebookBytes: 0, plainBytes: 4 * values.count)
            case .shared(let s):
                let codeTable = HuffmanCode(frequencies: histogram(s.codes, size: s.codebook.count))
                let indexTable = HuffmanCode(frequencies: histogram(s.gaps, size: 1 << s.indexBits))
                return TensorBytes(name: t.name, parameters: t.count, density: Double(s.keptCount) / Double(max(t.count, 1)), bits: s.bits,
                                   codeBytes: (codeTable.bitCount(of: s.codes) + 7) / 8, indexBytes: (indexTable.bitCount(of: s.gaps) + 7) / 8,
                                   codebookBytes: 4 * s.codebook.count + s.codebook.count + (1 << s.indexBits), plainBytes: 0)
            }
        }
    }

    /// Reads a compressed model, checking everything: magic, version, the checksum, every length
    /// against the bytes that remain, the Huffman tables and streams, the entries against the shapes,
    /// and that the tensors are the ones the configuration's model has. Errors name `file`.
    public static func decode(_ data: [UInt8], file: String) throws -> CompressedModel {
        func fail(_ reason: String) -> CompressedFormatError { CompressedFormatError(file: file, reason: reason) }
        guard data.count >= 12 else { throw fail("truncated: \(data.count) bytes is too short for a compressed model") }
        guard Array(data.prefix(4)) == magic else { throw fail("not a squeezetrain compressed model (wrong magic)") }
        var reader = ByteReader(data: data, end: data.count - 4, file: file)
        _ = try reader.bytes(4)
        let version = try reader.u16()
        guard version == Self.version else { throw fail("compressed-model format version \(version) is not supported (this build reads \(Self.version))") }
        let stored = data.suffix(4).withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(as: UInt32.self)) }
        guard stored == crc32(data.dropLast(4)) else { throw fail("checksum mismatch: the file is corrupt, truncated or was modified") }
        guard try reader.u16() == 0 else { throw fail("unknown flags") }
        let json = try reader.bytes(try reader.u32())
        let config: ModelConfig
        do { config = try JSONDecoder().decode(ModelConfig.self, from: Data(json)) } catch {
            throw fail("the model configuration does not decode (\(error))")
        }
        if let reason = config.invalidReason { throw fail("the model configuration describes no valid model: \(reason)") }
        let expected = Network.stateShapes(config)
        let count = try reader.u32()
        guard count == expected.count else { throw fail("\(count) tensors, but the model has \(expected.count)") }
        var tensors = [CompressedTensor]()
        for _ in 0..<count {
            guard let name = String(validating: try reader.bytes(try reader.u16()), as: UTF8.self) else { throw fail("a tensor name is not UTF-8") }
            guard let shape = expected[name] else { throw fail("tensor '\(name)' is not part of the model") }
            guard !tensors.contains(where: { $0.name == name }) else { throw fail("tensor '\(name)' appears twice") }
            let rank = try reader.u8()
            let dims = try (0..<rank).map { _ in try reader.u32() }
            guard dims == shape else { throw fail("tensor '\(name)' has shape \(dims), the model needs \(shape)") }
            let n = shape.reduce(1, *)
            switch try reader.u8() {
            case 0:
                let values = try (0..<n).map { _ in Float(bitPattern: UInt32(try reader.u32())) }
                guard values.allSatisfy(\.isFinite) else { throw fail("tensor '\(name)' holds a value that is not finite") }
                tensors.append(CompressedTensor(name: name, shape: shape, storage: .plain(values)))
            case 1:
                let bits = try reader.u8()
                guard (1...8).contains(bits) else { throw fail("tensor '\(name)': \(bits)-bit codes are not supported (1 to 8)") }
                let k = try reader.u16()
                guard (1...(1 << bits)).contains(k) else { throw fail("tensor '\(name)': a codebook of \(k) values for \(bits)-bit codes") }
                let codebook = try (0..<k).map { _ in Float(bitPattern: UInt32(try reader.u32())) }
                let indexBits = try reader.u8()
                guard (1...8).contains(indexBits) else { throw fail("tensor '\(name)': \(indexBits)-bit relative indices are not supported (1 to 8)") }
                let entries = try reader.u32()
                // Each entry advances at least one position: more entries than values cannot fit.
                guard entries <= n else { throw fail("tensor '\(name)': \(entries) entries for \(n) values") }
                let codeTable: HuffmanCode, indexTable: HuffmanCode
                do {
                    codeTable = try HuffmanCode(lengths: try reader.bytes(k))
                    indexTable = try HuffmanCode(lengths: try reader.bytes(1 << indexBits))
                } catch let e as HuffmanError { throw fail("tensor '\(name)': corrupt Huffman table: \(e)") }
                let codes: [Int], gaps: [Int]
                do {
                    codes = try codeTable.decode(try reader.bytes(try reader.u32()), count: entries)
                    gaps = try indexTable.decode(try reader.bytes(try reader.u32()), count: entries)
                } catch let e as HuffmanError { throw fail("tensor '\(name)': corrupt Huffman stream: \(e)") }
                let shared = SharedWeights(bits: bits, codebook: codebook, indexBits: indexBits,
                                           codes: codes.map(UInt8.init), gaps: gaps.map(UInt8.init))
                if let problem = shared.problem(count: n) { throw fail("tensor '\(name)': \(problem)") }
                tensors.append(CompressedTensor(name: name, shape: shape, storage: .shared(shared)))
            case let kind:
                throw fail("tensor '\(name)': unknown storage kind \(kind)")
            }
        }
        guard reader.atEnd else { throw fail("\(reader.remaining) unexpected bytes after the last tensor") }
        return CompressedModel(config: config, tensors: tensors)
    }

    /// Reads and decodes the file at `path`.
    public static func load(path: String) throws -> CompressedModel {
        try decode(try readWholeFile(path), file: path)
    }

    /// Writes the file atomically.
    public func save(path: String) throws {
        try Data(try encoded()).write(to: URL(fileURLWithPath: path), options: .atomic)
    }

    /// Puts the decoded weights into `network` (whose configuration must be this model's).
    public func load(into network: Network) throws {
        var values = [String: [Float]]()
        for t in tensors { values[t.name] = t.dense() }
        try network.loadState(values)
    }
}

/// The bytes of the file at `path`; an error naming it when it cannot be read.
public func readWholeFile(_ path: String) throws -> [UInt8] {
    do { return Array(try Data(contentsOf: URL(fileURLWithPath: path))) } catch {
        throw CompressedFormatError(file: path, reason: "cannot read: \((error as NSError).localizedDescription)")
    }
}

private func histogram(_ symbols: [UInt8], size: Int) -> [Int] {
    var h = [Int](repeating: 0, count: size)
    for s in symbols { h[Int(s)] += 1 }
    return h
}

/// CRC-32 (IEEE 802.3, as zlib's crc32).
func crc32<C: Collection>(_ bytes: C) -> UInt32 where C.Element == UInt8 {
    var crc: UInt32 = 0xFFFF_FFFF
    for b in bytes {
        crc = crc32Table[Int((crc ^ UInt32(b)) & 0xFF)] ^ (crc >> 8)
    }
    return crc ^ 0xFFFF_FFFF
}

private let crc32Table: [UInt32] = (0..<256).map { n in
    var c = UInt32(n)
    for _ in 0..<8 { c = c & 1 != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
    return c
}

/// Little-endian fields.
private struct ByteWriter {
    var data = [UInt8]()
    mutating func u8(_ v: Int) { data.append(UInt8(v)) }
    mutating func u16(_ v: Int) { precondition(v <= 0xFFFF); data += [UInt8(v & 0xFF), UInt8(v >> 8)] }
    mutating func u16(_ v: UInt16) { u16(Int(v)) }
    mutating func u32(_ v: Int) { let x = UInt32(truncatingIfNeeded: v); for i in 0..<4 { data.append(UInt8(truncatingIfNeeded: x >> (8 * i))) } }
    mutating func bytes<C: Collection>(_ b: C) where C.Element == UInt8 { data += b }
}

/// Little-endian fields, never past `end`.
private struct ByteReader {
    let data: [UInt8]
    let end: Int
    /// For the errors.
    let file: String
    var position = 0
    var atEnd: Bool { position == end }
    var remaining: Int { end - position }

    mutating func bytes(_ n: Int) throws -> [UInt8] {
        guard n >= 0, n <= end - position else { throw CompressedFormatError(file: file, reason: "truncated: \(n) bytes needed at offset \(position), \(end - position) left") }
        defer { position += n }
        return Array(data[position..<position + n])
    }
    mutating func u8() throws -> Int { Int(try bytes(1)[0]) }
    mutating func u16() throws -> Int { let b = try bytes(2); return Int(b[0]) | Int(b[1]) << 8 }
    mutating func u32() throws -> Int { let b = try bytes(4); return (0..<4).reduce(0) { $0 | Int(b[$1]) << (8 * $1) } }
}
