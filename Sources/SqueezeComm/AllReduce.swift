// All-reduce (average) of Float buffers: ring, star and tree.

/// Settings shared by the collectives. Every rank of a group must use the same chunk size.
public struct CollectiveOptions: Sendable {
    /// Payload bytes per message; segments are cut into chunks of this size so that
    /// receiving, reducing and forwarding overlap. The 1 MiB default was the fastest of
    /// 64 KiB…4 MiB for 727,626 Floats over tcp loopback with 2 and 4 processes on a
    /// 2-core machine: each message costs syscalls and thread wake-ups, which outweigh
    /// finer pipelining there. Compressed messages keep the chunks of chunkBytes/4 elements
    /// (so the schedule and message counts do not change, and int8 has one scale per chunk)
    /// in fewer bytes; a sparse message carries at most chunkBytes/8 (index, value) pairs.
    public var chunkBytes: Int
    /// How long a receive waits for a peer before throwing `CommError.timeout`.
    public var timeout: Duration

    public init(chunkBytes: Int = 1 << 20, timeout: Duration = .seconds(60)) {
        self.chunkBytes = chunkBytes
        self.timeout = timeout
    }

    var chunkElements: Int { max(1, chunkBytes / MemoryLayout<Float>.size) }
}

/// Something that averages a Float buffer across the participants of a group, in place.
public protocol AllReducer {
    /// The number of buffers averaged.
    var participants: Int { get }
    /// Replaces `buffer[range]` on every participant by the element-wise average of all
    /// participants' `buffer[range]`. All participants must call it with the same range,
    /// tag and options, in the same order relative to their other collectives.
    func allReduceAverage(_ buffer: UnsafeMutableBufferPointer<Float>, range: Range<Int>, tag: CollectiveTag) throws
}

extension AllReducer {
    /// Averages the whole buffer.
    public func allReduceAverage(_ buffer: UnsafeMutableBufferPointer<Float>, tag: CollectiveTag) throws {
        try allReduceAverage(buffer, range: 0..<buffer.count, tag: tag)
    }

    /// Averages the whole array.
    public func allReduceAverage(_ array: inout [Float], tag: CollectiveTag) throws {
        try array.withUnsafeMutableBufferPointer { try allReduceAverage($0, range: 0..<$0.count, tag: tag) }
    }
}

/// The partition of `count` elements into `parts` contiguous segments whose sizes differ
/// by at most one (the first `count % parts` segments get the extra element).
@inline(__always)
public func evenSegment(_ k: Int, of parts: Int, count: Int) -> Range<Int> {
    let base = count / parts, extra = count % parts
    let start = k * base + min(k, extra)
    return start..<(start + base + (k < extra ? 1 : 0))
}

@inline(__always)
func chunkCount(_ length: Int, chunk: Int) -> Int { (length + chunk - 1) / chunk }

/// Segment k (taken mod N) of a ring of N ranks over `count` elements.
@inline(__always)
func ringSegment(_ k: Int, worldSize n: Int, count: Int) -> Range<Int> {
    evenSegment(((k % n) + n) % n, of: n, count: count)
}

/// Calls `body(offset, length)` for the consecutive chunks of at most `chunk` elements of `range`.
@inline(__always)
func forEachChunk(_ range: Range<Int>, _ chunk: Int, _ body: (Int, Int) throws -> Void) rethrows {
    for off in stride(from: range.lowerBound, to: range.upperBound, by: chunk) {
        try body(off, min(chunk, range.upperBound - off))
    }
}

/// Throws unless `range` lies inside a buffer of `bufferCount` elements and its length fits a
/// header's 32-bit count.
func checkCollectiveRange(_ range: Range<Int>, bufferCount: Int) throws {
    guard range.lowerBound >= 0, range.upperBound <= bufferCount else {
        throw CommError.invalidArgument("range \(range) outside a buffer of \(bufferCount) Floats")
    }
    guard range.count <= UInt32.max else {
        throw CommError.invalidArgument("range of \(range.count) elements: at most \(UInt32.max) per all-reduce")
    }
}

