// The header every collective message carries (the `control` part of a transport message).
//
// Layout, 32 bytes, all integers little-endian:
//
//   offset size field
//        0    2 magic      0x5153 ("SQ" as bytes 53 51)
//        2    1 version    2 (version 1 had no encoding byte; its peers are rejected by
//                          version rather than misread)
//        3    1 kind       1 ring reduce-scatter, 2 ring all-gather,
//                          3 star contribution (worker→hub), 4 star result (hub→worker),
//                          5 tree reduce (child→parent: a partial sum),
//                          6 tree broadcast (parent→child: the average)
//        4    2 sender     sender's rank
//        6    2 phaseStep  ring step within the phase (0..<N-1); 0 for star and tree
//        8    4 step       collective tag: training step (or any sequence number)
//       12    4 bucket     collective tag: bucket id within the step
//       16    8 offset     dense: index of the payload's first element in the caller's buffer;
//                          sparse: index of the first element of the range being reduced
//                          (pair indices are relative to it)
//       24    4 count      dense: number of elements the payload covers;
//                          sparse: number of (index, value) pairs in this message
//       28    1 encoding   payload encoding, and so its exact size:
//                          0 float32   4×count bytes: little-endian IEEE-754 Floats
//                          1 float16   2×count bytes: IEEE half precision
//                          2 bfloat16  2×count bytes: the high 16 bits of the Float
//                                      (rounded to nearest even)
//                          3 int8      4+count bytes: a Float32 scale s, then count Int8 q;
//                                      element i is q[i] × s
//                          4 sparse    8×count bytes: count pairs (UInt32 index relative to
//                                      offset, Float32 value), indices strictly increasing
//                                      along the whole vector
//       29    1 flags      bit 0 (sparse only): last message of the sender's sparse vector
//                          (a vector is one or more messages; an empty one is a single
//                          message with count 0 and this flag)
//       30    2 reserved   0
//
// The payload travels as a separate part, so that uncompressed Floats can be sent from
// and reduced into user memory without being copied next to a header.

import SqueezeTransport

/// Identifies one collective operation, so that messages of different steps or buckets
/// can never be mistaken for each other: the receiver checks it on every message.
public struct CollectiveTag: Hashable, Sendable, CustomStringConvertible {
    public var step: UInt32
    public var bucket: UInt32

    public init(step: UInt32, bucket: UInt32 = 0) {
        self.step = step
        self.bucket = bucket
    }

    public var description: String { "step \(step) bucket \(bucket)" }
}

public struct WireHeader: Equatable, Sendable {
    public static let size = 32
    public static let magic: UInt16 = 0x5153
    public static let currentVersion: UInt8 = 2

    public enum Kind: UInt8, Sendable {
        case reduceScatter = 1
        case allGather = 2
        case starContribution = 3
        case starResult = 4
        case treeReduce = 5
        case treeBroadcast = 6
    }

    /// How the payload represents its values (see the layout above).
    public enum Encoding: UInt8, Sendable, CustomStringConvertible {
        case float32 = 0
        case float16 = 1
        case bfloat16 = 2
        case int8 = 3
        case sparse = 4

        /// The exact payload size of a message with this header `count`.
        public func payloadBytes(count: Int) -> Int {
            switch self {
            case .float32: 4 * count
            case .float16, .bfloat16: 2 * count
            case .int8: MemoryLayout<Float>.size + count
            case .sparse: 8 * count
            }
        }

        public var description: String {
            switch self {
            case .float32: "float32"
            case .float16: "float16"
            case .bfloat16: "bfloat16"
            case .int8: "int8"
            case .sparse: "sparse"
            }
        }
    }

    public var version: UInt8 = WireHeader.currentVersion
    public var kind: Kind
    public var sender: UInt16
    public var phaseStep: UInt16
    public var tag: CollectiveTag
    public var offset: UInt64
    public var count: UInt32
    public var encoding: Encoding
    /// Sparse messages: this message ends the sender's vector (flags bit 0).
    public var isLast: Bool

