/// Canonical Huffman coding of small alphabets (codebook indices, relative-index gaps), as Deep
/// Compression's third stage (Han et al., 2016) uses it. A code is described by one length per symbol
/// (0: the symbol does not occur), which is all a file needs to store; codes are assigned canonically
/// (shorter codes first, then by symbol), and bits are written most significant first.
public struct HuffmanCode: Equatable, Sendable {
    /// The longest code length built or accepted: 20 bits keeps the decode tables small.
    public static let maxLength = 20

    /// `lengths[s]` is symbol s's code length in bits (0 when s does not occur).
    public let lengths: [UInt8]
    /// `codes[s]` is symbol s's code, in the low `lengths[s]` bits.
    let codes: [UInt32]
    // Canonical decode tables, per length L: the first code of that length, how many codes have it,
    // and where its symbols start in `sortedSymbols`.
    private let firstCode: [UInt32], countOfLength: [Int], offsetOfLength: [Int], sortedSymbols: [Int]

    /// The optimal code for these symbol frequencies, limited to `maxLength` bits (frequencies are
    /// halved until the code fits, which is near-optimal for alphabets this small). A stream with one
    /// distinct symbol gets a 1-bit code for it; an empty stream an empty code.
    public init(frequencies: [Int]) {
        var freq = frequencies.map { max(0, $0) }
        while true {
            let lengths = Self.huffmanLengths(freq)
            if (lengths.max() ?? 0) <= UInt8(Self.maxLength) {
                try! self.init(lengths: lengths)  // a Huffman code is always complete
                return
            }
            freq = freq.map { $0 == 0 ? 0 : max(1, $0 / 2) }
        }
    }

    /// The code with these lengths. Throws when a length exceeds `maxLength` or the lengths cannot
    /// be a prefix code (they over-subscribe the code space: Σ 2^−L > 1).
    public init(lengths: [UInt8]) throws {
        guard lengths.allSatisfy({ Int($0) <= Self.maxLength }) else {
            throw HuffmanError("a code length exceeds \(Self.maxLength) bits")
        }
        var kraft: UInt64 = 0  // Σ 2^(max − L)
        for l in lengths where l > 0 { kraft += 1 << UInt64(Self.maxLength - Int(l)) }
        guard kraft <= 1 << UInt64(Self.maxLength) else { throw HuffmanError("the code lengths over-subscribe the code space (not a prefix code)") }

        var count = [Int](repeating: 0, count: Self.maxLength + 1)
        for l in lengths where l > 0 { count[Int(l)] += 1 }
        var first = [UInt32](repeating: 0, count: Self.maxLength + 2), offset = [Int](repeating: 0, count: Self.maxLength + 2)
        var code: UInt32 = 0, position = 0
        for l in 1...Self.maxLength {  // DEFLATE's canonical assignment (RFC 1951, 3.2.2)
            code = (code + UInt32(count[l - 1])) << 1
            first[l] = code
            offset[l] = position
            position += count[l]
        }
        let sorted = lengths.indices.filter { lengths[$0] > 0 }.sorted { (lengths[$0], $0) < (lengths[$1], $1) }
        var codes = [UInt32](repeating: 0, count: lengths.count)
        var next = first
        for s in sorted { codes[s] = next[Int(lengths[s])]; next[Int(lengths[s])] += 1 }
        self.lengths = lengths
        self.codes = codes
        firstCode = first; countOfLength = count; offsetOfLength = offset; sortedSymbols = sorted
    }

    /// Code lengths of a Huffman tree over the symbols with a positive frequency.
    private static func huffmanLengths(_ freq: [Int]) -> [UInt8] {
        var lengths = [UInt8](repeating: 0, count: freq.count)
        let used = freq.indices.filter { freq[$0] > 0 }
        if used.count == 1 { lengths[used[0]] = 1 }
        guard used.count > 1 else { return lengths }
        // Nodes: leaves first, then internal ones; parent links give each leaf's depth.
        var weight = used.map { freq[$0] }, parent = [Int](repeating: -1, count: used.count)
        var active = Array(used.indices)
        while active.count > 1 {
            active.sort { (weight[$0], $0) > (weight[$1], $1) }  // the two lightest at the end
            let a = active.removeLast(), b = active.removeLast()
            weight.append(weight[a] + weight[b]); parent.append(-1)
            parent[a] = weight.count - 1; parent[b] = weight.count - 1
            active.append(weight.count - 1)
        }
        for (leaf, symbol) in used.enumerated() {
            var depth = 0, node = leaf
            while parent[node] >= 0 { node = parent[node]; depth += 1 }
            lengths[symbol] = UInt8(min(depth, 255))
        }
        return lengths
    }