extension Transport {
    /// Runs one collective's sends and receives, then waits until the transport no longer holds
    /// its payloads; on failure abandons them (so the caller may reuse the memory) and rethrows.
    func collective(timeout: Duration, _ body: () throws -> Void) throws {
        do {
            try body()
            try completeSends(timeout: timeout)
        } catch {
            abandonSends()
            throw error
        }
    }
}

/// Reusable 32-byte header scratch (one allocation per collective object, not per message).
final class HeaderScratch {
    let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: WireHeader.size, alignment: 8)
    deinit { bytes.deallocate() }

    func encode(_ h: WireHeader) -> UnsafeRawBufferPointer {
        h.encode(into: bytes)
        return UnsafeRawBufferPointer(bytes)
    }
}

/// What the ring and the tree share: every rank a participant, its transport, the settings, and the
/// reducer's own memory (headers, compressed payloads, the error-feedback residual).
public class PeerCollective<T: Transport> {
    public let transport: T
    public let options: CollectiveOptions
    public let compression: GradientCompression
    let header = HeaderScratch()
    /// Payloads this call sends (compressed only).
    let outgoing = ScratchBytes()
    /// int8: this rank's encoded contribution to a sum it receives (not sent itself).
    let contribution = ScratchBytes()
    let residual = Residual()

    public init(transport: T, options: CollectiveOptions = CollectiveOptions(),
                compression: GradientCompression = .none) {
        compression.checkValid()
        self.transport = transport
        self.options = options
        self.compression = compression
    }

    public var participants: Int { transport.worldSize }

    public func errorFeedback(count: Int) -> [Float] { residual.snapshot(count: count) }
    public func restoreErrorFeedback(_ saved: [Float]) { residual.restore(saved) }
}

// MARK: - Ring

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
            try transport.send(control: header.encode(wireHeader(kind, from: r, step: step, start, length)),
                               payload: UnsafeRawBufferPointer(start: payload, count: codec.payloadBytes(count: length)),
                               to: right)
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
                try transport.receive(from: left, timeout: timeout) { control, payload in
                    try WireHeader.validate(control: control, payload: payload, from: left, expected: expected)
                    codec.accumulate(payload.baseAddress!, into: p + off, count: len, first: false, divisor: last ? divisor : nil)
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
                let forward = try transport.receive(from: left, timeout: timeout) { control, payload in
                    try WireHeader.validate(control: control, payload: payload, from: left, expected: expected)
                    return try codec.assign(payload.baseAddress!, into: p + off, count: len, forwarding: forwarding, scratch: outgoing)
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
        let k = GradientCompression.topkPairs(fraction: fraction, count: count)
        let pairBytes = SparseKernels.pairBytes
        // Vector j lives in slot j; a forwarded message is sent from the slot it was received into.
        outgoing.reset(capacity: n * k * pairBytes)
        let slots = try (0..<n).map { _ in try outgoing.take(k * pairBytes) }
        var lengths = [Int](repeating: 0, count: n)

        // Our vector: the top k of g + residual; the residual keeps the rest.
        FloatKernels.add(residual, UnsafeRawPointer(p), count: count)
        lengths[r] = SparseKernels.extractTopK(residual, count: count, k: k, into: slots[r])
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
            var next = 0, isLast = false
            while !isLast {
                let first = lengths[j]
                let got = try transport.receive(from: left, timeout: timeout) { control, payload in
                    let got = try WireHeader.validateSparse(control: control, payload: payload, from: left, expected: expected,
                                                            rangeCount: count, next: next)
                    guard first + got.pairs <= k else {
                        throw CommError.malformedMessage(peer: left, reason: "sparse vector of rank \(j) has more than k = \(k) pairs")
                    }
                    if got.pairs > 0 {
                        (slots[j] + first * pairBytes).copyMemory(from: payload.baseAddress!, byteCount: got.pairs * pairBytes)
                    }
                    return got
                }
                lengths[j] += got.pairs
                next = got.next
                isLast = got.isLast
                if s < n - 2 { try send(step: s + 1, vector: j, from: first, pairs: got.pairs, isLast: isLast) }
            }
        }

        // The sum in rank order, whatever the order of arrival, then the average.
        for j in 0..<n { SparseKernels.add(slots[j], count: lengths[j], into: p) }
        FloatKernels.divide(p, p, count: count, divisor: Float(n))
    }
}

