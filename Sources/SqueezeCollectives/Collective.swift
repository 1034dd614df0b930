// What the all-reduces (ring, star, tree: one file each) share: their settings, the protocol they
// implement, the segment and chunk arithmetic, the state of a rank that takes part, and the sparse
// vectors' send and receive loops.

import SqueezeSystem
import SqueezeTransport

/// Settings shared by the collectives. Every rank of a group must use the same chunk size: the
/// coordinator sends it in the welcome.
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
    /// Deep Gradient Compression's additions to top-k (nil: plain top-k with error feedback). Every
    /// rank and the star's hub must use the same (the coordinator sends them in the welcome's config).
    public var dgc: DGCOptions?

    /// The chunk size a run uses unless told otherwise.
    public static let defaultChunkBytes = 1 << 20

    public init(chunkBytes: Int = defaultChunkBytes, timeout: Duration = .seconds(60)) {
        self.chunkBytes = chunkBytes
        self.timeout = timeout
    }

    var chunkElements: Int { max(1, chunkBytes / MemoryLayout<Float>.size) }

    /// k for a top-k of `count` elements at `tag`'s step: the run's fraction, or DGC's warm-up's then.
    func topkPairs(_ fraction: Double, count: Int, tag: CollectiveTag) -> Int {
        GradientCompression.topkPairs(fraction: dgc?.fraction(fraction, step: Int(tag.step)) ?? fraction, count: count)
    }
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

/// What the ring, the tree and the star's workers share: a rank that takes part with a buffer of its own,
/// its transport, the settings, and the reducer's own memory (headers, compressed payloads, the
/// error-feedback residual).
public class PeerCollective<T: Transport> {
    public let transport: T
    public let options: CollectiveOptions
    public let compression: GradientCompression
    /// Records each chunk's sends, receives and reduces (nil: not traced).
    public var tracer: Tracer?
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

    /// The number of buffers averaged: every rank of the group (the star leaves its hub out).
    public var participants: Int { transport.worldSize }

    /// DGC's momentum correction: this rank's velocity, indexed like `residual`.
    let velocity = Residual()

    /// The residual; with DGC's momentum correction the velocity follows it (2 × `count` values).
    public func errorFeedback(count: Int) -> [Float] {
        residual.snapshot(count: count) + (options.dgc?.momentumCorrection == true ? velocity.snapshot(count: count) : [])
    }

    /// Continues from `errorFeedback`'s values: `count` residuals, then as many velocities if there are
    /// twice as many (fewer: the velocity starts from zero).
    public func restoreErrorFeedback(_ saved: [Float], count: Int) {
        residual.restore(Array(saved.prefix(count)))
        velocity.restore(saved.count == 2 * count ? Array(saved.suffix(count)) : [Float](repeating: 0, count: count))
    }

    /// Adds this rank's gradients p[0..<count] to their residual, through DGC's local clipping and
    /// momentum correction when set (`DGCOptions`); `residual` and the velocity at `base` are p's.
    func accumulate(_ p: UnsafeMutablePointer<Float>, count: Int, base: Int, residual r: UnsafeMutablePointer<Float>) {
        guard let dgc = options.dgc else { return FloatKernels.add(r, UnsafeRawPointer(p), count: count) }
        if let c = dgc.clipNorm {
            let norm = (0..<count).reduce(Float(0)) { $0 + p[$1] * p[$1] }.squareRoot()
            let limit = c / Float(participants).squareRoot()
            if norm > limit { for i in 0..<count { p[i] *= limit / norm } }
        }
        guard dgc.momentumCorrection else { return FloatKernels.add(r, UnsafeRawPointer(p), count: count) }
        let u = velocity.base(forBufferOf: base + count) + base, mu = dgc.momentum
        for i in 0..<count {
            u[i] = mu * u[i] + p[i]
            r[i] += dgc.nesterov ? p[i] + mu * u[i] : u[i]
        }
    }

    /// DGC's momentum factor masking: after the top-k left the entries it sent at 0 in `residual`,
    /// the velocity of those entries restarts from 0 too.
    func maskSent(count: Int, base: Int, residual r: UnsafeMutablePointer<Float>) {
        guard options.dgc?.momentumCorrection == true else { return }
        let u = velocity.base(forBufferOf: base + count) + base
        for i in 0..<count where r[i] == 0 { u[i] = 0 }
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

extension Transport {
    /// Receives one sparse vector from `peer`: messages like `expected` (pairs over `rangeCount`
    /// elements, indices increasing along the whole vector) up to the one flagged last. `take(pairs,
    /// first, count)` gets each message's pairs while they are valid (in the transport's buffer);
    /// `then(first, count, isLast)` runs after each message. Returns the vector's number of pairs;
    /// throws if the vector of rank `owner` has more than `limit`.
    func receiveSparse(from peer: Int, expected: WireHeader, rangeCount: Int, limit: Int, owner: Int, timeout: Duration,
                       take: (UnsafeRawPointer, Int, Int) -> Void,
                       then: (Int, Int, Bool) throws -> Void = { _, _, _ in }) throws -> Int {
        var have = 0, next = 0, isLast = false
        while !isLast {
            let got = try receive(from: peer, timeout: timeout) { control, payload in
                let got = try WireHeader.validateSparse(control: control, payload: payload, from: peer, expected: expected,
                                                        rangeCount: rangeCount, next: next)
                guard have + got.pairs <= limit else {
                    throw CommError.malformedMessage(peer: peer, reason: "sparse vector of rank \(owner) has more than k = \(limit) pairs")
                }
                if got.pairs > 0 { take(payload.baseAddress!, have, got.pairs) }
                return got
            }
            try then(have, got.pairs, got.isLast)
            have += got.pairs
            next = got.next
            isLast = got.isLast
        }
        return have
    }
}

extension RingAllReduce: ErrorFeedbackReducer {}
extension StarAllReduceWorker: ErrorFeedbackReducer {}
extension TreeAllReduce: ErrorFeedbackReducer {}
