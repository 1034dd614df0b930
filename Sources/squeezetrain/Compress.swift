import ArgumentParser
import Foundation
import SqueezeCompress
import SqueezeData
import SqueezeEngine
import SqueezeSystem
import SqueezeTraining

struct Compress: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Deep Compression (Han et al., 2016) of trained weights: magnitude pruning, trained quantization and Huffman coding, each with retraining on CIFAR-10; writes a compressed model (.sqz).",
        discussion: """
            Stages: (1) prune each weight tensor to its density (the smallest magnitudes go) and retrain with the pruned \
            weights held at zero (their gradients and momentum masked); (2) cluster each tensor's kept weights into \
            2^bits − 1 shared values (k-means, linear initialisation) and fine-tune the shared values with the gradients \
            summed per cluster; (3) write codebooks, codes and 4-bit relative indices, Huffman-coded. Biases and \
            BatchNorm tensors stay plain (and keep training). The test accuracy is printed after every stage.
            """)

    @OptionGroup(title: "Model options (read from the weights' metadata when they have it; given ones must agree)") var model: ModelOptions
    @OptionGroup var precision: PrecisionOption
    @Option(help: "Trained weights to compress (safetensors with torchvision names).")
    var weights: String
    @Option(help: "Where to write the compressed model (.sqz); written atomically.")
    var output: String
    @Flag(help: "Replace --output if it exists.")
    var force = false
    @Option(help: "Bits of a code: each layer shares at most 2^bits − 1 values (plus 0 for pruned weights); 1...8 (the paper: 8, 6, 5 or 4).")
    var bits = 8
    @Option(name: .customLong("density"), parsing: .singleValue, help: ArgumentHelp(
        "Share of weights a layer keeps, as KEY=D with D in (0, 1]; repeatable.",
        discussion: "KEY is a group (SqueezeNet: conv1, squeeze, expand1x1, expand3x3, conv10, other; AlexNet: conv1 to conv5, fc6 to fc8) "
            + "or a weight tensor's name (features.12.expand3x3.weight), which wins over its group. Defaults: for SqueezeNet the released "
            + "compressed SqueezeNet's shape (conv1, squeeze and expand1x1 0.99, expand3x3 0.33, conv10 0.21, other 1); for AlexNet Deep "
            + "Compression's (conv1 0.84, conv2 0.38, conv3 0.35, conv4 and conv5 0.37, fc6 and fc7 0.09, fc8 0.25)."))
    var densities: [String] = []
    @Option(help: "Epochs of retraining after pruning (0: none).")
    var pruneEpochs: Double = 2
    @Option(help: "Steps of retraining after pruning; overrides --prune-epochs.")
    var pruneSteps: Int?
    @Option(help: "Epochs of fine-tuning the shared values (0: none).")
    var quantizeEpochs: Double = 1
    @Option(help: "Steps of fine-tuning the shared values; overrides --quantize-epochs.")
    var quantizeSteps: Int?
    @Option(help: "Peak learning rate of the retraining after pruning (cosine to 0 over the stage).")
    var lr: Float = 0.01
    @Option(help: ArgumentHelp(
        "Peak learning rate of the quantized fine-tuning, for the shared values (summed gradients) and the plain tensors.",
        discussion: "A shared value moves by the sum of its cluster's gradients, so the rate that suits a layer shrinks as its clusters "
            + "grow: 0.001 suits SqueezeNet (its largest layer averages about 1,600 weights a cluster at 5 bits); AlexNet's fc6 (about "
            + "110,000) diverged at 0.001 and trained at 0.00001."))
    var quantizeLr: Float = 0.001
    @Option(help: "Global batch size of the retraining.")
    var batchSize = 128
    @Option(help: "Seed of the retraining's data order, augmentation and dropout.")
    var seed: UInt64 = 0
    @Option(help: "CIFAR-10 directory (see train --help).")
    var data: String?
    @Option(help: "Compute threads (oneDNN/OpenMP); data loading runs on one more thread.")
    var threads = 1
    @Option(help: "Evaluate each stage on the first N test images (default: all 10,000).")
    var evalImages: Int?
    @Option(help: "Also write the pruned, retrained weights here (safetensors), before quantization: compressing them with --prune-epochs 0 tries other --bits without pruning again.")
    var savePruned: String?
    @Option(help: "Write the stages' accuracies and the sizes here as JSON.")
    var report: String?

    func validate() throws {
        try requireRange("--bits", bits, 1...8)
        _ = try parsedDensities()
        try requireFinite("--prune-epochs", pruneEpochs, 0...1000)
        try requireFinite("--quantize-epochs", quantizeEpochs, 0...1000)
        if let pruneSteps { try requireRange("--prune-steps", pruneSteps, 0...1_000_000_000) }
        if let quantizeSteps { try requireRange("--quantize-steps", quantizeSteps, 0...1_000_000_000) }
        for (flag, rate) in [("--lr", lr), ("--quantize-lr", quantizeLr)] {
            guard rate > 0, rate.isFinite, rate <= 1000 else { throw ValidationError("\(flag) must be a positive finite number up to 1000 (got \(rate))") }
        }
        try requireRange("--batch-size", batchSize, 1...50_000)
        try requireRange("--threads", threads, 1...256)
        if let evalImages { try requireRange("--eval-images", evalImages, 1...10_000) }
    }

    /// `--density` as key → density; a `ValidationError` names a malformed entry.
    func parsedDensities() throws -> [String: Double] {
        var out = [String: Double]()
        for entry in densities {
            let parts = entry.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2, let d = Double(parts[1]) else { throw ValidationError("--density '\(entry)': expected KEY=D, e.g. expand3x3=0.33") }
            guard d > 0, d <= 1 else { throw ValidationError("--density '\(entry)': the density must be in (0, 1] (got \(parts[1]))") }
            out[parts[0]] = d
        }
        return out
    }

    /// The densities for `net`'s architecture with `--density` applied; a `ValidationError` names a key
    /// that is neither one of its groups nor one of its weight tensors.
    func densityPolicy(for net: Network) throws -> DensityPolicy {
        let architecture = net.config.architecture, groups = DensityPolicy.groups(of: architecture)
        let names = net.compressibleWeights.map(\.name)
        let overrides = try parsedDensities()
        for key in overrides.keys.sorted() where !groups.contains(key) && !names.contains(key) {
            throw ValidationError("--density: '\(key)' is neither a group of \(architecture.rawValue) (\(groups.joined(separator: ", "))) "
                                  + "nor a weight tensor of \(weights) (\(names.joined(separator: ", ")))")
        }
        return DensityPolicy(architecture, overrides: overrides)
    }

    struct Stage: Encodable {
        var stage: String, steps: Int, testAccuracy: Double, testLoss: Double
    }

    struct Report: Encodable {
        var weights: String, output: String, model: String, bits: Int, evalImages: Int
        var parameters: Int, fp32Bytes: Int, compressedBytes: Int, density: Double
        var densities: [String: Double]
        var stages: [Stage]
    }

    func run() throws {
        let stop = stopOnSignals()  // first: threads started later inherit its signal mask
        ComputeThreads.set(threads)
        do {
            try checkPaths()
            let net = try loadNetwork(weights: weights, model: model)
            let policy = try densityPolicy(for: net)
            let names = Set(net.compressibleWeights.map(\.name))
            let dir = try CIFAR10.resolveDirectory(explicit: data)
            let trainSet = try CIFAR10(directory: dir, split: .train), testSet = try CIFAR10(directory: dir, split: .test)
            var config = TrainingConfig()
            config.model = net.config
            config.batchSize = batchSize; config.seed = seed
            let precision = self.precision.resolved()
            config.precision = precision == .fp32 ? nil : precision
            let perEpoch = config.stepsPerEpoch(trainingRecords: trainSet.count)
            let testIndices = evalImages.map { Array(0..<$0) }
            var stages = [Stage]()
            func evaluate(_ stage: String, steps: Int = 0) {
                let e = Trainer.evaluate(net, testSet, indices: testIndices, imageSize: config.imageSize)
                stages.append(Stage(stage: stage, steps: steps, testAccuracy: e.accuracy, testLoss: e.loss))
                emit(String(format: "%@: test accuracy %.2f%% (loss %.4f, %d images)\n", stage, 100 * e.accuracy, e.loss, e.images))
            }
            /// Retrains `net` for `steps` steps at peak rate `rate` with `constraint` applied around each step.
            func retrain(_ what: String, steps: Int, rate: Float, constraint: ParameterConstraint) throws {
                guard steps > 0 else { return }
                var c = config
                c.totalSteps = steps; c.learningRate = rate
                let trainer = try Trainer(config: c, trainSet: trainSet)
                trainer.network.copyState(from: net)
                trainer.constraint = constraint
                emit("\(what): \(steps) steps of \(batchSize) (\(String(format: "%.2f", Double(steps) / Double(perEpoch))) epochs), lr \(rate), \(threads) thread(s)\n")
                var options = RunOptions()
                options.evaluateEachEpoch = false
                let summary = try runTraining(trainer, testSet: nil, options: options, stop: stop)
                if let sig = summary.interruptedBy {
                    emit("stopped by signal \(sig) during \(what); nothing written\n")
                    throw ExitCode(128 + sig)
                }
                net.copyState(from: trainer.network)
                evaluate("after \(what)", steps: steps)
            }

            emit("compressing \(weights): \(net.config.architecture.rawValue), \(grouped(net.parameters.count)) parameters, "
                 + "\(bits)-bit codebooks; CIFAR-10 from \(dir)\n")
            evaluate("dense")
            let densities = Dictionary(uniqueKeysWithValues: net.compressibleWeights.map { ($0.name, policy.density(of: $0.name)) })
            let pruning = PrunedTraining(pruning: net, densities: densities)
            evaluate(String(format: "pruned to %.1f%% of the weights", 100 * pruning.density))
            try retrain("pruning retraining", steps: pruneSteps ?? Int((pruneEpochs * Double(perEpoch)).rounded()), rate: lr, constraint: pruning)
            if let savePruned {
                try net.saveWeights(to: savePruned)
                emit("pruned weights written to \(savePruned)\n")
            }
            let sharing = SharedTraining(quantizing: net, names: names, bits: bits)
            evaluate("quantized to \(bits) bits")
            try retrain("quantized fine-tuning", steps: quantizeSteps ?? Int((quantizeEpochs * Double(perEpoch)).rounded()),
                        rate: quantizeLr, constraint: sharing)

            let bytes = try sharing.compressedModel(of: net).encoded()
            try AtomicFile.write(bytes, to: output)
            let fp32 = 4 * net.parameters.count
            emit("wrote \(output): \(grouped(bytes.count)) bytes; fp32 parameters \(grouped(fp32)) bytes, "
                 + String(format: "%.1f× smaller (see squeezetrain inspect %@)\n", Double(fp32) / Double(bytes.count), output))
            if let report {
                let r = Report(weights: weights, output: output, model: net.config.architecture.rawValue, bits: bits,
                               evalImages: testIndices?.count ?? testSet.count, parameters: net.parameters.count, fp32Bytes: fp32,
                               compressedBytes: bytes.count, density: pruning.density, densities: densities, stages: stages)
                let encoder = JSONEncoder()
                encoder.keyEncodingStrategy = .convertToSnakeCase
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
                try AtomicFile.write(Array(try encoder.encode(r)) + [10], to: report)
            }
        } catch let e as ExitCode {
            throw e
        } catch {
            throw fail(String(describing: error))
        }
    }

    /// Fails before any training on a path that would fail after it: a missing or compressed input,
    /// an existing output (without --force), a missing output directory.
    private func checkPaths() throws {
        let fm = FileManager.default
        guard fm.fileExists(atPath: weights) else { throw ValidationError("--weights \(weights): no such file") }
        if isCompressedModel(weights) { throw ValidationError("--weights \(weights) is already a compressed model; give the dense weights (safetensors), e.g. from export") }
        for (flag, path) in [("--output", output), ("--save-pruned", savePruned), ("--report", report)] {
            guard let path else { continue }
            if flag == "--output" && !force && fm.fileExists(atPath: path) {
                throw ValidationError("--output \(path) exists; give --force to replace it")
            }
            let parent = (path as NSString).deletingLastPathComponent
            var isDirectory: ObjCBool = false
            guard fm.fileExists(atPath: parent.isEmpty ? "." : parent, isDirectory: &isDirectory), isDirectory.boolValue else {
                throw ValidationError("\(flag) \(path): the directory \(parent) does not exist")
            }
        }
    }
}