/// Cuts a sparse vector of `pairs` pairs into messages of at most `perMessage` payload bytes and
/// calls `send(first pair, pairs, isLast)` for each; an empty vector is one empty message.
func sendSparse(pairs: Int, perMessage bytes: Int, _ send: (Int, Int, Bool) throws -> Void) throws {
    let most = max(1, bytes / SparseKernels.pairBytes)
    var first = 0
    repeat {
        let m = min(most, pairs - first)
        try send(first, m, first + m == pairs)
        first += m
    } while first < pairs
}

// MARK: - Star

/// The worker side of a star all-reduce: send the whole range to the hub (in chunks),
/// receive the average back. Per call a worker sends and receives 4 × count payload bytes.
///
/// With compression (the same on every worker and the hub): fp16, bf16 and int8 chunks are
/// encoded both ways, the hub summing decoded values in Float32 (int8 with error feedback
/// on the worker, as in the ring); with topk:F the worker sends its k largest entries of
/// g + residual as a sparse vector and gets back the nonzero entries of the average.
public final class StarAllReduceWorker<T: Transport>: AllReducer {
    public let transport: T
    public let hub: Int
    public let options: CollectiveOptions
    public let compression: GradientCompression
    private let header = HeaderScratch()
    /// Payloads this call sends (compressed only).
    private let outgoing = ScratchBytes()
    fileprivate let residual = Residual()

    public init(transport: T, hub: Int, options: CollectiveOptions = CollectiveOptions(),
                compression: GradientCompression = .none) {
        compression.checkValid()
        self.transport = transport
        self.hub = hub
        self.options = options
        self.compression = compression
    }

    /// Workers of the group: every rank except the hub.
    public var participants: Int { transport.worldSize - 1 }

    public func allReduceAverage(_ buffer: UnsafeMutableBufferPointer<Float>, range: Range<Int>, tag: CollectiveTag) throws {
        try checkCollectiveRange(range, bufferCount: buffer.count)
        guard !range.isEmpty else { return }
        let p = buffer.baseAddress!
        try transport.collective(timeout: options.timeout) {
            switch compression {
            case .none:
                try reduce(Float32Codec(), p, range: range, residual: nil, tag: tag)
            case .fp16, .bf16, .int8:
                let feedback = compression == .int8 ? residual.base(forBufferOf: buffer.count) : nil
                try reduce(DenseCodec(compression)!, p, range: range, residual: feedback, tag: tag)
            case .topk(let fraction):
                try gatherSparse(fraction: fraction, p + range.lowerBound, range: range,
                                 residual: residual.base(forBufferOf: buffer.count) + range.lowerBound, tag: tag)
            }
        }
    }

    /// The star's schedule for a worker: every chunk of p[range] to the hub through `codec`, then
    /// every chunk of the average back. `residual` (int8 only) is indexed like `p`.
    private func reduce<C: ChunkCodec>(_ codec: C, _ p: UnsafeMutablePointer<Float>, range: Range<Int>,
                                       residual: UnsafeMutablePointer<Float>?, tag: CollectiveTag) throws {
        let r = transport.rank, chunk = options.chunkElements
        outgoing.reset(capacity: codec.scratchBytes(count: range.count, chunkBytes: options.chunkBytes))
        try forEachChunk(range, chunk) { off, len in
            let out = try codec.encodeOwn(p + off, residual: residual.map { $0 + off }, count: len, scratch: outgoing)
            let h = WireHeader(kind: .starContribution, sender: r, tag: tag, offset: off, count: len, encoding: codec.encoding)
            try transport.send(control: header.encode(h),
                               payload: UnsafeRawBufferPointer(start: out, count: codec.payloadBytes(count: len)), to: hub)
        }
        try forEachChunk(range, chunk) { off, len in
            let expected = WireHeader(kind: .starResult, sender: hub, tag: tag, offset: off, count: len, encoding: codec.encoding)
            _ = try transport.receive(from: hub, timeout: options.timeout) { control, payload in
                try WireHeader.validate(control: control, payload: payload, from: hub, expected: expected)
                return try codec.assign(payload.baseAddress!, into: p + off, count: len, forwarding: false, scratch: outgoing)
            }
        }
    }

