// The header every collective message carries (the `control` part of a transport message).
//
// Layout, 32 bytes, all integers little-endian:
//
//   offset size field
//        0    2 magic      0x5153 ("SQ" as bytes 53 51)
//        2    1 version    1
//        3    1 kind       1 ring reduce-scatter, 2 ring all-gather,
//                          3 star contribution (worker→hub), 4 star result (hub→worker)
//        4    2 sender     sender's rank
//        6    2 phaseStep  ring step within the phase (0..<N-1); 0 for star
//        8    4 step       collective tag: training step (or any sequence number)
//       12    4 bucket     collective tag: bucket id within the step
//       16    8 offset     index of the payload's first Float in the caller's buffer
//       24    4 count      number of Floats in the payload (payload is exactly 4×count bytes)
//       28    4 reserved   0
//
// The payload (raw little-endian IEEE-754 Floats) travels as a separate part, so it
// can be sent from and reduced into user memory without being copied next to a header.

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
    public static let currentVersion: UInt8 = 1

    public enum Kind: UInt8, Sendable {
        case reduceScatter = 1
        case allGather = 2
        case starContribution = 3
        case starResult = 4
    }

    public var version: UInt8 = WireHeader.currentVersion
    public var kind: Kind
    public var sender: UInt16
    public var phaseStep: UInt16
    public var tag: CollectiveTag
    public var offset: UInt64
    public var count: UInt32

    public init(kind: Kind, sender: Int, phaseStep: Int = 0, tag: CollectiveTag, offset: Int, count: Int) {
        self.kind = kind
        self.sender = UInt16(truncatingIfNeeded: sender)
        self.phaseStep = UInt16(truncatingIfNeeded: phaseStep)
        self.tag = tag
        self.offset = UInt64(offset)
        self.count = UInt32(truncatingIfNeeded: count)
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
        p.storeBytes(of: UInt32(0), toByteOffset: 28, as: UInt32.self)
    }

    public var encoded: [UInt8] {
        var b = [UInt8](repeating: 0, count: WireHeader.size)
        b.withUnsafeMutableBytes { encode(into: $0) }
        return b
    }

    /// Parses a header received from `peer`; throws `CommError.malformedMessage` naming
    /// the peer if it is truncated or has a wrong magic, version or kind.
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
        var h = WireHeader(kind: kind, sender: 0, tag: CollectiveTag(step: 0), offset: 0, count: 0)
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
    /// including that the payload holds exactly `count` Floats.
    public static func validate(control: UnsafeRawBufferPointer, payload: UnsafeRawBufferPointer,
                                from peer: Int, expected: WireHeader) throws {
        let h = try decode(control, from: peer)
        func fail(_ reason: String) -> CommError { .malformedMessage(peer: peer, reason: reason) }
        guard h.kind == expected.kind else { throw fail("kind \(h.kind), expected \(expected.kind)") }
        guard h.sender == expected.sender else { throw fail("header names sender \(h.sender)") }
        guard h.tag == expected.tag else { throw fail("tag \(h.tag), expected \(expected.tag)") }
        guard h.phaseStep == expected.phaseStep else {
            throw fail("\(h.kind) step \(h.phaseStep), expected \(expected.phaseStep)")
        }
        guard h.offset == expected.offset, h.count == expected.count else {
            throw fail("range \(h.offset)+\(h.count) Floats, expected \(expected.offset)+\(expected.count)")
        }
        guard payload.count == Int(h.count) * MemoryLayout<Float>.size else {
            throw fail("payload of \(payload.count) bytes, header announces \(h.count) Floats")
        }
    }
}
