import Testing
@testable import SqueezeCollectives
import SqueezeTestSupport
@testable import SqueezeTransport

@Suite("Wire header")
struct WireHeaderTests {
    let header = WireHeader(kind: .allGather, sender: 3, phaseStep: 2,
                            tag: CollectiveTag(step: 0x0102_0304, bucket: 9), offset: 0x1_0000_0005, count: 65_536)

    @Test("layout is 32 little-endian bytes as documented")
    func layout() {
        let b = header.encoded
        #expect(b.count == 32)
        #expect(Array(b[0..<4]) == [0x53, 0x51, 2, 2])        // magic "SQ", version 2, kind all-gather
        #expect(Array(b[4..<8]) == [3, 0, 2, 0])              // sender 3, phase step 2
        #expect(Array(b[8..<12]) == [4, 3, 2, 1])             // step
        #expect(Array(b[12..<16]) == [9, 0, 0, 0])            // bucket
        #expect(Array(b[16..<24]) == [5, 0, 0, 0, 1, 0, 0, 0]) // offset
        #expect(Array(b[24..<28]) == [0, 0, 1, 0])            // count
        #expect(Array(b[28..<32]) == [0, 0, 0, 0])            // reserved
    }

    @Test("decode(encode(h)) == h")
    func roundTrip() throws {
        let decoded = try header.encoded.withUnsafeBytes { try WireHeader.decode($0, from: 3) }
        #expect(decoded == header)
    }

    @Test("bad magic, version, kind and size are rejected naming the peer")
    func rejects() {
        func error(_ bytes: [UInt8]) -> CommError? {
            do {
                _ = try bytes.withUnsafeBytes { try WireHeader.decode($0, from: 4) }
                return nil
            } catch { return error as? CommError }
        }
        var b = header.encoded
        b[0] = 0
        #expect(error(b)?.description.contains("bad magic") == true)
        b = header.encoded
        b[2] = 1
        #expect(error(b)?.description.contains("version 1") == true)
        b = header.encoded
        b[3] = 0
        #expect(error(b)?.description.contains("unknown message kind 0") == true)
        #expect(error(Array(header.encoded[..<31]))?.description.contains("truncated header (31 of 32 bytes)") == true)
        #expect(error(header.encoded + [0])?.peer == 4)
        #expect(error([])?.description.contains("rank 4") == true)
    }

    @Test("validate checks kind, sender, tag, step, range and payload length")
    func validate() {
        func error(_ h: WireHeader, payloadBytes: Int = 4 * 65_536) -> String? {
            let payload = [UInt8](repeating: 0, count: payloadBytes)
            do {
                try h.encoded.withUnsafeBytes { c in
                    try payload.withUnsafeBytes { p in try WireHeader.validate(control: c, payload: p, from: 3, expected: header) }
                }
                return nil
            } catch { return "\(error)" }
        }
        #expect(error(header) == nil)
        var h = header
        h.kind = .reduceScatter
        #expect(error(h)?.contains("kind") == true)
        h = header
        h.sender = 1
        #expect(error(h)?.contains("sender") == true)
        h = header
        h.tag.bucket = 8
        #expect(error(h)?.contains("tag") == true)
        h = header
        h.phaseStep = 1
        #expect(error(h)?.contains("step 1") == true)
        h = header
        h.offset += 1
        #expect(error(h)?.contains("range") == true)
        #expect(error(header, payloadBytes: 4 * 65_536 - 1)?.contains("payload of 262143 bytes") == true)
        #expect(error(header, payloadBytes: 0)?.contains("from rank 3") == true)
    }
}

@Suite("Reduction kernels against naive loops")
struct KernelTests {
    @Test("add / addAndDivide / divide / copy, aligned and unaligned sources", arguments: [0, 1, 2, 3])
    func kernels(misalignment: Int) {
        let n = 1037
        let a = rankData(rank: 0, count: n), b = rankData(rank: 1, count: n)
        // Source bytes placed at an arbitrary byte offset, as inside a ZeroMQ receive batch.
        var raw = [UInt8](repeating: 0, count: 4 * n + 8)
        b.withUnsafeBytes { src in
            raw.withUnsafeMutableBytes { $0.baseAddress!.advanced(by: misalignment).copyMemory(from: src.baseAddress!, byteCount: 4 * n) }
        }
        raw.withUnsafeBytes { rawBuffer in
            let src = rawBuffer.baseAddress!.advanced(by: misalignment)
            var dst = a
            dst.withUnsafeMutableBufferPointer { FloatKernels.add($0.baseAddress!, src, count: n) }
            #expect(firstMismatch(dst, zip(a, b).map { $0 + $1 }) == nil)

            dst = a
            dst.withUnsafeMutableBufferPointer { FloatKernels.addAndDivide($0.baseAddress!, src, count: n, divisor: 3) }
            #expect(firstMismatch(dst, zip(a, b).map { ($0 + $1) / 3 }) == nil)

            dst = a
            dst.withUnsafeMutableBufferPointer { FloatKernels.divide($0.baseAddress!, src, count: n, divisor: 7) }
            #expect(firstMismatch(dst, b.map { $0 / 7 }) == nil)

            dst = a
            dst.withUnsafeMutableBufferPointer { FloatKernels.copy($0.baseAddress!, src, count: n) }
            #expect(firstMismatch(dst, b) == nil)
        }
    }

    @Test("segments: sizes differ by at most one and tile the range", arguments: 1...6, [0, 1, 5, 727_626])
    func segments(parts: Int, count: Int) {
        let segs = (0..<parts).map { evenSegment($0, of: parts, count: count) }
        #expect(segs.first?.lowerBound == 0)
        #expect(segs.last?.upperBound == count)
        for k in 1..<parts { #expect(segs[k].lowerBound == segs[k - 1].upperBound) }
        let sizes = segs.map(\.count)
        #expect(sizes.max()! - sizes.min()! <= 1)
    }
}
