import ArgumentParser
import SqueezeEngine

extension ModelConfig.Architecture: ExpressibleByArgument {}
extension ModelConfig.Stem: ExpressibleByArgument {}
extension ModelConfig.Bypass: ExpressibleByArgument {}

/// The options that choose a model; shared by every command that builds one.
struct ModelOptions: ParsableArguments {
    @Option(help: "Model: \(ModelConfig.Architecture.allCases.map(\.rawValue).joined(separator: ", ")).")
    var model: ModelConfig.Architecture = .squeezenet1_1

    @Option(help: "Number of output classes.")
    var classes: Int = 10

    @Option(help: "First convolution: 'cifar' (3×3, stride 1, padding 1; 32×32 inputs) or 'imagenet' (torchvision's).")
    var stem: ModelConfig.Stem = .cifar

    @Flag(help: "Drop the first max-pool (the paper's strategy 3: downsample late).")
    var lateDownsample = false

    @Flag(help: "BatchNorm2d after every convolution but the classifier.")
    var batchNorm = false

    @Option(help: "Bypass connections around Fire modules: none or simple (the paper's Table 3).")
    var bypass: ModelConfig.Bypass = .none

    @Option(name: .customLong("base-e"), help: "Fire meta-parameter base_e: expand filters in the first Fire module.")
    var baseE = 128
    @Option(name: .customLong("incr-e"), help: "Fire meta-parameter incr_e: expand filters added every `freq` modules.")
    var incrE = 128
    @Option(name: .customLong("pct-3x3"), help: "Fire meta-parameter pct_3x3: share of expand filters that are 3×3.")
    var pct3x3 = 0.5
    @Option(help: "Fire meta-parameter freq: Fire modules between increments of expand filters.")
    var freq = 2
    @Option(name: .customLong("sr"), help: "Fire meta-parameter SR: squeeze ratio (squeeze filters / expand filters).")
    var squeezeRatio = 0.125

    func validate() throws {
        guard classes >= 1 else { throw ValidationError("--classes must be at least 1 (got \(classes))") }
        guard baseE >= 2, incrE >= 0, freq >= 1 else { throw ValidationError("--base-e must be ≥ 2, --incr-e ≥ 0, --freq ≥ 1") }
        guard pct3x3 > 0, pct3x3 < 1 else { throw ValidationError("--pct-3x3 must be strictly between 0 and 1 (got \(pct3x3))") }
        guard squeezeRatio > 0, squeezeRatio <= 1 else { throw ValidationError("--sr must be in (0, 1] (got \(squeezeRatio))") }
        if model == .alexnet {
            for (flag, set) in [("--batch-norm", batchNorm), ("--late-downsample", lateDownsample), ("--bypass simple", bypass == .simple)] where set {
                throw ValidationError("\(flag) applies to SqueezeNet only; --model alexnet is torchvision's AlexNet as it is")
            }
        }
        if bypass == .simple && incrE > 0 && freq == 1 {
            throw ValidationError("--bypass simple needs Fire modules of equal width in and out; with --freq 1 none are")
        }
    }

    var config: ModelConfig {
        var c = ModelConfig()
        c.architecture = model; c.classes = classes; c.stem = stem
        c.lateDownsample = lateDownsample; c.batchNorm = batchNorm; c.bypass = bypass
        c.fire.baseE = baseE; c.fire.incrE = incrE; c.fire.pct3x3 = pct3x3; c.fire.freq = freq; c.fire.squeezeRatio = squeezeRatio
        return c
    }
}

extension ModelOptions {
    /// These options as command-line arguments (for the processes `launch` starts).
    var arguments: [String] {
        var a = ["--model", model.rawValue, "--classes", "\(classes)", "--stem", stem.rawValue, "--bypass", bypass.rawValue,
                 "--base-e", "\(baseE)", "--incr-e", "\(incrE)", "--pct-3x3", "\(pct3x3)", "--freq", "\(freq)", "--sr", "\(squeezeRatio)"]
        if lateDownsample { a.append("--late-downsample") }
        if batchNorm { a.append("--batch-norm") }
        return a
    }
}
