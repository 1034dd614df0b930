// Ring all-reduce (reduce-scatter then all-gather), dense and top-k.

import SqueezeSystem
import SqueezeTransport

/// Ring all-reduce: reduce-scatter then all-gather, rank r sending to r+1 and receiving
/// from r−1 (mod N).
///
/// The range is split into N segments (sizes differ by at most one). In reduce-scatter
/// step s, rank r sends segment r−s and adds the segment r−s−1 it receives into its own;
/// after N−1 steps rank r holds the complete sum of segment r+1, divides it by N and
/// all-gather circulates these final bytes, so every rank ends bit-identical. Segment k is
/// summed in the fixed order x_k + x_{k+1} + … (ranks mod N), independent of timing.
///
/// Each segment travels in chunks of `options.chunkBytes`; a received chunk is reduced
/// straight from the transport's buffer and forwarded at once, so the next hop starts
/// before the segment is complete. Each rank sends (and receives) 2(N−1)/N × 4 × count
/// payload bytes, exactly `ringPayloadBytes`.
///
/// Compression (`GradientCompression`; the same on every rank):
/// - fp16, bf16, int8: the same schedule and chunks (chunkBytes/4 elements per message), with
///   encoded payloads. A rank decodes an incoming partial sum, adds its own values in Float32
///   and encodes the sum for the next hop. The owner of a finished segment encodes the
///   average once for all-gather and keeps the decoded form itself, so every rank still ends
///   bit-identical, and the order of the sums is still fixed.
///   With int8 a rank's values enter the sum as deq(q(g + residual)) per chunk, and the rest
///   stays in its residual for the next call (error feedback). Partial sums and the average
///   re-quantised on the way get no feedback: that error belongs to no single rank's
///   gradient, and it is at most half a quantisation step of the sum per hop. It varies with
///   the inputs, so it partly averages out over calls, but it bounds how close the mean of
///   many calls comes to the true mean (about 3× closer than without feedback in the tests,
///   against 60× when ranks agree and only their own rounding counts).
/// - topk:F: each rank sends the k = max(1, round(F × count)) entries of largest
///   |g + residual| (ties to the lower index; zeros are left out) as (index, value) pairs and
///   keeps the rest in its residual, as in Deep Gradient Compression. Sparse vectors cannot be summed
///   on the way without growing, so they are gathered: N−1 steps around the ring, each rank
///   forwarding what it received. Then every rank adds the N vectors into the zeroed range in
///   rank order 0…N−1 and divides by N, so all get the same bits. Each pair crosses N−1 links:
///   see `ringSparsePayloadBytes`. The N vectors are held until the sum (N × k × 8 bytes).
///
/// Compressed payloads are encoded into memory the reducer owns (a transport may send them
/// without a copy), as much as the call sends; a group of one leaves the buffer as it is.
public final class RingAllReduce<T: Transport>: PeerCollective<T>, AllReducer {
    public func allReduceAverage(_ buffer: UnsafeMutableBufferPointer<Float>, range: Range<Int>, tag: CollectiveTag) throws {
        try checkCollectiveRange(range, bufferCount: buffer.count)
        guard transport.worldSize > 1, !range.isEmpty else { return }
        let p = buffer.baseAddress! + range.lowerBound
        try transport.collective(timeout: options.timeout) {
            switch compression {
            case .none:
                try reduce(Float32Codec(), p, count: range.count, base: range.lowerBound, residual: nil, tag: tag)
            case .fp16, .bf16, .int8:
                let feedback = compression == .int8 ? residual.base(forBufferOf: buffer.count) + range.lowerBound : nil
                try reduce(DenseCodec(compression)!, p, count: range.count, base: range.lowerBound, residual: feedback, tag: tag)
            case .topk(let fraction):
                try gatherSparse(fraction: fraction, p, count: range.count, base: range.lowerBound,
                                 residual: residual.base(forBufferOf: buffer.count) + range.lowerBound, tag: tag)
            }
        }
    }