    public init(kind: Kind, sender: Int, phaseStep: Int = 0, tag: CollectiveTag, offset: Int, count: Int,
                encoding: Encoding = .float32, isLast: Bool = false) {
        self.kind = kind
        self.sender = UInt16(truncatingIfNeeded: sender)
        self.phaseStep = UInt16(truncatingIfNeeded: phaseStep)
        self.tag = tag
        self.offset = UInt64(offset)
        self.count = UInt32(truncatingIfNeeded: count)
        self.encoding = encoding
        self.isLast = isLast
    }

    /// Writes the 32 header bytes to the start of `bytes` (which must hold at least `size`).
    public func encode(into bytes: UnsafeMutableRawBufferPointer) {
        precondition(bytes.count >= WireHeader.size)
        let p = bytes.baseAddress!
        p.storeBytes(of: WireHeader.magic.littleEndian, toByteOffset: 0, as: UInt16.self)
        p.storeBytes(of: version, toByteOffset: 2, as: UInt8.self)
        p.storeBytes(of: kind.rawValue, toByteOffset: 3, as: UInt8.self)
        p.storeBytes(of: sender.littleEndian, toByteOffset: 4, as: UInt16.self)
        p.storeBytes(of: phaseStep.littleEndian, toByteOffset: 6, as: UInt16.self)
        p.storeBytes(of: tag.step.littleEndian, toByteOffset: 8, as: UInt32.self)
        p.storeBytes(of: tag.bucket.littleEndian, toByteOffset: 12, as: UInt32.self)
        p.storeBytes(of: offset.littleEndian, toByteOffset: 16, as: UInt64.self)
        p.storeBytes(of: count.littleEndian, toByteOffset: 24, as: UInt32.self)
        p.storeBytes(of: encoding.rawValue, toByteOffset: 28, as: UInt8.self)
        p.storeBytes(of: isLast ? 1 : 0, toByteOffset: 29, as: UInt8.self)
        p.storeBytes(of: UInt16(0), toByteOffset: 30, as: UInt16.self)
    }

    public var encoded: [UInt8] {
        var b = [UInt8](repeating: 0, count: WireHeader.size)
        b.withUnsafeMutableBytes { encode(into: $0) }
        return b
    }

