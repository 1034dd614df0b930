// All-reduce (average) of Float buffers: ring and star.

/// Settings shared by the collectives. Every rank of a group must use the same chunk size.
public struct CollectiveOptions: Sendable {
    /// Payload bytes per message; segments are cut into chunks of this size so that
    /// receiving, reducing and forwarding overlap. The 1 MiB default was the fastest of
    /// 64 KiB…4 MiB for 727,626 Floats over tcp loopback with 2 and 4 processes on a
    /// 2-core machine: each message costs syscalls and thread wake-ups, which outweigh
    /// finer pipelining there.
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

/// Reusable 32-byte header scratch (one allocation per collective object, not per message).
final class HeaderScratch {
    let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: WireHeader.size, alignment: 8)
    deinit { bytes.deallocate() }

    func encode(_ h: WireHeader) -> UnsafeRawBufferPointer {
        h.encode(into: bytes)
        return UnsafeRawBufferPointer(bytes)
    }
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
/// payload bytes, exactly `expectedPayloadBytes`.
public final class RingAllReduce<T: Transport>: AllReducer {
    public let transport: T
    public let options: CollectiveOptions
    private let header = HeaderScratch()

    public init(transport: T, options: CollectiveOptions = CollectiveOptions()) {
        self.transport = transport
        self.options = options
    }

    public var participants: Int { transport.worldSize }

    /// Payload bytes rank `rank` sends and receives in one ring all-reduce of `count` Floats:
    /// it sends every segment but r+1 in reduce-scatter and every segment but r+2 in
    /// all-gather; it receives every segment but r, then every segment but r+1.
    public static func expectedPayloadBytes(count: Int, worldSize n: Int, rank r: Int) -> (sent: Int, received: Int) {
        guard n > 1 else { return (0, 0) }
        let size = { (k: Int) in evenSegment(((k % n) + n) % n, of: n, count: count).count }
        let sent = 2 * count - size(r + 1) - size(r + 2)
        let received = 2 * count - size(r) - size(r + 1)
        return (sent * 4, received * 4)
    }

    /// Messages (hence headers) rank `rank` sends and receives, given the chunking.
    public static func expectedMessages(count: Int, worldSize n: Int, rank r: Int,
                                        chunkBytes: Int) -> (sent: Int, received: Int) {
        guard n > 1 else { return (0, 0) }
        let chunk = max(1, chunkBytes / 4)
        let chunks = { (k: Int) in chunkCount(evenSegment(((k % n) + n) % n, of: n, count: count).count, chunk: chunk) }
        let all = (0..<n).reduce(0) { $0 + chunks($1) }
        return (2 * all - chunks(r + 1) - chunks(r + 2), 2 * all - chunks(r) - chunks(r + 1))
    }

    public func allReduceAverage(_ buffer: UnsafeMutableBufferPointer<Float>, range: Range<Int>, tag: CollectiveTag) throws {
        guard range.lowerBound >= 0, range.upperBound <= buffer.count else {
            throw CommError.invalidArgument("range \(range) outside a buffer of \(buffer.count) Floats")
        }
        let n = transport.worldSize
        guard n > 1, !range.isEmpty else { return }
        do {
            try run(buffer.baseAddress! + range.lowerBound, count: range.count, base: range.lowerBound, tag: tag, n: n)
            try transport.completeSends(timeout: options.timeout)
        } catch {
            transport.abandonSends()
            throw error
        }
    }

    private func run(_ p: UnsafeMutablePointer<Float>, count: Int, base: Int, tag: CollectiveTag, n: Int) throws {
        let r = transport.rank
        let right = (r + 1) % n, left = (r + n - 1) % n
        let chunk = options.chunkElements, timeout = options.timeout
        let divisor = Float(n)
        let segment = { (k: Int) in evenSegment(((k % n) + n) % n, of: n, count: count) }

        func send(_ kind: WireHeader.Kind, step: Int, _ start: Int, _ length: Int) throws {
            let h = WireHeader(kind: kind, sender: r, phaseStep: step, tag: tag, offset: base + start, count: length)
            try transport.send(control: header.encode(h),
                               payload: UnsafeRawBufferPointer(start: p + start, count: length * 4), to: right)
        }

        // Reduce-scatter, step 0: our own segment r goes out whole, chunk by chunk.
        let first = segment(r)
        for off in stride(from: first.lowerBound, to: first.upperBound, by: chunk) {
            try send(.reduceScatter, step: 0, off, min(chunk, first.upperBound - off))
        }

        // Reduce-scatter: add each arriving chunk of segment r−s−1 and forward it at once
        // (as step s+1, or, after the last step, divided by N as all-gather step 0).
        for s in 0..<(n - 1) {
            let seg = segment(r - s - 1)
            let last = s == n - 2
            for off in stride(from: seg.lowerBound, to: seg.upperBound, by: chunk) {
                let len = min(chunk, seg.upperBound - off)
                let expected = WireHeader(kind: .reduceScatter, sender: left, phaseStep: s, tag: tag,
                                          offset: base + off, count: len)
                try transport.receive(from: left, timeout: timeout) { control, payload in
                    try WireHeader.validate(control: control, payload: payload, from: left, expected: expected)
                    if last {
                        FloatKernels.addAndDivide(p + off, payload.baseAddress!, count: len, divisor: divisor)
                    } else {
                        FloatKernels.add(p + off, payload.baseAddress!, count: len)
                    }
                }
                if last {
                    try send(.allGather, step: 0, off, len)
                } else {
                    try send(.reduceScatter, step: s + 1, off, len)
                }
            }
        }

        // All-gather: copy each arriving final chunk of segment r−s and pass it on.
        for s in 0..<(n - 1) {
            let seg = segment(r - s)
            for off in stride(from: seg.lowerBound, to: seg.upperBound, by: chunk) {
                let len = min(chunk, seg.upperBound - off)
                let expected = WireHeader(kind: .allGather, sender: left, phaseStep: s, tag: tag,
                                          offset: base + off, count: len)
                try transport.receive(from: left, timeout: timeout) { control, payload in
                    try WireHeader.validate(control: control, payload: payload, from: left, expected: expected)
                    FloatKernels.copy(p + off, payload.baseAddress!, count: len)
                }
                if s < n - 2 { try send(.allGather, step: s + 1, off, len) }
            }
        }
    }
}

// MARK: - Star

/// The worker side of a star all-reduce: send the whole range to the hub (in chunks),
/// receive the average back. Per call a worker sends and receives 4 × count payload bytes.
public final class StarAllReduceWorker<T: Transport>: AllReducer {
    public let transport: T
    public let hub: Int
    public let options: CollectiveOptions
    private let header = HeaderScratch()

