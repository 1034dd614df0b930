// How the dense collectives put a chunk of Floats on the wire and take it off again: the one
// abstraction behind the ring, the star and the tree for Float32 and for fp16, bf16 and int8.
//
// A chunk meets the codec at five points of a schedule: a rank's own values go out
// (`encodeOwn`), a rank's values join a sum (`contribute`), a received payload is added in
// (`accumulate`), a sum goes out (`encodeSum`), a final payload is taken over and perhaps passed
// on (`assign`). The identity codec (Float32) sends straight from the buffer and reduces straight
// from the receive buffer, with no scratch and no copy: the schedules are generic over the codec,
// so each codec gets its own specialised copy and Float32 pays nothing for the others.

import SqueezeTransport

protocol ChunkCodec {
    /// What the headers of this codec's messages say.
    var encoding: WireHeader.Encoding { get }

    /// Payload bytes of a chunk of `count` elements.
    func payloadBytes(count: Int) -> Int

    /// Payload bytes a ring rank sends in one call (the memory its scratch must hold: nothing for
    /// the identity, which sends from the buffer).
    func ringScratchBytes(count: Int, worldSize: Int, rank: Int, chunkBytes: Int) -> Int

    /// Payload bytes of `count` elements encoded once, chunk by chunk, into scratch (nothing for the
    /// identity): what a star worker or the hub encodes in one call, and a tree rank per pass.
    func scratchBytes(count: Int, chunkBytes: Int) -> Int

    /// This rank's own values p[0..<count] as a payload to send. With `residual` (error feedback),
    /// the residual is added first and `p` becomes what the receiver will decode.
    func encodeOwn(_ p: UnsafeMutablePointer<Float>, residual: UnsafeMutablePointer<Float>?, count: Int,
                   scratch: ScratchBytes) throws -> UnsafeRawPointer

    /// Makes p[0..<count] this rank's contribution to a sum that arrives encoded: with `residual`,
    /// what the rank would have sent (as `encodeOwn`), so its error feedback applies; otherwise p.
    func contribute(_ p: UnsafeMutablePointer<Float>, residual: UnsafeMutablePointer<Float>?, count: Int,
                    scratch: ScratchBytes)

    /// p[i] = decoded[i] (`first`) or p[i] += decoded[i], then p[i] /= divisor when one is given.
    func accumulate(_ payload: UnsafeRawPointer, into p: UnsafeMutablePointer<Float>, count: Int, first: Bool,
                    divisor: Float?)

    /// A sum p[0..<count] as a payload to send; with `keepDecoded`, p becomes the decoded payload,
    /// so the sender holds the same bits as every receiver.
    func encodeSum(_ p: UnsafeMutablePointer<Float>, count: Int, keepDecoded: Bool, scratch: ScratchBytes) throws -> UnsafeRawPointer

    /// p[i] = decoded[i]. With `forwarding`, returns the payload to pass on unchanged (bytes that
    /// stay valid after the receive: the identity's are p itself, other codecs copy into scratch).
    func assign(_ payload: UnsafeRawPointer, into p: UnsafeMutablePointer<Float>, count: Int, forwarding: Bool,
                scratch: ScratchBytes) throws -> UnsafeRawPointer?
}

/// Float32 as it is in memory: sent from the caller's buffer, reduced from the receive buffer.
struct Float32Codec: ChunkCodec {
    var encoding: WireHeader.Encoding { .float32 }

    @inline(__always) func payloadBytes(count: Int) -> Int { 4 * count }
    func ringScratchBytes(count: Int, worldSize: Int, rank: Int, chunkBytes: Int) -> Int { 0 }
    func scratchBytes(count: Int, chunkBytes: Int) -> Int { 0 }

    @inline(__always)
    func encodeOwn(_ p: UnsafeMutablePointer<Float>, residual: UnsafeMutablePointer<Float>?, count: Int,
                   scratch: ScratchBytes) throws -> UnsafeRawPointer {
        UnsafeRawPointer(p)
    }