    /// Parses a header received from `peer`; throws `CommError.malformedMessage` naming
    /// the peer if it is truncated or has a wrong magic, version, kind, encoding or flags.
    public static func decode(_ bytes: UnsafeRawBufferPointer, from peer: Int) throws -> WireHeader {
        guard bytes.count == size else {
            throw CommError.malformedMessage(
                peer: peer, reason: bytes.count < size
                    ? "truncated header (\(bytes.count) of \(size) bytes)"
                    : "header of \(bytes.count) bytes, expected \(size)")
        }
        let p = bytes.baseAddress!
        let magic = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 0, as: UInt16.self))
        guard magic == WireHeader.magic else {
            throw CommError.malformedMessage(peer: peer, reason: "bad magic 0x\(String(magic, radix: 16))")
        }
        let version = p.load(fromByteOffset: 2, as: UInt8.self)
        guard version == currentVersion else {
            throw CommError.malformedMessage(
                peer: peer, reason: "unsupported protocol version \(version) (this build speaks \(currentVersion))")
        }
        let rawKind = p.load(fromByteOffset: 3, as: UInt8.self)
        guard let kind = Kind(rawValue: rawKind) else {
            throw CommError.malformedMessage(peer: peer, reason: "unknown message kind \(rawKind)")
        }
        let rawEncoding = p.load(fromByteOffset: 28, as: UInt8.self)
        guard let encoding = Encoding(rawValue: rawEncoding) else {
            throw CommError.malformedMessage(peer: peer, reason: "unknown payload encoding \(rawEncoding)")
        }
        let flags = p.load(fromByteOffset: 29, as: UInt8.self)
        let reserved = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 30, as: UInt16.self))
        guard flags & ~1 == 0, reserved == 0 else {
            throw CommError.malformedMessage(
                peer: peer, reason: "unknown flags 0x\(String(flags, radix: 16)) or reserved bytes 0x\(String(reserved, radix: 16))")
        }
        var h = WireHeader(kind: kind, sender: 0, tag: CollectiveTag(step: 0), offset: 0, count: 0,
                           encoding: encoding, isLast: flags & 1 != 0)
        h.version = version
        h.sender = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt16.self))
        h.phaseStep = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 6, as: UInt16.self))
        h.tag = CollectiveTag(
            step: UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt32.self)),
            bucket: UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 12, as: UInt32.self)))
        h.offset = UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
        h.count = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 24, as: UInt32.self))
        return h
    }

    /// Checks a received message against what the receiver expects next, field by field,
    /// including that the payload has exactly the size its encoding and `count` imply.
    /// For a sparse message, `count` and the last-message flag are the sender's to choose;
    /// `validateSparse` also checks the pairs.
    public static func validate(control: UnsafeRawBufferPointer, payload: UnsafeRawBufferPointer,
                                from peer: Int, expected: WireHeader) throws {
        _ = try checked(control: control, payload: payload, from: peer, expected: expected)
    }

    private static func checked(control: UnsafeRawBufferPointer, payload: UnsafeRawBufferPointer,
                                from peer: Int, expected: WireHeader) throws -> WireHeader {
        let h = try decode(control, from: peer)
        func fail(_ reason: String) -> CommError { .malformedMessage(peer: peer, reason: reason) }
        guard h.kind == expected.kind else { throw fail("kind \(h.kind), expected \(expected.kind)") }
        guard h.sender == expected.sender else { throw fail("header names sender \(h.sender)") }
        guard h.tag == expected.tag else { throw fail("tag \(h.tag), expected \(expected.tag)") }
        guard h.phaseStep == expected.phaseStep else {
            throw fail("\(h.kind) step \(h.phaseStep), expected \(expected.phaseStep)")
        }
        guard h.encoding == expected.encoding else {
            throw fail("payload encoding \(h.encoding), expected \(expected.encoding) (do all ranks use the same compression?)")
        }
        if h.encoding == .sparse {
            guard h.offset == expected.offset else {
                throw fail("sparse vector of the range starting at \(h.offset), expected \(expected.offset)")
            }
        } else {
            guard h.offset == expected.offset, h.count == expected.count, !h.isLast else {
                let flagged = h.isLast ? " (flagged last)" : ""
                throw fail("range \(h.offset)+\(h.count) elements\(flagged), expected \(expected.offset)+\(expected.count)")
            }
        }
        let size = h.encoding.payloadBytes(count: Int(h.count))
        guard payload.count == size else {
            let unit = h.encoding == .sparse ? "pairs" : "elements"
            throw fail("payload of \(payload.count) bytes, header announces \(h.count) \(unit) of \(h.encoding) (\(size) bytes)")
        }
        return h
    }

    /// `validate` for a message of a sparse vector over a range of `rangeCount` elements, plus
    /// its pairs: every index must lie in the range and exceed the previous one (the pairs of
    /// one vector are sorted, so it cannot hold more than `rangeCount` of them, nor an entry
    /// twice). `next` is the smallest index allowed (0 for a vector's first message). Returns
    /// the number of pairs, whether the vector ends here, and `next` for the following message.
    static func validateSparse(control: UnsafeRawBufferPointer, payload: UnsafeRawBufferPointer, from peer: Int,
                               expected: WireHeader, rangeCount: Int, next: Int) throws -> (pairs: Int, isLast: Bool, next: Int) {
        let h = try checked(control: control, payload: payload, from: peer, expected: expected)
        var next = next
        for i in 0..<Int(h.count) {
            let index = Int(UInt32(littleEndian: payload.baseAddress!.loadUnaligned(fromByteOffset: 8 * i, as: UInt32.self)))
            guard index < rangeCount else {
                throw CommError.malformedMessage(
                    peer: peer, reason: "sparse index \(index) outside the range of \(rangeCount) elements")
            }
            guard index >= next else {
                throw CommError.malformedMessage(
                    peer: peer, reason: "sparse index \(index) after index \(next - 1): indices must increase")
            }
            next = index + 1
        }
        return (Int(h.count), h.isLast, next)
    }
}
