// Gradient compression for the collectives: the setting, and the state it needs.
//
// The point of the project is to measure how many bytes data-parallel training moves; these
// options trade accuracy of the averaged gradient for fewer of them:
//
//   none   Float32, the exact schedule and bytes of the uncompressed ring and star.
//   fp16   IEEE half precision, 2 bytes per element (range ±65504: large gradients overflow).
//   bf16   bfloat16, 2 bytes per element, Float32's range with an 8-bit significand.
//   int8   1 byte per element plus a Float32 scale per message, with error feedback.
//   topk:F the largest F of the entries of each rank, as (index, value) pairs, with error
//          feedback (Deep Gradient Compression, Lin et al. 2018).
//
// Half-width and int8 values are summed in Float32 at every hop; sparse vectors are gathered,
// not summed on the way, and every rank adds them up in rank order. Either way every rank
// ends with the same bits (see RingAllReduce).

import Foundation
import SqueezeTransport

/// How gradients travel in a collective. Every rank of a group (and the star hub) must use
/// the same setting. The text form (`description`, `init(parsing:)`) is what command lines
/// and configuration files use: "none", "fp16", "bf16", "int8", "topk:0.01".
public enum GradientCompression: Sendable, Hashable, Codable, CustomStringConvertible {
    case none, fp16, bf16, int8
    /// The `fraction` (0 < fraction ≤ 1) of largest-magnitude entries of each rank's range.
    case topk(fraction: Double)

    /// The accepted forms, for error messages and help texts.
    public static let validForms = "none, fp16, bf16, int8 or topk:F with 0 < F ≤ 1 (e.g. topk:0.01)"

    public init(parsing text: String) throws {
        switch text {
        case "none": self = .none
        case "fp16": self = .fp16
        case "bf16": self = .bf16
        case "int8": self = .int8
        default:
            guard text.hasPrefix("topk:") else {
                throw CommError.invalidArgument("unknown gradient compression \"\(text)\"; expected \(Self.validForms)")
            }
            guard let fraction = Double(text.dropFirst(5)), fraction > 0, fraction <= 1 else {
                throw CommError.invalidArgument(
                    "gradient compression \"\(text)\": the top-k fraction must be a number with 0 < F ≤ 1; expected \(Self.validForms)")
            }
            self = .topk(fraction: fraction)
        }
    }

    /// int8 and topk keep what they leave out in a residual for the next call.
    public var usesErrorFeedback: Bool {
        switch self {
        case .int8, .topk: true
        case .none, .fp16, .bf16: false
        }
    }

    /// The text form; `GradientCompression(parsing: c.description) == c`.
    public var description: String {
        switch self {
        case .none: "none"
        case .fp16: "fp16"
        case .bf16: "bf16"
        case .int8: "int8"
        case .topk(let fraction): "topk:\(fraction)"  // Double's description is the shortest exact round trip
        }
    }

    /// Encoded as its text form, so configurations stay readable.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        let text = try container.decode(String.self)
        do {
            self = try GradientCompression(parsing: text)
        } catch {
            throw DecodingError.dataCorruptedError(in: container, debugDescription: "\(error)")
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }

    /// The payload encoding of this setting's messages.
    public var encoding: WireHeader.Encoding {
        switch self {
        case .none: .float32
        case .fp16: .float16
        case .bf16: .bfloat16
        case .int8: .int8
        case .topk: .sparse
        }
    }

    /// k, the number of entries a rank selects from a range of `count` elements with top-k
    /// compression: round(fraction × count), at least 1 and at most `count` (0 for an empty
    /// range). A rank sends at most k pairs: selected entries that are exactly zero carry
    /// nothing and are left out.
    public static func topkPairs(fraction: Double, count: Int) -> Int {
        guard count > 0 else { return 0 }
        return min(count, max(1, Int((fraction * Double(count)).rounded())))
    }

    /// Payload bytes that carry `count` elements once (one hop of a ring, one direction of a
    /// star), cut into messages of chunkBytes/4 elements as the collectives do: 4 × count for
    /// none, 2 × count for fp16 and bf16, count + 4 × messages for int8 (a Float32 scale per
    /// message). nil for topk, whose size depends on the data (8 bytes per pair sent).
    public func densePayloadBytes(count: Int, chunkBytes: Int) -> Int? {
        if case .topk = self { return nil }
        let chunk = max(1, chunkBytes / MemoryLayout<Float>.size)
        let full = count / chunk, tail = count % chunk
        return full * encoding.payloadBytes(count: chunk) + (tail > 0 ? encoding.payloadBytes(count: tail) : 0)
    }

    /// Stops a reducer from being built with a fraction `init(parsing:)` would reject.
    func checkValid() {
        if case .topk(let fraction) = self {
            precondition(fraction > 0 && fraction <= 1, "top-k fraction \(fraction) outside 0 < F ≤ 1")
        }
    }
}

/// Grow-only raw memory owned by a collective object and reused from call to call.
///
/// A transport may transmit a payload without copying it (ZeroMQ lends it to its I/O thread),
/// so every compressed message of one call needs bytes of its own, untouched until
/// `completeSends`. `reset` sizes the memory for a call and `take` hands out consecutive,
/// distinct pieces of it; the next call's `reset` may reuse or free them.
final class ScratchBytes {
    private var base = UnsafeMutableRawPointer.allocate(byteCount: 16, alignment: 16)
    private var capacity = 16
    private var used = 0

