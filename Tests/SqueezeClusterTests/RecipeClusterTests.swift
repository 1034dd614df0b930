import Foundation
import Testing
import SqueezeData
import SqueezeEngine
import SqueezeTraining
@testable import SqueezeCluster

/// The recipe's tricks reach every worker through the TrainingConfig of the welcome and act there
/// as in one process.
@Suite("Recipe tricks in a cluster (in process)", .serialized)
struct RecipeClusterTests {
    /// Two workers and one process, 4 steps with the moving average (Lookahead, every 2 steps),
    /// alternating flips, a 2-pixel translation, SGDW and the linear schedule: the same final weights
    /// (the average, which both write at the end), up to the all-reduce's summation order.
    @Test func twoWorkersWithEveryTrickEqualOneProcess() throws {
        let dir = try temporaryDirectory("recipe-cluster")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var options = clusterOptions(workers: 2, steps: 4)
        options.config.model.dropout = 0  // dropout masks differ per rank by design
        options.config.ema = EMASettings(decay: 0.5, every: 2, lookahead: true)
        options.config.flip = .alternating
        options.config.translate = 2
        options.config.decoupledWeightDecay = true
        options.config.weightDecay = 0.05
        options.config.schedule = .linear
        options.config.lrFloor = 0.25
        options.saveWeights = dir + "/cluster.safetensors"
        let run = try runInProcess(options)
        _ = try run.summary.get()
        #expect(run.workerErrors.allSatisfy { $0 == nil }, "\(run.workerErrors)")

        let single = try Trainer(config: options.config, trainSet: try CIFAR10(directory: cifarDirectory, split: .train))
        var runOptions = RunOptions()
        runOptions.quiet = true
        _ = try runTraining(single, testSet: nil, options: runOptions)
        let cluster = Network(config: options.config.model)
        try cluster.loadWeights(from: dir + "/cluster.safetensors")
        let x = cluster.parameters.copyValues(), y = single.network.parameters.copyValues()
        let scale = y.reduce(Float(0)) { max($0, abs($1)) }
        let err = zip(x, y).reduce(Float(0)) { max($0, abs($1.0 - $1.1)) } / scale
        // Summation order only: measured 1.11e-5 once every convolution's weight gradient sums over the
        // batch in oneDNN's order (the blocked layout, docs/engine.md); a wrong gradient is orders larger.
        #expect(err < 2e-5, "2 workers vs one process: max relative difference \(err)")
        #expect(y != Network(config: options.config.model, seed: options.config.seed).parameters.copyValues())
        // The averaged weights were written, not the last step's.
        let average = try #require(single.average)
        #expect(y == Array(UnsafeBufferPointer(start: average.parameters.pointer, count: y.count)))
    }
}
