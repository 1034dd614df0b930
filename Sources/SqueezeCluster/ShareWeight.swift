// Uneven shares of the global batch (issue 29): the factor that keeps the collectives' average the
// gradient of the whole global batch.

import SqueezeData

/// The factor by which rank `rank` of `workers` scales its gradient before the all-reduce, or nil when
/// `workers` divides `globalBatch` (every factor is then 1, nothing is scaled, and the result is bit for
/// bit what it was before uneven shares existed).
///
/// With b_r images for rank r (`ShardedSampler.share`: the first B mod N ranks take one more) and g_r
/// the mean gradient over them, the gradient of the mean loss over the global batch B is
/// Σ_r (b_r / B) g_r. The collectives (ring, star, tree, any codec) sum and divide by N, so each rank
/// contributes w_r g_r with w_r = N b_r / B: then (1/N) Σ_r w_r g_r = Σ_r (b_r / B) g_r. The bytes sent
/// do not change; with error feedback, a rank's residual holds what it left unsent of w_r g_r.
public func shareWeight(rank: Int, of workers: Int, globalBatch: Int) -> Float? {
    let share = ShardedSampler.share(rank: rank, of: workers, globalBatch: globalBatch)
    guard share * workers != globalBatch else { return nil }
    return Float(Double(share * workers) / Double(globalBatch))
}

/// Multiplies `buffer[range]` by `weight` in place (a rank's gradient bucket before its all-reduce).
public func scaleByShare(_ buffer: UnsafeMutableBufferPointer<Float>, range: Range<Int>, weight: Float) {
    for i in range { buffer[i] *= weight }
}