    @inline(__always)
    func contribute(_ p: UnsafeMutablePointer<Float>, residual: UnsafeMutablePointer<Float>?, count: Int,
                    scratch: ScratchBytes) {}

    @inline(__always)
    func accumulate(_ payload: UnsafeRawPointer, into p: UnsafeMutablePointer<Float>, count: Int, first: Bool,
                    divisor: Float?) {
        switch (first, divisor) {
        case (true, let d?): FloatKernels.divide(p, payload, count: count, divisor: d)
        case (true, nil): FloatKernels.copy(p, payload, count: count)
        case (false, let d?): FloatKernels.addAndDivide(p, payload, count: count, divisor: d)
        case (false, nil): FloatKernels.add(p, payload, count: count)
        }
    }

    @inline(__always)
    func encodeSum(_ p: UnsafeMutablePointer<Float>, count: Int, keepDecoded: Bool, scratch: ScratchBytes) throws -> UnsafeRawPointer {
        UnsafeRawPointer(p)
    }

    @inline(__always)
    func assign(_ payload: UnsafeRawPointer, into p: UnsafeMutablePointer<Float>, count: Int, forwarding: Bool,
                scratch: ScratchBytes) throws -> UnsafeRawPointer? {
        FloatKernels.copy(p, payload, count: count)
        return forwarding ? UnsafeRawPointer(p) : nil
    }
}

/// fp16, bf16 and int8: encoded into memory the reducer owns (`ScratchBytes`), which stays
/// untouched until the call's sends complete; decoded and summed in Float32.
extension DenseCodec: ChunkCodec {
    var compression: GradientCompression {
        switch self {
        case .float16: .fp16
        case .bfloat16: .bf16
        case .int8: .int8
        }
    }

    func ringScratchBytes(count: Int, worldSize: Int, rank: Int, chunkBytes: Int) -> Int {
        ringPayloadBytes(count: count, worldSize: worldSize, rank: rank, compression: compression, chunkBytes: chunkBytes)!.sent
    }

    func scratchBytes(count: Int, chunkBytes: Int) -> Int {
        compression.densePayloadBytes(count: count, chunkBytes: chunkBytes)!
    }

    func encodeOwn(_ p: UnsafeMutablePointer<Float>, residual: UnsafeMutablePointer<Float>?, count: Int,
                   scratch: ScratchBytes) throws -> UnsafeRawPointer {
        let out = try scratch.take(payloadBytes(count: count))
        if let residual {
            encode(p, residual: residual, count: count, into: out)
        } else {
            encode(p, count: count, into: out)
        }
        return UnsafeRawPointer(out)
    }

    func contribute(_ p: UnsafeMutablePointer<Float>, residual: UnsafeMutablePointer<Float>?, count: Int,
                    scratch: ScratchBytes) {
        guard let residual else { return }
        encode(p, residual: residual, count: count, into: scratch.reusable(payloadBytes(count: count)))
    }

    func accumulate(_ payload: UnsafeRawPointer, into p: UnsafeMutablePointer<Float>, count: Int, first: Bool,
                    divisor: Float?) {
        decode(payload, count: count, into: p, adding: !first)
        if let divisor { FloatKernels.divide(p, p, count: count, divisor: divisor) }
    }

    func encodeSum(_ p: UnsafeMutablePointer<Float>, count: Int, keepDecoded: Bool, scratch: ScratchBytes) throws -> UnsafeRawPointer {
        let out = try scratch.take(payloadBytes(count: count))
        encode(p, count: count, into: out)
        if keepDecoded { decode(out, count: count, into: p, adding: false) }
        return UnsafeRawPointer(out)
    }

    func assign(_ payload: UnsafeRawPointer, into p: UnsafeMutablePointer<Float>, count: Int, forwarding: Bool,
                scratch: ScratchBytes) throws -> UnsafeRawPointer? {
        decode(payload, count: count, into: p, adding: false)
        guard forwarding else { return nil }
        let bytes = payloadBytes(count: count), copy = try scratch.take(bytes)
        copy.copyMemory(from: payload, byteCount: bytes)
        return UnsafeRawPointer(copy)
    }
}
