// Star all-reduce: every worker sends its range to a hub (the coordinator), which averages and sends
// the result back. The worker's side, then the hub's.

import SqueezeSystem
import SqueezeTransport

/// The worker side of a star all-reduce: send the whole range to the hub (in chunks),
/// receive the average back. Per call a worker sends and receives 4 × count payload bytes.
///
/// With compression (the same on every worker and the hub): fp16, bf16 and int8 chunks are
/// encoded both ways, the hub summing decoded values in Float32 (int8 with error feedback
/// on the worker, as in the ring); with topk:F the worker sends its k largest entries of
/// g + residual as a sparse vector and gets back the nonzero entries of the average.
public final class StarAllReduceWorker<T: Transport>: PeerCollective<T>, AllReducer {
    public let hub: Int

    public init(transport: T, hub: Int, options: CollectiveOptions = CollectiveOptions(),
                compression: GradientCompression = .none) {
        self.hub = hub
        super.init(transport: transport, options: options, compression: compression)
    }

    /// Workers of the group: every rank except the hub.
    public override var participants: Int { transport.worldSize - 1 }

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
            let bytes = codec.payloadBytes(count: len)
            try traced(tracer, .allReduce, "send", "send", ["to": hub, "bytes": bytes]) {
                try transport.send(control: header.encode(h), payload: UnsafeRawBufferPointer(start: out, count: bytes), to: hub)
            }
        }
        try forEachChunk(range, chunk) { off, len in
            let expected = WireHeader(kind: .starResult, sender: hub, tag: tag, offset: off, count: len, encoding: codec.encoding)
            _ = try traced(tracer, .allReduce, "receive", "receive", ["from": hub, "bytes": codec.payloadBytes(count: len)]) {
                try transport.receive(from: hub, timeout: options.timeout) { control, payload in
                    try WireHeader.validate(control: control, payload: payload, from: hub, expected: expected)
                    return try codec.assign(payload.baseAddress!, into: p + off, count: len, forwarding: false, scratch: outgoing)
                }
            }
        }
    }

    /// `p` is the start of the range.
    private func gatherSparse(fraction: Double, _ p: UnsafeMutablePointer<Float>, range: Range<Int>,
                              residual: UnsafeMutablePointer<Float>, tag: CollectiveTag) throws {
        let r = transport.rank, count = range.count, pairBytes = SparseKernels.pairBytes
        let k = options.topkPairs(fraction, count: count, tag: tag)
        outgoing.reset(capacity: k * pairBytes)
        let vector = try outgoing.take(k * pairBytes)
        accumulate(p, count: count, base: range.lowerBound, residual: residual)
        let pairs = SparseKernels.extractTopK(residual, count: count, k: k, into: vector)
        maskSent(count: count, base: range.lowerBound, residual: residual)
        try sendSparse(pairs: pairs, perMessage: options.chunkBytes) { first, m, isLast in
            let h = WireHeader(kind: .starContribution, sender: r, tag: tag, offset: range.lowerBound, count: m,
                               encoding: .sparse, isLast: isLast)
            try transport.send(control: header.encode(h),
                               payload: UnsafeRawBufferPointer(start: vector + first * pairBytes, count: m * pairBytes), to: hub)
        }

        p.update(repeating: 0, count: count)
        let expected = WireHeader(kind: .starResult, sender: hub, tag: tag, offset: range.lowerBound, count: 0, encoding: .sparse)
        _ = try transport.receiveSparse(from: hub, expected: expected, rangeCount: count, limit: count, owner: hub, timeout: options.timeout,
                                        take: { pairs, _, m in SparseKernels.assign(pairs, count: m, into: p) })
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
    /// Records each chunk's sends, receives and reduces (nil: not traced).
    public var tracer: Tracer?
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
                try traced(tracer, .allReduce, "receive", "receive", ["from": w, "bytes": codec.payloadBytes(count: len)]) {
                    try transport.receive(from: w, timeout: options.timeout) { control, payload in
                        try WireHeader.validate(control: control, payload: payload, from: w, expected: expected)
                        traced(tracer, .allReduce, "reduce", "reduce", ["elements": len]) {
                            codec.accumulate(payload.baseAddress!, into: acc + off, count: len, first: i == 0,
                                             divisor: i == workers.count - 1 ? divisor : nil)
                        }
                    }
                }
            }
            let out = try codec.encodeSum(acc + off, count: len, keepDecoded: false, scratch: outgoing)
            let control = header.encode(WireHeader(kind: .starResult, sender: r, tag: tag, offset: offset, count: len,
                                                   encoding: codec.encoding))
            let bytes = codec.payloadBytes(count: len)
            for w in workers {
                try traced(tracer, .allReduce, "send", "send", ["to": w, "bytes": bytes]) {
                    try transport.send(control: control, payload: UnsafeRawBufferPointer(start: out, count: bytes), to: w)
                }
            }
        }
    }

    private func reduceSparse(fraction: Double, range: Range<Int>, tag: CollectiveTag) throws {
        let acc = scratch.baseAddress!, count = range.count, pairBytes = SparseKernels.pairBytes
        let k = options.topkPairs(fraction, count: count, tag: tag)
        acc.update(repeating: 0, count: count)
        incoming.reset(capacity: k * pairBytes)
        let vector = try incoming.take(k * pairBytes)
        for w in workers {
            let expected = WireHeader(kind: .starContribution, sender: w, tag: tag, offset: range.lowerBound, count: 0,
                                      encoding: .sparse)
            let have = try transport.receiveSparse(
                from: w, expected: expected, rangeCount: count, limit: k, owner: w, timeout: options.timeout,
                take: { pairs, first, m in (vector + first * pairBytes).copyMemory(from: pairs, byteCount: m * pairBytes) })
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
    }
}