    /// `p` is the start of the range.
    private func gatherSparse(fraction: Double, _ p: UnsafeMutablePointer<Float>, range: Range<Int>,
                              residual: UnsafeMutablePointer<Float>, tag: CollectiveTag) throws {
        let r = transport.rank, count = range.count, pairBytes = SparseKernels.pairBytes
        let k = GradientCompression.topkPairs(fraction: fraction, count: count)
        outgoing.reset(capacity: k * pairBytes)
        let vector = try outgoing.take(k * pairBytes)
        FloatKernels.add(residual, UnsafeRawPointer(p), count: count)
        let pairs = SparseKernels.extractTopK(residual, count: count, k: k, into: vector)
        try sendSparse(pairs: pairs, perMessage: options.chunkBytes) { first, m, isLast in
            let h = WireHeader(kind: .starContribution, sender: r, tag: tag, offset: range.lowerBound, count: m,
                               encoding: .sparse, isLast: isLast)
            try transport.send(control: header.encode(h),
                               payload: UnsafeRawBufferPointer(start: vector + first * pairBytes, count: m * pairBytes), to: hub)
        }

        p.update(repeating: 0, count: count)
        let expected = WireHeader(kind: .starResult, sender: hub, tag: tag, offset: range.lowerBound, count: 0, encoding: .sparse)
        var next = 0, isLast = false
        while !isLast {
            (next, isLast) = try transport.receive(from: hub, timeout: options.timeout) { control, payload in
                let got = try WireHeader.validateSparse(control: control, payload: payload, from: hub, expected: expected,
                                                        rangeCount: count, next: next)
                if got.pairs > 0 { SparseKernels.assign(payload.baseAddress!, count: got.pairs, into: p) }
                return (got.next, got.isLast)
            }
        }
    }
}

/// The hub side of a star all-reduce (the coordinator, not a worker): receives every
/// worker's range, sums in worker order (so the result is deterministic), divides by the
/// number of workers and sends the average back to each. Per call the hub receives and
/// sends 4 × count × workers payload bytes.
///
/// Compressed (the workers' setting): fp16, bf16 and int8 contributions are decoded and
/// summed in Float32, and each averaged chunk is encoded once and sent to every worker.
/// topk: the workers' sparse vectors are added in worker order into a zeroed range, and
/// the nonzero entries of the average go back as one sparse vector.
public final class StarAllReduceHub<T: Transport> {
    public let transport: T
    /// Worker ranks, in summation order.
    public let workers: [Int]
    public let options: CollectiveOptions
    public let compression: GradientCompression
    private let header = HeaderScratch()
    private var scratch = UnsafeMutableBufferPointer<Float>(start: nil, count: 0)
    /// Payloads this call sends (compressed only).
    private let outgoing = ScratchBytes()
    /// topk: the vector of the worker being received.
    private let incoming = ScratchBytes()

    public init(transport: T, workers: [Int]? = nil, options: CollectiveOptions = CollectiveOptions(),
                compression: GradientCompression = .none) {
        compression.checkValid()
        self.transport = transport
        self.workers = workers ?? (0..<transport.worldSize).filter { $0 != transport.rank }
        self.options = options
        self.compression = compression
    }

    deinit { scratch.deallocate() }

    /// Serves one all-reduce of the workers' `range` (the range they pass; the hub needs
    /// no buffer of its own: it reduces into an internal scratch buffer, reused across calls).
    public func reduce(range: Range<Int>, tag: CollectiveTag) throws {
        guard range.lowerBound >= 0, !workers.isEmpty else {
            throw CommError.invalidArgument("range \(range) with \(workers.count) workers")
        }
        try checkCollectiveRange(range, bufferCount: range.upperBound)
        guard !range.isEmpty else { return }
        if scratch.count < range.count {
            scratch.deallocate()
            scratch = .allocate(capacity: range.count)
        }
        try transport.collective(timeout: options.timeout) {
            switch compression {
            case .none: try reduce(Float32Codec(), range: range, tag: tag)
            case .fp16, .bf16, .int8: try reduce(DenseCodec(compression)!, range: range, tag: tag)
            case .topk(let fraction): try reduceSparse(fraction: fraction, range: range, tag: tag)
            }
        }
    }

