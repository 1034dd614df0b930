#if canImport(Glibc)
import Glibc
#endif

/// Mean softmax cross-entropy over a batch. `logits` is (K, N) channel-major: logits[k][n] at k·N + n.
/// Returns the loss, the number of correct argmax predictions, and writes
/// dL/dlogits[k][n] = (softmax[k][n] − q[k][n]) / N into `gradient` when given, where the target
/// q[k][n] = (1 − ε)·[k = label n] + ε/K (label smoothing ε, as PyTorch's `label_smoothing`).
public func softmaxCrossEntropy(logits: UnsafePointer<Float>, classes k: Int, batch n: Int, labels: [Int32],
                                labelSmoothing eps: Float = 0,
                                gradient: UnsafeMutablePointer<Float>?) -> (loss: Float, correct: Int) {
    let eps = Double(eps), uniform = eps / Double(k)
    precondition(labels.count == n, "\(labels.count) labels for a batch of \(n)")
    var total: Double = 0
    var correct = 0
    for j in 0..<n {
        var top: Float = -.infinity, arg = 0
        for c in 0..<k where logits[c * n + j] > top { top = logits[c * n + j]; arg = c }
        var sum: Double = 0
        for c in 0..<k { sum += exp(Double(logits[c * n + j] - top)) }
        let label = Int(labels[j])
        precondition(label >= 0 && label < k, "label \(label) out of range 0..<\(k)")
        // −Σ q·log p = log Σ exp(z − top) − Σ q·(z − top)
        var shiftedSum: Double = 0
        if eps > 0 { for c in 0..<k { shiftedSum += Double(logits[c * n + j] - top) } }
        total += log(sum) - (1 - eps) * Double(logits[label * n + j] - top) - uniform * shiftedSum
        if arg == label { correct += 1 }
        if let gradient {
            for c in 0..<k {
                let p = exp(Double(logits[c * n + j] - top)) / sum
                gradient[c * n + j] = Float((p - uniform - (c == label ? 1 - eps : 0)) / Double(n))
            }
        }
    }
    return (Float(total / Double(n)), correct)
}
