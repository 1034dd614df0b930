import Foundation
@testable import SqueezeCollectives
import SqueezeTestSupport
import SqueezeTransport

/// Collects one result per rank from threads (results are written once each, under a lock).
final class RankResults<R: Sendable>: @unchecked Sendable {
    // @unchecked Sendable: `slots` is only accessed with `lock` held.
    private let lock = NSLock()
    private var slots: [Result<R, any Error>?]

    init(count: Int) { slots = Array(repeating: nil, count: count) }

    func set(_ i: Int, _ r: Result<R, any Error>) { lock.withLock { slots[i] = r } }
    var all: [Result<R, any Error>] { lock.withLock { slots.map { $0! } } }
}

/// Runs `body(rank)` for every rank on its own OS thread (blocking collectives must not run
/// on the few threads of Swift's cooperative pool) and returns each rank's result.
func runRanks<R: Sendable>(_ count: Int, _ body: @escaping @Sendable (Int) throws -> R) -> [Result<R, any Error>] {
    let results = RankResults<R>(count: count)
    let done = DispatchSemaphore(value: 0)
    for rank in 0..<count {
        let thread = Thread {
            results.set(rank, Result { try body(rank) })
            done.signal()
        }
        thread.stackSize = 4 << 20
        thread.start()
    }
    for _ in 0..<count { done.wait() }
    return results.all
}

/// The exact average in Double.
func doubleAverage(_ inputs: [[Float]]) -> [Double] {
    let n = inputs.count
    return (0..<inputs[0].count).map { i in inputs.reduce(0.0) { $0 + Double($1[i]) } / Double(n) }
}

/// Checks |result − exact| against a bound for Float summation of N terms plus the division.
func maxToleranceViolation(_ result: [Float], exact: [Double], inputs: [[Float]]) -> Double {
    let n = Double(inputs.count)
    var worst = 0.0
    for i in result.indices {
        let magnitude = inputs.reduce(0.0) { $0 + abs(Double($1[i])) } / n
        let bound = 2 * n * Double(Float.ulpOfOne) * magnitude + Double(Float.ulpOfOne) * abs(exact[i]) + 1e-30
        worst = max(worst, abs(Double(result[i]) - exact[i]) / bound)
    }
    return worst  // ≤ 1 means within tolerance
}

/// Naive reference for the ring: segment k is summed as x_k + x_{k+1} + … (ranks mod N)
/// in Float, then divided by N. The ring must match it bit for bit.
func ringReference(_ inputs: [[Float]]) -> [Float] {
    let n = inputs.count, count = inputs[0].count
    guard n > 1 else { return inputs[0] }
    var out = [Float](repeating: 0, count: count)
    for k in 0..<n {
        for i in evenSegment(k, of: n, count: count) {
            var acc = inputs[k][i]
            for j in 1..<n { acc += inputs[(k + j) % n][i] }
            out[i] = acc / Float(n)
        }
    }
    return out
}

/// Naive reference for the star: sum in worker order in Float, then divide.
func starReference(_ inputs: [[Float]]) -> [Float] {
    let n = inputs.count
    return (0..<inputs[0].count).map { i in
        var acc = inputs[0][i]
        for r in 1..<n { acc += inputs[r][i] }
        return acc / Float(n)
    }
}

/// nil if `a` and `b` are bit-identical, else a short description of the first difference
/// (keeps failure messages readable for arrays of 727,626 elements).
func firstMismatch(_ a: [Float], _ b: [Float]) -> String? {
    guard a.count == b.count else { return "counts \(a.count) vs \(b.count)" }
    guard let i = a.indices.first(where: { a[$0].bitPattern != b[$0].bitPattern }) else { return nil }
    return "element \(i): \(a[i]) vs \(b[i])"
}

/// The outcome of one rank in a collective test.
struct RankOutcome: Sendable {
    var result: [Float]
    var counters: ByteCounters
}

/// Tree edges of each rank for N = 1…8, written out by hand rather than from `treeChildren`: a leaf
/// has 1 (its parent), an inner node 1 + its children, the root its children.
let treeEdges: [Int: [Int]] = [1: [0], 2: [1, 1], 3: [2, 1, 1], 4: [2, 2, 1, 1], 5: [2, 3, 1, 1, 1], 6: [2, 3, 2, 1, 1, 1],
                               7: [2, 3, 3, 1, 1, 1, 1], 8: [2, 3, 3, 2, 1, 1, 1, 1]]

/// Naive reference for the tree: rank r's partial sum is x_r + s(2r+1) + s(2r+2) in Float, each
/// child's sum passed through `rounding` (its codec's round trip; none for Float32), and the root's
/// sum divided by N and rounded once more. The tree must match it bit for bit.
func treeReference(_ inputs: [[Float]], rounding: (Float) -> Float = { $0 }) -> [Float] {
    let n = inputs.count
    guard n > 1 else { return inputs[0] }
    return (0..<inputs[0].count).map { i in
        func sum(_ r: Int) -> Float {
            var v = inputs[r][i]
            for c in [2 * r + 1, 2 * r + 2] where c < n { v += rounding(sum(c)) }
            return v
        }
        return rounding(sum(0) / Float(n))
    }
}