    /// Serves one all-reduce of `count` Floats starting at offset 0.
    public func reduce(count: Int, tag: CollectiveTag) throws {
        try reduce(range: 0..<count, tag: tag)
    }

    /// Serves the all-reduces of a run: for each step, one per bucket of `plan` (tagged step and
    /// bucket index), in order, until all are done or `shouldStop` returns true (checked before
    /// each). The first failure ends it and is thrown: the caller reports it.
    public func serve(plan: [Range<Int>], steps: Range<Int>, shouldStop: () -> Bool = { false }) throws {
        for step in steps {
            for (k, range) in plan.enumerated() {
                if shouldStop() { return }
                do {
                    try reduce(range: range, tag: CollectiveTag(step: UInt32(step), bucket: UInt32(k)))
                } catch {
                    throw StarHubError(step: step, bucket: k, underlying: error)
                }
            }
        }
    }

    /// The star's schedule at the hub, chunk by chunk: every worker's chunk through `codec`,
    /// summed in worker order and divided by the number of workers, then the average encoded
    /// once and sent to every worker.
    private func reduce<C: ChunkCodec>(_ codec: C, range: Range<Int>, tag: CollectiveTag) throws {
        let acc = scratch.baseAddress!
        let r = transport.rank, chunk = options.chunkElements, divisor = Float(workers.count)
        outgoing.reset(capacity: codec.scratchBytes(count: range.count, chunkBytes: options.chunkBytes))
        try forEachChunk(0..<range.count, chunk) { off, len in
            let offset = range.lowerBound + off
            for (i, w) in workers.enumerated() {
                let expected = WireHeader(kind: .starContribution, sender: w, tag: tag, offset: offset, count: len,
                                          encoding: codec.encoding)
                try transport.receive(from: w, timeout: options.timeout) { control, payload in
                    try WireHeader.validate(control: control, payload: payload, from: w, expected: expected)
                    codec.accumulate(payload.baseAddress!, into: acc + off, count: len, first: i == 0,
                                     divisor: i == workers.count - 1 ? divisor : nil)
                }
            }
            let out = try codec.encodeSum(acc + off, count: len, keepDecoded: false, scratch: outgoing)
            let control = header.encode(WireHeader(kind: .starResult, sender: r, tag: tag, offset: offset, count: len,
                                                   encoding: codec.encoding))
            for w in workers {
                try transport.send(control: control,
                                   payload: UnsafeRawBufferPointer(start: out, count: codec.payloadBytes(count: len)), to: w)
            }
        }
    }

    private func reduceSparse(fraction: Double, range: Range<Int>, tag: CollectiveTag) throws {
        let acc = scratch.baseAddress!, count = range.count, pairBytes = SparseKernels.pairBytes
        let k = GradientCompression.topkPairs(fraction: fraction, count: count)
        acc.update(repeating: 0, count: count)
        incoming.reset(capacity: k * pairBytes)
        let vector = try incoming.take(k * pairBytes)
        for w in workers {
            let expected = WireHeader(kind: .starContribution, sender: w, tag: tag, offset: range.lowerBound, count: 0,
                                      encoding: .sparse)
            var have = 0, next = 0, isLast = false
            while !isLast {
                let got = try transport.receive(from: w, timeout: options.timeout) { control, payload in
                    let got = try WireHeader.validateSparse(control: control, payload: payload, from: w, expected: expected,
                                                            rangeCount: count, next: next)
                    guard have + got.pairs <= k else {
                        throw CommError.malformedMessage(peer: w, reason: "sparse vector has more than k = \(k) pairs")
                    }
                    if got.pairs > 0 {
                        (vector + have * pairBytes).copyMemory(from: payload.baseAddress!, byteCount: got.pairs * pairBytes)
                    }
                    return got
                }
                have += got.pairs
                next = got.next
                isLast = got.isLast
            }
            SparseKernels.add(vector, count: have, into: acc)
        }
        FloatKernels.divide(acc, acc, count: count, divisor: Float(workers.count))

        // The nonzero entries of the average, the same bytes to every worker.
        let nonzero = (0..<count).reduce(0) { acc[$1] != 0 ? $0 + 1 : $0 }
        outgoing.reset(capacity: nonzero * pairBytes)
        let result = try outgoing.take(nonzero * pairBytes)
        _ = SparseKernels.gatherNonzero(acc, count: count, into: result)
        for w in workers {
            try sendSparse(pairs: nonzero, perMessage: options.chunkBytes) { first, m, isLast in
                let h = WireHeader(kind: .starResult, sender: transport.rank, tag: tag, offset: range.lowerBound, count: m,
                                   encoding: .sparse, isLast: isLast)
                try transport.send(control: header.encode(h),
                                   payload: UnsafeRawBufferPointer(start: result + first * pairBytes, count: m * pairBytes),
                                   to: w)
            }
        }
    }}

