/// Deep Compression's first two stages on one weight tensor: magnitude pruning and weight sharing.

/// The mask that keeps the `density` share of `weights` with the largest magnitudes (at least one
/// weight; ties broken by position, so the mask is a pure function of the values). 1 keeps, 0 prunes.
public func magnitudeMask(_ weights: [Float], density: Double) -> [Float] {
    precondition(density > 0 && density <= 1, "density must be in (0, 1]")
    let keep = max(1, Int((Double(weights.count) * density).rounded()))
    if keep >= weights.count { return [Float](repeating: 1, count: weights.count) }
    let order = weights.indices.sorted { (abs(weights[$0]), -$0) > (abs(weights[$1]), -$1) }
    var mask = [Float](repeating: 0, count: weights.count)
    for i in order.prefix(keep) { mask[i] = 1 }
    return mask
}

/// A codebook for weight sharing: k-means (Lloyd's algorithm, 1-D) over the kept weights with
/// linear initialisation (centroids evenly spaced between the smallest and largest kept weight, which
/// the paper found best: it keeps the rare large weights represented).
public struct WeightSharing: Equatable, Sendable {
    /// `codebook[0]` is 0 (pruned weights); `codebook[1...]` the shared values, ascending.
    public var codebook: [Float]
    /// Per weight: 0 if pruned, else its codebook index.
    public var assignment: [Int]
    public var bits: Int

    /// Clusters the weights where `mask` is 1 into at most 2^bits − 1 shared values.
    public init(weights: [Float], mask: [Float], bits: Int, iterations: Int = 30) {
        precondition((1...8).contains(bits) && weights.count == mask.count)
        self.bits = bits
        let kept = weights.indices.filter { mask[$0] != 0 }
        let values = kept.map { weights[$0] }
        let k = min((1 << bits) - 1, max(1, Set(values).count))
        var centroids = [Float]()
        if let lo = values.min(), let hi = values.max() {
            centroids = k == 1 ? [(lo + hi) / 2] : (0..<k).map { lo + (hi - lo) * Float($0) / Float(k - 1) }
        }
        // Lloyd iterations on sorted values: each cluster is a contiguous run between midpoints.
        let sorted = values.sorted()
        for _ in 0..<iterations where !sorted.isEmpty {
            var sums = [Double](repeating: 0, count: centroids.count), counts = [Int](repeating: 0, count: centroids.count)
            var c = 0
            for v in sorted {
                while c + 1 < centroids.count && abs(centroids[c + 1] - v) < abs(centroids[c] - v) { c += 1 }
                sums[c] += Double(v); counts[c] += 1
            }
            let next = centroids.indices.map { counts[$0] > 0 ? Float(sums[$0] / Double(counts[$0])) : centroids[$0] }
            if next == centroids { break }
            centroids = next
        }
        centroids = Array(Set(centroids)).sorted()
        codebook = [0] + centroids
        var assignment = [Int](repeating: 0, count: weights.count)
        for i in kept { assignment[i] = 1 + WeightSharing.nearest(weights[i], in: centroids) }
        self.assignment = assignment
    }

    /// Index of the value in ascending `sorted` nearest to `x` (the lower on a tie).
    static func nearest(_ x: Float, in sorted: [Float]) -> Int {
        var lo = 0, hi = sorted.count - 1
        while lo < hi {
            let mid = (lo + hi) / 2
            if sorted[mid] < x { lo = mid + 1 } else { hi = mid }
        }
        if lo > 0 && abs(sorted[lo - 1] - x) <= abs(sorted[lo] - x) { return lo - 1 }
        return lo
    }

    /// The weights as shared values (pruned ones zero).
    public var values: [Float] { assignment.map { codebook[$0] } }

    /// Fine-tunes the shared values with the gradient of every weight summed per cluster (the paper's
    /// centroid update): codebook[c] −= rate · Σ_{i in c} gradient[i]. Pruned weights and codebook[0] stay.
    public mutating func step(gradients: [Float], rate: Float) {
        var sums = [Float](repeating: 0, count: codebook.count)
        for (i, c) in assignment.enumerated() where c != 0 { sums[c] += gradients[i] }
        for c in 1..<codebook.count { codebook[c] -= rate * sums[c] }
    }

    /// The weights' storage in a compressed file.
    public func shared(indexBits: Int = 4) -> SharedWeights {
        SharedWeights(assignment: assignment, codebook: codebook, bits: bits, indexBits: indexBits)
    }
}
