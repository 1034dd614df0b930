import SqueezeComm

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

    var parameters: Int { plan.reduce(0) { $0 + $1.count } }

    /// Float32 payload bytes a worker sends per step: 2(N−1)/N × 4P for the ring, 4P for the star.
    public var uncompressedBytesSent: Double {
        let p = 4 * Double(parameters), n = Double(workers)
        return algorithm == .ring ? 2 * (n - 1) / n * p : p
    }

    /// Exactly what rank `rank` sends per step without compression (the ring's segments differ by
    /// at most one element between ranks): the reference of its compression ratio.
    public func uncompressedBytesSent(rank: Int) -> Int {
        algorithm == .star ? 4 * parameters : plan.reduce(0) {
            $0 + ringPayloadBytes(count: $1.count, worldSize: workers, rank: rank).sent
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
        let total = (0..<workers).reduce(0) { sum, rank in
            sum + plan.reduce(0) { acc, bucket in
                acc + (algorithm == .ring
                    ? ringPayloadBytes(count: bucket.count, worldSize: workers, rank: rank,
                                       compression: compression, chunkBytes: chunkBytes)!.sent
                    : compression.densePayloadBytes(count: bucket.count, chunkBytes: chunkBytes)!)
            }
        }
        return Double(total) / Double(workers)
    }
}