/// The star hub failed while serving a run: at which step and bucket, and why.
public struct StarHubError: Error, CustomStringConvertible {
    public let step: Int
    public let bucket: Int
    public let underlying: any Error

    public var description: String { "star hub failed at step \(step), bucket \(bucket): \(underlying)" }
}

// MARK: - Tree

/// Rank r's parent in the binary reduction tree rooted at rank 0: (r−1)/2; nil for the root.
public func treeParent(_ r: Int) -> Int? { r > 0 ? (r - 1) / 2 : nil }

/// Rank r's children in the binary reduction tree of `n` ranks: 2r+1 and 2r+2, those below n.
public func treeChildren(_ r: Int, worldSize n: Int) -> [Int] { [2 * r + 1, 2 * r + 2].filter { $0 < n } }

/// Tree all-reduce (FireCaffe's reduction tree): partial sums go up a binary tree rooted at rank 0
/// (rank r's parent is (r−1)/2, its children 2r+1 and 2r+2), the root divides by N once and the
/// average comes back down.
///
/// Chunk by chunk (`options.chunkBytes`), a rank adds its children's partial sums onto its own values
/// (own + child 2r+1 + child 2r+2, in that order, straight from the receive buffer for Float32) and
/// sends the sum to its parent at once, so a chunk climbs while the next is still arriving below.
/// The root divides each finished chunk by N and sends it to its children, which take it over and
/// pass the same bytes on, so every rank ends bit-identical and the order of the sums is fixed.
/// Per call a rank sends and receives 4 × count payload bytes per tree edge it has (a leaf 4n each
/// way, an inner node with c children 4n(1 + c), the root 4nc): see `treePayloadBytes`. In all 2(N−1)
/// × 4n, as much as the ring, but the inner nodes carry three times a leaf's share.
///
/// Compression (the same on every rank): fp16, bf16 and int8 chunks are encoded on every edge. A rank
/// decodes its children's partial sums, adds them to its own values in Float32 and encodes the sum for
/// its parent; the root encodes the average once and keeps its decoded form, which the others pass on
/// unchanged. With int8 a rank's own values enter the sum as deq(q(g + residual)) per chunk and the
/// rest stays in its residual (error feedback, as in the ring); the partial sums re-encoded on the way
/// up get none: that error belongs to no single rank. A value crosses at most ⌊log₂ N⌋ re-encodings
/// of partial sums on its way to the root (the ring: N − 2), plus the average's one encoding.
/// topk is refused (`CommError.invalidArgument`): a sparse partial sum grows with every merge, so
/// the tree would move no fewer bytes than a gather; use the ring or the star.
public final class TreeAllReduce<T: Transport>: PeerCollective<T>, AllReducer {
    public func allReduceAverage(_ buffer: UnsafeMutableBufferPointer<Float>, range: Range<Int>, tag: CollectiveTag) throws {
        try checkCollectiveRange(range, bufferCount: buffer.count)
        if case .topk = compression {
            throw CommError.invalidArgument("the tree all-reduce does not take topk compression (sparse partial sums grow on the way up): use the ring or the star")
        }
        guard transport.worldSize > 1, !range.isEmpty else { return }
        let p = buffer.baseAddress! + range.lowerBound
        try transport.collective(timeout: options.timeout) {
            if let codec = DenseCodec(compression) {
                let feedback = compression == .int8 ? residual.base(forBufferOf: buffer.count) + range.lowerBound : nil
                try reduce(codec, p, count: range.count, base: range.lowerBound, residual: feedback, tag: tag)
            } else {
                try reduce(Float32Codec(), p, count: range.count, base: range.lowerBound, residual: nil, tag: tag)
            }
        }
    }

