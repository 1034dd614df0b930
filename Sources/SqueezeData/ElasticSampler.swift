// Which records one worker trains on at each step of a run whose members change (issue 29).

/// A worker's samplers over an elastic run: from each step at which the members changed, the
/// `ShardedSampler` of that membership (its number of workers and this worker's rank), all with the
/// layout of the first (`ShardedSampler.resharded`).
///
/// Global batch k of an epoch is the same whoever trains it, so a change at a step boundary re-shards
/// the rest of the epoch: the remaining global batches are divided over the new members (the first
/// B mod N ranks taking one record more) and no record of the epoch is skipped or trained twice, except
/// what the layout itself does (the padding that repeats the order's first records, and the dropped
/// partial batch at the epoch's end).
public struct ElasticSampler: Sendable, Equatable {
    /// From step `fromStep` (0-based, counted over the whole run) on, `sampler` applies.
    public struct Segment: Sendable, Equatable {
        public var fromStep: Int
        public var sampler: ShardedSampler
    }

    /// In increasing `fromStep`; the first holds from step 0 (or from where this worker joined).
    public private(set) var segments: [Segment]

    /// `first` applies from `fromStep` on (0, or the step at which this worker joined the run).
    public init(_ first: ShardedSampler, fromStep: Int = 0) {
        precondition(fromStep >= 0, "steps count from 0")
        segments = [Segment(fromStep: fromStep, sampler: first)]
    }

    /// From `step` on, the batches are divided over `numShards` workers and this one holds `rank`. Throws
    /// `DataError.invalidConfiguration` for a step before the latest change (membership only moves
    /// forward) or a division the sampler refuses; a second change at the same step replaces the first.
    public mutating func reshard(atStep step: Int, numShards: Int, rank: Int) throws {
        guard let last = segments.last, step >= last.fromStep else {
            throw DataError.invalidConfiguration("a change of members at step \(step) comes before the last one (step \(segments.last!.fromStep))")
        }
        let next = Segment(fromStep: step, sampler: try last.sampler.resharded(numShards: numShards, rank: rank))
        if step == last.fromStep { segments[segments.count - 1] = next } else { segments.append(next) }
    }

    /// Batches per epoch: the same for every segment (they share the layout).
    public var batchesPerEpoch: Int { segments[0].sampler.batchesPerEpoch }

    /// The sampler that applies at `step` (the latest segment starting at or before it).
    public func sampler(atStep step: Int) -> ShardedSampler {
        precondition(step >= segments[0].fromStep, "step \(step) is before this worker's first step \(segments[0].fromStep)")
        return segments.last { $0.fromStep <= step }!.sampler
    }

    /// This worker's records at `step` (epoch step / batchesPerEpoch, batch step mod batchesPerEpoch).
    public func localBatch(step: Int) -> [Int] {
        sampler(atStep: step).localBatch(epoch: step / batchesPerEpoch, step % batchesPerEpoch)
    }
}
