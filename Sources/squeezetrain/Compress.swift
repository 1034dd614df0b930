import ArgumentParser
import Foundation
import SqueezeCompress
import SqueezeData
import SqueezeEngine
import SqueezeSystem
import SqueezeTraining

struct Compress: ReportingCommand {
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

    func execute() throws {
        let stop = stopOnSignals()  // first: threads started later inherit its signal mask
        ComputeThreads.set(threads)
        try checkPaths()
        let net = try loadNetwork(weights: weights, model: model)
        let policy = try densityPolicy(for: net)
        let dir = try CIFAR10.resolveDirectory(explicit: data)
        var config = DeepCompression.Config(network: net, weights: weights, output: output, trainSet: try CIFAR10(directory: dir, split: .train),
                                            testSet: try CIFAR10(directory: dir, split: .test), policy: policy)
        config.dataDirectory = dir
        config.bits = bits; config.learningRate = lr; config.quantizeLearningRate = quantizeLr
        config.batchSize = batchSize; config.seed = seed; config.precision = precision.resolved()
        config.threads = threads; config.evalImages = evalImages; config.savePruned = savePruned; config.stop = stop
        config.pruneSteps = pruneSteps ?? Int((pruneEpochs * Double(config.stepsPerEpoch)).rounded())
        config.quantizeSteps = quantizeSteps ?? Int((quantizeEpochs * Double(config.stepsPerEpoch)).rounded())
        let result = try DeepCompression.run(config)
        if let report { try AtomicFile.write(try jsonText(result) + [10], to: report) }
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
