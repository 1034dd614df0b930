import Foundation
import Testing
import SqueezeCollectives
import SqueezeTransport
import SqueezeData
import SqueezeEngine
@testable import SqueezeCluster

/// Uneven shares of the global batch (issue 29): each rank scales its gradient by `shareWeight` before
/// the all-reduce, so the average stays the gradient of the whole global batch.
@Suite("Uneven shares: the weighted all-reduce")
struct ShareWeightTests {
    @Test func equalSharesScaleNothingAndTheWeightsSumToTheWorldSize() {
        for b in 1...48 {
            for n in 1...b {
                let weights = (0..<n).map { shareWeight(rank: $0, of: n, globalBatch: b) }
                if b % n == 0 {
                    #expect(weights.allSatisfy { $0 == nil }, "B \(b), N \(n)")
                } else {
                    let sum = weights.reduce(0.0) { $0 + Double($1!) }
                    #expect(abs(sum - Double(n)) < 1e-5, "B \(b), N \(n): weights \(weights)")
                }
            }
        }
        #expect((0..<3).map { shareWeight(rank: $0, of: 3, globalBatch: 10) } == [1.2, 0.9, 0.9])
    }

    /// Each rank's buffer through its `BucketedReducer` over an in-process ring, two buckets.
    func bucketedRing(_ inputs: [[Float]], globalBatch: Int?) throws -> [[Float]] {
        let n = inputs.count, group = InProcessGroup(worldSize: n)
        let plan = [600..<inputs[0].count, 0..<600]  // reverse layer order, as backward hands them over
        return try onThreads(n) { rank in
            let reducer = BucketedReducer(reducer: RingAllReduce(transport: group[rank], options: CollectiveOptions(timeout: .seconds(60))), plan: plan)
            defer { reducer.close() }
            reducer.shareWeight = globalBatch.flatMap { shareWeight(rank: rank, of: n, globalBatch: $0) }
            var buffer = inputs[rank]
            try buffer.withUnsafeMutableBufferPointer { p in
                for range in plan { reducer.gradientsReady(range, of: p) }
                try reducer.finish(p)
            }
            return buffer
        }
    }

    @Test func equalSharesGiveTodaysBitsAndUnevenOnesTheWeightedAverage() throws {
        let inputs: [[Float]] = (0..<3).map { rank in (0..<1_000).map { i in Float(sin(Double(7 * i + 1_000 * rank + 1))) } }
        // Global batch 12 over 3: nothing scaled, so exactly the ring's average without weights (as before uneven shares).
        let equal = try bucketedRing(inputs, globalBatch: 12), plain = try bucketedRing(inputs, globalBatch: nil)
        #expect(equal.allSatisfy { bits($0) == bits(plain[0]) })
        // Global batch 10 over 3: shares 4, 3, 3; the result is Σ (b_r/B) x_r on every rank, bit for bit the same.
        let uneven = try bucketedRing(inputs, globalBatch: 10)
        #expect(uneven.allSatisfy { bits($0) == bits(uneven[0]) })
        let exact: [Double] = (0..<1_000).map { i in
            let (a, b, c) = (Double(inputs[0][i]), Double(inputs[1][i]), Double(inputs[2][i]))
            return 0.4 * a + 0.3 * b + 0.3 * c
        }
        func worst(_ x: [Float]) -> Double { zip(x, exact).map { abs(Double($0) - $1) }.max()! }
        #expect(worst(uneven[0]) < 1e-6, "weighted: \(worst(uneven[0]))")
        #expect(worst(plain[0]) > 1e-2, "the plain average is not the global batch's: \(worst(plain[0]))")
    }

    /// Real gradients: SqueezeNet's gradient of the mean loss over a global batch of 10 equals the
    /// weighted combination of 3 ranks' mean gradients over their shares (4, 3, 3 images).
    @Test func weightedSharesGiveTheGlobalBatchGradient() throws {
        let data = try smallTrainingSet()
        var model = ModelConfig()
        model.dropout = 0
        let network = Network(config: model, seed: 3)
        func gradient(_ indices: [Int]) throws -> [Float] {
            let images = FloatBuffer(count: 3 * indices.count * 32 * 32)
            let labels = try data.fillBatch(indices: indices, into: images.pointer)
            let logits = network.forward(Tensor(data: images.pointer, shape: Shape(c: 3, n: indices.count, h: 32, w: 32)), training: true)
            let dl = FloatBuffer(count: logits.shape.count)
            _ = softmaxCrossEntropy(logits: logits.data, classes: logits.shape.c, batch: logits.shape.n, labels: labels, gradient: dl.pointer)
            network.backward(Tensor(data: dl.pointer, shape: logits.shape))
            return network.parameters.copyGradients()
        }
        let single = try ShardedSampler(count: data.count, globalBatchSize: 10, seed: 1)
        let whole = try gradient(single.globalBatch(epoch: 0, 2))
        let parts = try (0..<3).map { try gradient(try single.resharded(numShards: 3, rank: $0).localBatch(epoch: 0, 2)) }
        func combined(_ weight: (Int) -> Float) -> [Float] {
            (0..<whole.count).map { i in (0..<3).reduce(Float(0)) { $0 + weight($1) * parts[$1][i] } / 3 }
        }
        let scale = whole.map { abs($0) }.max()!
        func difference(_ g: [Float]) -> Float { zip(g, whole).map { abs($0 - $1) }.max()! / scale }
        let weighted = difference(combined { shareWeight(rank: $0, of: 3, globalBatch: 10)! }), plain = difference(combined { _ in 1 })
        #expect(weighted < 1e-5, "weighted shares vs one process: max relative difference \(weighted)")
        #expect(plain > 1e-3, "unweighted shares vs one process: \(plain)")
    }
}

func bits(_ x: [Float]) -> [UInt32] { x.map { $0.bitPattern } }

/// Each rank's result, written once by its thread.
private final class RankSlots<R>: @unchecked Sendable {  // @unchecked Sendable: accessed under the caller's lock
    var results: [Result<R, Error>?]
    init(_ count: Int) { results = Array(repeating: nil, count: count) }
}

/// Runs `body(rank)` for `count` ranks, each on a thread of its own (blocking collectives), and returns
/// their results in rank order; rethrows the first rank's error.
private func onThreads<R: Sendable>(_ count: Int, _ body: @escaping @Sendable (Int) throws -> R) throws -> [R] {
    let slots = RankSlots<R>(count), done = DispatchSemaphore(value: 0), lock = NSLock()
    for rank in 0..<count {
        Thread {
            let result = Result { try body(rank) }
            lock.withLock { slots.results[rank] = result }
            done.signal()
        }.start()
    }
    for _ in 0..<count { done.wait() }
    return try lock.withLock { try slots.results.map { try $0!.get() } }
}