    deinit { base.deallocate() }

    /// Makes room for `bytes` in all and starts handing out from the beginning. Pointers
    /// taken before are invalid afterwards: call it only between collectives.
    func reset(capacity bytes: Int) {
        if bytes > capacity {
            base.deallocate()
            base = .allocate(byteCount: bytes, alignment: 16)
            capacity = bytes
        }
        used = 0
    }

    /// The next `bytes` bytes. Throws rather than hand out memory beyond what `reset` sized (a
    /// collective that miscounted its messages, e.g. for a peer's unexpected sizes).
    func take(_ bytes: Int) throws -> UnsafeMutableRawPointer {
        guard bytes >= 0, used + bytes <= capacity else {
            throw CommError.invalidArgument("scratch of \(capacity) bytes cannot give \(bytes) more after \(used) (a collective miscounted its messages)")
        }
        defer { used += bytes }
        return base + used
    }

    /// The first `bytes` bytes, for a buffer reused piece after piece (not for sends).
    func reusable(_ bytes: Int) -> UnsafeMutableRawPointer {
        reset(capacity: bytes)
        used = bytes
        return base
    }
}

/// Error feedback: what compression left out of this rank's gradients so far, added to the
/// next gradients before they are compressed, so that nothing is lost for good, only late.
///
/// Indexed by absolute position in the caller's buffer: callers reduce different ranges
/// (buckets) of one gradient buffer with one reducer, and each element must meet its own
/// residual. Allocated on first use, zero-filled, growing with the largest buffer seen.
final class Residual {
    private var values = UnsafeMutableBufferPointer<Float>(start: nil, count: 0)

    deinit { values.deallocate() }

    /// The residual of element 0 of a buffer of `count` elements.
    func base(forBufferOf count: Int) -> UnsafeMutablePointer<Float> {
        if values.count < count || values.baseAddress == nil {
            let grown = UnsafeMutableBufferPointer<Float>.allocate(capacity: max(count, 1))
            grown.initialize(repeating: 0)
            if values.count > 0 { grown.baseAddress!.update(from: values.baseAddress!, count: values.count) }
            values.deallocate()
            values = grown
        }
        return values.baseAddress!
    }

    /// The first `count` values (zeros beyond what has been allocated so far).
    func snapshot(count: Int) -> [Float] {
        (0..<count).map { $0 < values.count ? values[$0] : 0 }
    }

    /// Replaces the residual by `saved` (from `snapshot`).
    func restore(_ saved: [Float]) {
        let base = base(forBufferOf: saved.count)
        base.update(from: saved, count: saved.count)
        (base + saved.count).update(repeating: 0, count: values.count - saved.count)
    }
}

/// A reducer that keeps an error-feedback residual (int8 and topk): gradient mass it has not
/// sent yet. A checkpoint saves it, so that a resumed run loses none of it.
public protocol ErrorFeedbackReducer: AllReducer {
    /// The residual of a gradient buffer of `count` elements; with DGC's momentum correction followed
    /// by the velocity (2 × `count` values).
    func errorFeedback(count: Int) -> [Float]
    /// Continues with `saved` (from `errorFeedback` of `count`) instead of what is held now; `count`
    /// values alone leave the velocity at zero.
    func restoreErrorFeedback(_ saved: [Float], count: Int)
}

/// Deep Gradient Compression's additions to top-k (Lin et al., ICLR 2018), each off unless set. A
/// rank applies them to its own gradients g (one call's range: a bucket) before it picks its top k:
/// - `clipNorm` C, local gradient clipping: g is scaled down to L2 norm C/√N if it is longer, N the
///   number of participants (the sum of N such gradients then has a norm of about C).
/// - `momentumCorrection`, with `momentum` μ and `nesterov`: the rank keeps a velocity of its own,
///   u ← μ·u + g, and accumulates u (Nesterov: g + μ·u) in its residual instead of g; the entries it
///   sends leave the velocity too (momentum factor masking). The optimizer then applies the average
///   without momentum on the gradients (`SGD.momentumCorrected`).
/// - `warmupEpochs` E, sparsity warm-up: during epoch e < E (of `stepsPerEpoch` steps) a rank keeps
///   the fraction F^((e+1)/(E+1)) instead of F, so the sparsity rises exponentially to the target
///   (DGC's warm-up; with F = 0.01 and E = 3: 31.6%, 10%, 3.2%, then 1%).
public struct DGCOptions: Sendable, Equatable {
    public var momentumCorrection = false
    public var momentum: Float = 0
    public var nesterov = false
    public var clipNorm: Float?
    public var warmupEpochs = 0
    public var stepsPerEpoch = 1

    public init(momentumCorrection: Bool = false, momentum: Float = 0, nesterov: Bool = false, clipNorm: Float? = nil,
                warmupEpochs: Int = 0, stepsPerEpoch: Int = 1) {
        self.momentumCorrection = momentumCorrection; self.momentum = momentum; self.nesterov = nesterov
        self.clipNorm = clipNorm; self.warmupEpochs = warmupEpochs; self.stepsPerEpoch = max(stepsPerEpoch, 1)
    }

    /// The fraction a rank keeps at `step` when the run's top-k fraction is `target`.
    public func fraction(_ target: Double, step: Int) -> Double {
        let epoch = step / stepsPerEpoch
        guard epoch < warmupEpochs else { return target }
        return max(target, pow(target, Double(epoch + 1) / Double(warmupEpochs + 1)))
    }
}