    public init(transport: T, hub: Int, options: CollectiveOptions = CollectiveOptions()) {
        self.transport = transport
        self.hub = hub
        self.options = options
    }

    /// Workers of the group: every rank except the hub.
    public var participants: Int { transport.worldSize - 1 }

    public func allReduceAverage(_ buffer: UnsafeMutableBufferPointer<Float>, range: Range<Int>, tag: CollectiveTag) throws {
        guard range.lowerBound >= 0, range.upperBound <= buffer.count else {
            throw CommError.invalidArgument("range \(range) outside a buffer of \(buffer.count) Floats")
        }
        guard !range.isEmpty else { return }
        let p = buffer.baseAddress!
        let r = transport.rank, chunk = options.chunkElements
        do {
            for off in stride(from: range.lowerBound, to: range.upperBound, by: chunk) {
                let len = min(chunk, range.upperBound - off)
                let h = WireHeader(kind: .starContribution, sender: r, tag: tag, offset: off, count: len)
                try transport.send(control: header.encode(h),
                                   payload: UnsafeRawBufferPointer(start: p + off, count: len * 4), to: hub)
            }
            for off in stride(from: range.lowerBound, to: range.upperBound, by: chunk) {
                let len = min(chunk, range.upperBound - off)
                let expected = WireHeader(kind: .starResult, sender: hub, tag: tag, offset: off, count: len)
                try transport.receive(from: hub, timeout: options.timeout) { control, payload in
                    try WireHeader.validate(control: control, payload: payload, from: hub, expected: expected)
                    FloatKernels.copy(p + off, payload.baseAddress!, count: len)
                }
            }
            try transport.completeSends(timeout: options.timeout)
        } catch {
            transport.abandonSends()
            throw error
        }
    }
}

/// The hub side of a star all-reduce (the coordinator, not a worker): receives every
/// worker's range, sums in worker order (so the result is deterministic), divides by the
/// number of workers and sends the average back to each. Per call the hub receives and
/// sends 4 × count × workers payload bytes.
public final class StarAllReduceHub<T: Transport> {
    public let transport: T
    /// Worker ranks, in summation order.
    public let workers: [Int]
    public let options: CollectiveOptions
    private let header = HeaderScratch()
    private var scratch = UnsafeMutableBufferPointer<Float>(start: nil, count: 0)

    public init(transport: T, workers: [Int]? = nil, options: CollectiveOptions = CollectiveOptions()) {
        self.transport = transport
        self.workers = workers ?? (0..<transport.worldSize).filter { $0 != transport.rank }
        self.options = options
    }

    deinit { scratch.deallocate() }

    /// Serves one all-reduce of the workers' `range` (the range they pass; the hub needs
    /// no buffer of its own: it reduces into an internal scratch buffer, reused across calls).
    public func reduce(range: Range<Int>, tag: CollectiveTag) throws {
        guard range.lowerBound >= 0, !workers.isEmpty else {
            throw CommError.invalidArgument("range \(range) with \(workers.count) workers")
        }
        guard !range.isEmpty else { return }
        if scratch.count < range.count {
            scratch.deallocate()
            scratch = .allocate(capacity: range.count)
        }
        let acc = scratch.baseAddress!
        let r = transport.rank, chunk = options.chunkElements, divisor = Float(workers.count)
        do {
            for off in stride(from: 0, to: range.count, by: chunk) {
                let len = min(chunk, range.count - off)
                let offset = range.lowerBound + off
                for (i, w) in workers.enumerated() {
                    let expected = WireHeader(kind: .starContribution, sender: w, tag: tag, offset: offset, count: len)
                    try transport.receive(from: w, timeout: options.timeout) { control, payload in
                        try WireHeader.validate(control: control, payload: payload, from: w, expected: expected)
                        let src = payload.baseAddress!
                        if workers.count == 1 {
                            FloatKernels.divide(acc + off, src, count: len, divisor: divisor)
                        } else if i == 0 {
                            FloatKernels.copy(acc + off, src, count: len)
                        } else if i == workers.count - 1 {
                            FloatKernels.addAndDivide(acc + off, src, count: len, divisor: divisor)
                        } else {
                            FloatKernels.add(acc + off, src, count: len)
                        }
                    }
                }
                let h = WireHeader(kind: .starResult, sender: r, tag: tag, offset: offset, count: len)
                let control = header.encode(h)
                for w in workers {
                    try transport.send(control: control,
                                       payload: UnsafeRawBufferPointer(start: acc + off, count: len * 4), to: w)
                }
            }
            try transport.completeSends(timeout: options.timeout)
        } catch {
            transport.abandonSends()
            throw error
        }
    }

    /// Serves one all-reduce of `count` Floats starting at offset 0.
    public func reduce(count: Int, tag: CollectiveTag) throws {
        try reduce(range: 0..<count, tag: tag)
    }
}
