// The Deep Compression pipeline (Han et al., 2016) of `squeezetrain compress`: prune and retrain,
// share weights and fine-tune, write the compressed model; the test accuracy after every stage.

import Foundation
import SqueezeData
import SqueezeEngine
import SqueezeSystem
import SqueezeTraining

public enum DeepCompression {
    /// One run: the dense network (changed in place), the data, the stages' lengths and rates.
    public struct Config {
        /// The dense weights, loaded; `weights` names their file (for the log and the report).
        public var network: Network
        public var weights: String
        /// Where the compressed model is written (atomically).
        public var output: String
        public var trainSet: CIFAR10, testSet: CIFAR10
        /// Where the data came from (for the log).
        public var dataDirectory = ""
        /// Share of weights each layer keeps (see `DensityPolicy`).
        public var policy: DensityPolicy
        public var bits = 8
        /// Steps of retraining after pruning and of fine-tuning the shared values (0: none).
        public var pruneSteps = 0, quantizeSteps = 0
        public var learningRate: Float = 0.01, quantizeLearningRate: Float = 0.001
        public var batchSize = 128
        public var seed: UInt64 = 0
        public var precision: Precision = .fp32
        /// For the log only (the caller sets OpenMP's team size).
        public var threads = 1
        /// Evaluate each stage on the first N test images (nil: all).
        public var evalImages: Int?
        /// Also write the pruned, retrained weights here (safetensors), before quantization.
        public var savePruned: String?
        public var stop = StopToken()
        public var log: (String) -> Void = { emit($0 + "\n") }

        public init(network: Network, weights: String, output: String, trainSet: CIFAR10, testSet: CIFAR10, policy: DensityPolicy) {
            self.network = network; self.weights = weights; self.output = output
            self.trainSet = trainSet; self.testSet = testSet; self.policy = policy
        }

        /// Steps of one epoch of the training set at this batch size.
        public var stepsPerEpoch: Int { trainingConfig.stepsPerEpoch(trainingRecords: trainSet.count) }

        var trainingConfig: TrainingConfig {
            var c = TrainingConfig()
            c.model = network.config
            c.batchSize = batchSize; c.seed = seed
            c.precision = precision == .fp32 ? nil : precision
            return c
        }
    }

    /// The test accuracy after one stage.
    public struct Stage: Codable, Equatable {
        public var stage: String, steps: Int, testAccuracy: Double, testLoss: Double
    }

    /// What `compress --report` writes.
    public struct Report: Codable, Equatable {
        public var weights: String, output: String, model: String, bits: Int, evalImages: Int
        public var parameters: Int, fp32Bytes: Int, compressedBytes: Int, density: Double
        public var densities: [String: Double]
        public var stages: [Stage]
    }

    /// Runs the stages and writes `config.output`. A stop (`config.stop`) during a retraining throws
    /// `Interrupted`, with nothing written.
    public static func run(_ config: Config) throws -> Report {
        let net = config.network, log = config.log
        let testIndices = config.evalImages.map { Array(0..<$0) }
        var stages = [Stage]()
        func evaluate(_ stage: String, steps: Int = 0) {
            let e = Trainer.evaluate(net, config.testSet, indices: testIndices, imageSize: config.trainingConfig.imageSize)
            stages.append(Stage(stage: stage, steps: steps, testAccuracy: e.accuracy, testLoss: e.loss))
            log(String(format: "%@: test accuracy %.2f%% (loss %.4f, %d images)", stage, 100 * e.accuracy, e.loss, e.images))
        }
        log("compressing \(config.weights): \(net.config.architecture.rawValue), \(grouped(net.parameters.count)) parameters, "
            + "\(config.bits)-bit codebooks; CIFAR-10 from \(config.dataDirectory)")
        evaluate("dense")
        let densities = Dictionary(uniqueKeysWithValues: net.compressibleWeights.map { ($0.name, config.policy.density(of: $0.name)) })
        let pruning = PrunedTraining(pruning: net, densities: densities)
        evaluate(String(format: "pruned to %.1f%% of the weights", 100 * pruning.density))
        if try retrain("pruning retraining", config, steps: config.pruneSteps, rate: config.learningRate, constraint: pruning) {
            evaluate("after pruning retraining", steps: config.pruneSteps)
        }
        if let savePruned = config.savePruned {
            try net.saveWeights(to: savePruned)
            log("pruned weights written to \(savePruned)")
        }
        let sharing = SharedTraining(quantizing: net, names: Set(net.compressibleWeights.map(\.name)), bits: config.bits)
        evaluate("quantized to \(config.bits) bits")
        if try retrain("quantized fine-tuning", config, steps: config.quantizeSteps, rate: config.quantizeLearningRate, constraint: sharing) {
            evaluate("after quantized fine-tuning", steps: config.quantizeSteps)
        }

        let bytes = try sharing.compressedModel(of: net).encoded()
        try AtomicFile.write(bytes, to: config.output)
        let fp32 = 4 * net.parameters.count
        log("wrote \(config.output): \(grouped(bytes.count)) bytes; fp32 parameters \(grouped(fp32)) bytes, "
            + String(format: "%.1f× smaller (see squeezetrain inspect %@)", Double(fp32) / Double(bytes.count), config.output))
        return Report(weights: config.weights, output: config.output, model: net.config.architecture.rawValue, bits: config.bits,
                      evalImages: testIndices?.count ?? config.testSet.count, parameters: net.parameters.count, fp32Bytes: fp32,
                      compressedBytes: bytes.count, density: pruning.density, densities: densities, stages: stages)
    }

    /// Retrains `config.network` for `steps` steps at peak rate `rate` with `constraint` applied around
    /// each step; false when there is nothing to do (0 steps).
    private static func retrain(_ what: String, _ config: Config, steps: Int, rate: Float, constraint: ParameterConstraint) throws -> Bool {
        guard steps > 0 else { return false }
        var c = config.trainingConfig
        c.totalSteps = steps; c.learningRate = rate
        let trainer = try Trainer(config: c, trainSet: config.trainSet)
        trainer.network.copyState(from: config.network)
        trainer.constraint = constraint
        config.log("\(what): \(steps) steps of \(config.batchSize) (\(String(format: "%.2f", Double(steps) / Double(config.stepsPerEpoch))) epochs), "
                   + "lr \(rate), \(config.threads) thread(s)")
        var options = RunOptions()
        options.evaluateEachEpoch = false
        let summary = try runTraining(trainer, testSet: nil, options: options, stop: config.stop)
        if let sig = summary.interruptedBy {
            throw Interrupted(reason: "signal \(sig) during \(what); nothing written", signal: sig)
        }
        config.network.copyState(from: trainer.network)
        return true
    }
}
