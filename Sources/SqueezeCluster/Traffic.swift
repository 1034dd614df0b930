import SqueezeCollectives
import SqueezeTransport
import SqueezeTraining

extension TrainingConfig {
    /// The collectives' view of `dgc` (Deep Gradient Compression's additions to top-k), nil without it.
    public var dgcOptions: DGCOptions? {
        dgc.map { DGCOptions(momentumCorrection: $0.momentumCorrection, momentum: momentum, nesterov: nesterov,
                             clipNorm: $0.localClipNorm, warmupEpochs: $0.warmupEpochs, stepsPerEpoch: $0.stepsPerEpoch) }
    }

}

extension DGCSettings {
    /// Why `compression` cannot take these settings, in the command line's words, or nil.
    public func refusal(_ compression: GradientCompression) -> String? {
        if case .topk = compression { return nil }
        return "\(flags.joined(separator: ", ")) refine\(flags.count == 1 ? "s" : "") top-k gradient compression, "
            + "and this run has --compress \(compression): add --compress topk:F (e.g. topk:0.01)"
    }
}

/// The theory of a step's all-reduce traffic, per worker, for a bucket plan: what the progress
/// display, the summary table and the metrics put next to the measured bytes.
public struct TrafficTheory: Sendable {
    public let plan: [Range<Int>]
    public let workers: Int
    public let algorithm: AllReduceAlgorithm
    public let compression: GradientCompression
    public let chunkBytes: Int

    public init(plan: [Range<Int>], workers: Int, algorithm: AllReduceAlgorithm, compression: GradientCompression,
                chunkBytes: Int = CollectiveOptions().chunkBytes) {
        (self.plan, self.workers, self.algorithm, self.compression, self.chunkBytes) = (plan, workers, algorithm, compression, chunkBytes)
    }

    /// The theory of step `step` under DGC's sparsity warm-up: top-k at that step's fraction.
    public func at(step: Int, dgc: DGCOptions?) -> TrafficTheory {
        guard let dgc, case .topk(let f) = compression, case let now = dgc.fraction(f, step: step), now != f else { return self }
        return TrafficTheory(plan: plan, workers: workers, algorithm: algorithm, compression: .topk(fraction: now), chunkBytes: chunkBytes)
    }

    var parameters: Int { plan.reduce(0) { $0 + $1.count } }

    /// Float32 payload bytes a worker sends per step: 2(N−1)/N × 4P for the ring and (on average over
    /// the ranks) the tree, 4P for the star.
    public var uncompressedBytesSent: Double {
        let p = 4 * Double(parameters), n = Double(workers)
        return algorithm == .star ? p : 2 * (n - 1) / n * p
    }

    /// Exactly what rank `rank` sends per step without compression (the ring's segments differ by
    /// at most one element between ranks): the reference of its compression ratio.
    public func uncompressedBytesSent(rank: Int) -> Int { denseBytesSent(rank: rank, compression: .none) }

    /// Exactly what rank `rank` sends per step with a dense codec (or none).
    func denseBytesSent(rank: Int, compression: GradientCompression) -> Int {
        plan.reduce(0) { acc, bucket in
            let sent = switch algorithm {
            case .ring: ringPayloadBytes(count: bucket.count, worldSize: workers, rank: rank, compression: compression, chunkBytes: chunkBytes)?.sent
            case .star: compression.densePayloadBytes(count: bucket.count, chunkBytes: chunkBytes)
            case .tree: treePayloadBytes(count: bucket.count, worldSize: workers, rank: rank, compression: compression, chunkBytes: chunkBytes)?.sent
            }
            return acc + (sent ?? 0)
        }
    }

    /// Payload bytes a worker sends per step with the compression, averaged over ranks.
    /// fp16/bf16: half of Float32; int8: a quarter plus a 4-byte scale per message; topk:F:
    /// 8 bytes per (index, value) pair, k = max(1, round(F × bucket)) per bucket, each worker's
    /// pairs crossing N−1 ring links (gathered) or one link to the hub (star).
    public var bytesSent: Double {
        if case .topk(let f) = compression {
            let pairs = plan.reduce(0) { $0 + GradientCompression.topkPairs(fraction: f, count: $1.count) }
            return Double(8 * pairs * (algorithm == .ring ? workers - 1 : 1))
        }
        if compression == .none { return uncompressedBytesSent }
        let total = (0..<workers).reduce(0) { $0 + denseBytesSent(rank: $1, compression: compression) }
        return Double(total) / Double(workers)
    }

    /// The theory on rank `rank`'s metrics line: the tree's own figure per rank (a leaf sends a third of
    /// what an inner node with two children sends), the mean over ranks (`bytesSent`) for ring and star.
    public func bytesSent(rank: Int) -> Double {
        algorithm == .tree ? Double(denseBytesSent(rank: rank, compression: compression)) : bytesSent
    }
}