    /// The tree's schedule for p[0..<count] (elements base..<base+count of the caller's buffer): up,
    /// then down, chunk by chunk through `codec`. `residual` (int8 only) is the error feedback of p.
    private func reduce<C: ChunkCodec>(_ codec: C, _ p: UnsafeMutablePointer<Float>, count: Int, base: Int,
                                       residual: UnsafeMutablePointer<Float>?, tag: CollectiveTag) throws {
        let r = transport.rank, parent = treeParent(r), children = treeChildren(r, worldSize: transport.worldSize)
        let chunk = options.chunkElements, timeout = options.timeout, divisor = Float(transport.worldSize)
        // Encoded once on the way up; an inner node also keeps a copy of each chunk it passes down.
        let passes = parent != nil && !children.isEmpty ? 2 : 1
        outgoing.reset(capacity: passes * codec.scratchBytes(count: count, chunkBytes: options.chunkBytes))

        func wireHeader(_ kind: WireHeader.Kind, from sender: Int, _ start: Int, _ length: Int) -> WireHeader {
            WireHeader(kind: kind, sender: sender, tag: tag, offset: base + start, count: length, encoding: codec.encoding)
        }
        func send(_ kind: WireHeader.Kind, _ start: Int, _ length: Int, _ payload: UnsafeRawPointer, to peers: [Int]) throws {
            let control = header.encode(wireHeader(kind, from: r, start, length))
            for peer in peers {
                try transport.send(control: control, payload: UnsafeRawBufferPointer(start: payload, count: codec.payloadBytes(count: length)),
                                   to: peer)
            }
        }

        // Up: our values plus our children's partial sums, on to the parent; at the root, divided by
        // N and sent down (an encoded average kept in its decoded form, as the others get it).
        try forEachChunk(0..<count, chunk) { off, len in
            guard !children.isEmpty else {  // a leaf
                let out = try codec.encodeOwn(p + off, residual: residual.map { $0 + off }, count: len, scratch: outgoing)
                return try send(.treeReduce, off, len, out, to: [parent!])
            }
            codec.contribute(p + off, residual: residual.map { $0 + off }, count: len, scratch: contribution)
            for (i, child) in children.enumerated() {
                let expected = wireHeader(.treeReduce, from: child, off, len)
                try transport.receive(from: child, timeout: timeout) { control, payload in
                    try WireHeader.validate(control: control, payload: payload, from: child, expected: expected)
                    codec.accumulate(payload.baseAddress!, into: p + off, count: len, first: false,
                                     divisor: parent == nil && i == children.count - 1 ? divisor : nil)
                }
            }
            let out = try codec.encodeSum(p + off, count: len, keepDecoded: parent == nil, scratch: outgoing)
            if let parent {
                try send(.treeReduce, off, len, out, to: [parent])
            } else {
                try send(.treeBroadcast, off, len, out, to: children)
            }
        }

        // Down: take over each chunk of the average and pass its bytes on to our children.
        guard let parent else { return }
        try forEachChunk(0..<count, chunk) { off, len in
            let expected = wireHeader(.treeBroadcast, from: parent, off, len)
            let forward = try transport.receive(from: parent, timeout: timeout) { control, payload in
                try WireHeader.validate(control: control, payload: payload, from: parent, expected: expected)
                return try codec.assign(payload.baseAddress!, into: p + off, count: len, forwarding: !children.isEmpty, scratch: outgoing)
            }
            if let forward { try send(.treeBroadcast, off, len, forward, to: children) }
        }
    }
}

extension RingAllReduce: ErrorFeedbackReducer {}

extension StarAllReduceWorker: ErrorFeedbackReducer {
    public func errorFeedback(count: Int) -> [Float] { residual.snapshot(count: count) }
    public func restoreErrorFeedback(_ saved: [Float]) { residual.restore(saved) }
}

extension TreeAllReduce: ErrorFeedbackReducer {}