    /// Bits that `symbols` take in this code.
    public func bitCount<S: Sequence>(of symbols: S) -> Int where S.Element: BinaryInteger {
        symbols.reduce(0) { $0 + Int(lengths[Int($1)]) }
    }

    /// Encodes `symbols`, each of which must have a code; the last byte is padded with zero bits.
    public func encode<S: Sequence>(_ symbols: S) -> [UInt8] where S.Element: BinaryInteger {
        var writer = BitWriter()
        for s in symbols {
            let length = Int(lengths[Int(s)])
            precondition(length > 0, "symbol \(s) has no code")
            writer.write(codes[Int(s)], bits: length)
        }
        return writer.bytes
    }

    /// Decodes exactly `count` symbols from `bytes`. Throws when the stream ends early, holds a bit
    /// pattern that is no code, has trailing bytes, or pads its last byte with anything but zeros.
    public func decode(_ bytes: [UInt8], count: Int) throws -> [Int] {
        var reader = BitReader(bytes)
        var out = [Int]()
        out.reserveCapacity(count)
        for i in 0..<count {
            var code: UInt32 = 0
            var length = 0
            while true {
                guard let bit = reader.next() else { throw HuffmanError("the stream ends inside symbol \(i) of \(count)") }
                code = code << 1 | bit
                length += 1
                guard length <= Self.maxLength else { throw HuffmanError("symbol \(i) is no code of the table") }
                let index = Int(code) - Int(firstCode[length])
                if index >= 0 && index < countOfLength[length] {
                    out.append(sortedSymbols[offsetOfLength[length] + index])
                    break
                }
            }
        }
        guard reader.remainingBitsAreZeroPadding else {
            throw HuffmanError("\(bytes.count - reader.bitPosition / 8) byte(s) follow the \(count) symbols, or the padding bits are not zero")
        }
        return out
    }
}

public struct HuffmanError: Error, CustomStringConvertible, Equatable {
    public var description: String
    init(_ description: String) { self.description = description }
}

/// Appends bit fields, most significant bit first; `bytes` pads the last byte with zero bits.
struct BitWriter {
    private var full = [UInt8]()
    private var accumulator: UInt64 = 0, pending = 0

    mutating func write(_ value: UInt32, bits: Int) {
        accumulator = accumulator << UInt64(bits) | UInt64(value) & ((1 << UInt64(bits)) - 1)
        pending += bits
        while pending >= 8 {
            pending -= 8
            full.append(UInt8(truncatingIfNeeded: accumulator >> UInt64(pending)))
        }
        accumulator &= (1 << UInt64(pending)) - 1
    }

    var bytes: [UInt8] { pending == 0 ? full : full + [UInt8(truncatingIfNeeded: accumulator << UInt64(8 - pending))] }
}

/// Reads bits most significant first.
struct BitReader {
    let bytes: [UInt8]
    private(set) var bitPosition = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }

    mutating func next() -> UInt32? {
        guard bitPosition < bytes.count * 8 else { return nil }
        let bit = UInt32(bytes[bitPosition >> 3] >> UInt8(7 - bitPosition & 7)) & 1
        bitPosition += 1
        return bit
    }

    /// True when what is left is only the zero bits padding the current byte.
    var remainingBitsAreZeroPadding: Bool {
        let end = (bitPosition + 7) / 8
        guard end == bytes.count else { return false }
        guard bitPosition & 7 != 0 else { return true }
        return bytes[end - 1] & UInt8((1 << (8 - bitPosition & 7)) - 1) == 0
    }
}
