import Foundation

/// Per-layer forward and backward times of training steps, recorded while `Network.profile` is set
/// (`bench train --layers`). Each convolution and its BatchNorm are timed apart (a Fire module's three
/// convolutions each), pooling, dropout and the other layers as a whole; every entry gets one forward
/// and one backward sample per step, in the order the forward pass first meets them.
public final class LayerProfile {
    public struct Entry: Sendable {
        public let name: String
        /// What ran: oneDNN's implementation name (`dnnl_query_impl_info_str`) or a plain one (`im2col+sgemm`).
        public var implementation: String
        /// Floating-point operations of one call (2 per multiply-accumulate; backward counts the weight
        /// gradient and, when computed, the input gradient); 0 for layers without multiply-accumulates.
        public var forwardFLOPs = 0, backwardFLOPs = 0
        public var forwardSeconds = [Double](), backwardSeconds = [Double]()
    }

    public private(set) var entries = [Entry]()
    private var index = [String: Int]()

    public init() {}

    /// Forgets the samples (not the entries), e.g. after warm-up steps.
    public func clearSamples() {
        for i in entries.indices { entries[i].forwardSeconds = []; entries[i].backwardSeconds = [] }
    }

    /// Runs `body`, recording its wall time under `name`.
    func time<R>(_ name: String, _ implementation: @autoclosure () -> String, backward: Bool, flops: Int, _ body: () -> R) -> R {
        let start = DispatchTime.now().uptimeNanoseconds
        let result = body()
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
        let i = index[name] ?? {
            entries.append(Entry(name: name, implementation: implementation()))
            index[name] = entries.count - 1
            return entries.count - 1
        }()
        if backward {
            entries[i].backwardSeconds.append(seconds); entries[i].backwardFLOPs = flops
        } else {
            entries[i].forwardSeconds.append(seconds); entries[i].forwardFLOPs = flops
            entries[i].implementation = implementation()
        }
        return result
    }
}

/// Runs `body`, timed under `name` when `profile` is set.
@inline(__always)
func profiled<R>(_ profile: LayerProfile?, _ name: String, _ implementation: @autoclosure () -> String, backward: Bool,
                 flops: @autoclosure () -> Int = 0, _ body: () -> R) -> R {
    guard let profile else { return body() }
    return profile.time(name, implementation(), backward: backward, flops: flops(), body)
}