    /// The ring's schedule for p[0..<count] (elements base..<base+count of the caller's buffer):
    /// reduce-scatter then all-gather, chunk by chunk, each chunk through `codec` (see the type's
    /// documentation). `residual` (int8 only) is the error feedback of p[0..<count].
    private func reduce<C: ChunkCodec>(_ codec: C, _ p: UnsafeMutablePointer<Float>, count: Int, base: Int,
                                       residual: UnsafeMutablePointer<Float>?, tag: CollectiveTag) throws {
        let n = transport.worldSize, r = transport.rank
        let right = (r + 1) % n, left = (r + n - 1) % n
        let chunk = options.chunkElements, timeout = options.timeout
        let divisor = Float(n)
        let segment = { (k: Int) in ringSegment(k, worldSize: n, count: count) }
        outgoing.reset(capacity: codec.ringScratchBytes(count: count, worldSize: n, rank: r, chunkBytes: options.chunkBytes))

        func wireHeader(_ kind: WireHeader.Kind, from sender: Int, step: Int, _ start: Int, _ length: Int) -> WireHeader {
            WireHeader(kind: kind, sender: sender, phaseStep: step, tag: tag, offset: base + start, count: length,
                       encoding: codec.encoding)
        }
        func send(_ kind: WireHeader.Kind, step: Int, _ start: Int, _ length: Int, _ payload: UnsafeRawPointer) throws {
            let bytes = codec.payloadBytes(count: length)
            try traced(tracer, .allReduce, "send", "send", ["to": right, "bytes": bytes]) {
                try transport.send(control: header.encode(wireHeader(kind, from: r, step: step, start, length)),
                                   payload: UnsafeRawBufferPointer(start: payload, count: bytes), to: right)
            }
        }

        // Reduce-scatter, step 0: our own segment r goes out, chunk by chunk (int8: with error
        // feedback, and our values become what the next rank will decode).
        try forEachChunk(segment(r), chunk) { off, len in
            try send(.reduceScatter, step: 0, off, len,
                     try codec.encodeOwn(p + off, residual: residual.map { $0 + off }, count: len, scratch: outgoing))
        }

        // Reduce-scatter: add each arriving partial sum of segment r−s−1 onto our own values and
        // send the sum on at once (as step s+1, or, after the last step, divided by N as
        // all-gather step 0; an encoded average is kept in its decoded form, as others get it).
        for s in 0..<(n - 1) {
            let last = s == n - 2
            try forEachChunk(segment(r - s - 1), chunk) { off, len in
                codec.contribute(p + off, residual: residual.map { $0 + off }, count: len, scratch: contribution)
                let expected = wireHeader(.reduceScatter, from: left, step: s, off, len)
                try traced(tracer, .allReduce, "receive", "receive", ["from": left, "bytes": codec.payloadBytes(count: len)]) {
                    try transport.receive(from: left, timeout: timeout) { control, payload in
                        try WireHeader.validate(control: control, payload: payload, from: left, expected: expected)
                        traced(tracer, .allReduce, "reduce", "reduce", ["elements": len]) {
                            codec.accumulate(payload.baseAddress!, into: p + off, count: len, first: false, divisor: last ? divisor : nil)
                        }
                    }
                }
                let out = try codec.encodeSum(p + off, count: len, keepDecoded: last, scratch: outgoing)
                try send(last ? .allGather : .reduceScatter, step: last ? 0 : s + 1, off, len, out)
            }
        }

        // All-gather: take over each arriving final chunk of segment r−s and pass its bytes on.
        for s in 0..<(n - 1) {
            let forwarding = s < n - 2
            try forEachChunk(segment(r - s), chunk) { off, len in
                let expected = wireHeader(.allGather, from: left, step: s, off, len)
                let forward = try traced(tracer, .allReduce, "receive", "receive", ["from": left, "bytes": codec.payloadBytes(count: len)]) {
                    try transport.receive(from: left, timeout: timeout) { control, payload in
                        try WireHeader.validate(control: control, payload: payload, from: left, expected: expected)
                        return try codec.assign(payload.baseAddress!, into: p + off, count: len, forwarding: forwarding, scratch: outgoing)
                    }
                }
                if let forward { try send(.allGather, step: s + 1, off, len, forward) }
            }
        }
    }

    /// Top-k all-reduce (see the type's documentation): an all-gather of sparse vectors, sent
    /// as all-gather messages, step s carrying the vector of rank r−s.
    private func gatherSparse(fraction: Double, _ p: UnsafeMutablePointer<Float>, count: Int, base: Int,
                              residual: UnsafeMutablePointer<Float>, tag: CollectiveTag) throws {
        let n = transport.worldSize, r = transport.rank
        let right = (r + 1) % n, left = (r + n - 1) % n, timeout = options.timeout
        let k = options.topkPairs(fraction, count: count, tag: tag)
        let pairBytes = SparseKernels.pairBytes
        // Vector j lives in slot j; a forwarded message is sent from the slot it was received into.
        outgoing.reset(capacity: n * k * pairBytes)
        let slots = try (0..<n).map { _ in try outgoing.take(k * pairBytes) }
        var lengths = [Int](repeating: 0, count: n)

        // Our vector: the top k of g + residual; the residual keeps the rest.
        accumulate(p, count: count, base: base, residual: residual)
        lengths[r] = SparseKernels.extractTopK(residual, count: count, k: k, into: slots[r])
        maskSent(count: count, base: base, residual: residual)
        p.update(repeating: 0, count: count)

        func send(step: Int, vector j: Int, from first: Int, pairs: Int, isLast: Bool) throws {
            let h = WireHeader(kind: .allGather, sender: r, phaseStep: step, tag: tag, offset: base, count: pairs,
                               encoding: .sparse, isLast: isLast)
            try transport.send(control: header.encode(h),
                               payload: UnsafeRawBufferPointer(start: slots[j] + first * pairBytes, count: pairs * pairBytes),
                               to: right)
        }

        try sendSparse(pairs: lengths[r], perMessage: options.chunkBytes) { first, pairs, isLast in
            try send(step: 0, vector: r, from: first, pairs: pairs, isLast: isLast)
        }
        for s in 0..<(n - 1) {
            let j = (r - s - 1 + n) % n
            let expected = WireHeader(kind: .allGather, sender: left, phaseStep: s, tag: tag, offset: base, count: 0,
                                      encoding: .sparse)
            lengths[j] = try transport.receiveSparse(
                from: left, expected: expected, rangeCount: count, limit: k, owner: j, timeout: timeout,
                take: { pairs, first, m in (slots[j] + first * pairBytes).copyMemory(from: pairs, byteCount: m * pairBytes) },
                then: { first, m, isLast in
                    if s < n - 2 { try send(step: s + 1, vector: j, from: first, pairs: m, isLast: isLast) }
                })
        }

        // The sum in rank order, whatever the order of arrival, then the average.
        for j in 0..<n { SparseKernels.add(slots[j], count: lengths[j], into: p) }
        FloatKernels.divide(p, p, count: count, divisor: Float(n))
    }
}
