import ArgumentParser
import SqueezeEngine

extension ModelConfig.Architecture: ExpressibleByArgument {}
extension ModelConfig.Stem: ExpressibleByArgument {}
extension ModelConfig.Bypass: ExpressibleByArgument {}

/// The options that choose a model; shared by every command that builds one. Each option is optional so that
/// a command reading saved weights can tell an explicit choice (which must agree with the file's model
/// configuration) from a default (which the file's configuration replaces): see `resolve(savedIn:)`.
struct ModelOptions: ParsableArguments {
    @Option(help: "Model: \(ModelConfig.Architecture.allCases.map(\.rawValue).joined(separator: ", ")). (default: squeezenet1_1)")
    var model: ModelConfig.Architecture?

    @Option(help: "Number of output classes. (default: 10)")
    var classes: Int?

    @Option(help: "First convolution: 'cifar' (3×3, stride 1, padding 1; 32×32 inputs) or 'imagenet' (torchvision's). (default: cifar)")
    var stem: ModelConfig.Stem?

    @Flag(help: "Drop the first max-pool (the paper's strategy 3: downsample late).")
    var lateDownsample = false

    @Flag(help: "BatchNorm2d after every convolution but the classifier.")
    var batchNorm = false

    @Option(help: "Bypass connections around Fire modules: none or simple (the paper's Table 3). (default: none)")
    var bypass: ModelConfig.Bypass?

    @Option(name: .customLong("base-e"), help: "Fire meta-parameter base_e: expand filters in the first Fire module. (default: 128)")
    var baseE: Int?
    @Option(name: .customLong("incr-e"), help: "Fire meta-parameter incr_e: expand filters added every `freq` modules. (default: 128)")
    var incrE: Int?
    @Option(name: .customLong("pct-3x3"), help: "Fire meta-parameter pct_3x3: share of expand filters that are 3×3. (default: 0.5)")
    var pct3x3: Double?
    @Option(help: "Fire meta-parameter freq: Fire modules between increments of expand filters. (default: 2)")
    var freq: Int?
    @Option(name: .customLong("sr"), help: "Fire meta-parameter SR: squeeze ratio (squeeze filters / expand filters). (default: 0.125)")
    var squeezeRatio: Double?

    func validate() throws {
        if let reason = config.invalidReason { throw ValidationError(reason) }
    }

    /// The model these options choose, defaults filled in.
    var config: ModelConfig { apply(to: ModelConfig()) }

    /// `base` with every option given on the command line applied.
    private func apply(to base: ModelConfig) -> ModelConfig {
        var c = base
        if let model { c.architecture = model }
        if let classes { c.classes = classes }
        if let stem { c.stem = stem }
        if lateDownsample { c.lateDownsample = true }
        if batchNorm { c.batchNorm = true }
        if let bypass { c.bypass = bypass }
        if let baseE { c.fire.baseE = baseE }
        if let incrE { c.fire.incrE = incrE }
        if let pct3x3 { c.fire.pct3x3 = pct3x3 }
        if let freq { c.fire.freq = freq }
        if let squeezeRatio { c.fire.squeezeRatio = squeezeRatio }
        return c
    }

    /// The model of the weights in `path`: the configuration saved in the file's metadata, which options
    /// given on the command line must agree with (an error names each difference); for a file without
    /// one (PyTorch's, or older), the options with their defaults.
    func resolve(savedIn path: String) throws -> ModelConfig {
        try resolve(saved: try Network.savedConfig(path: path), path: path)
    }

    /// `saved` (the configuration a file holds, if any) checked against the options given, as above.
    func resolve(saved: ModelConfig?, path: String) throws -> ModelConfig {
        guard let saved else { return config }
        var explicit = apply(to: saved)
        explicit.dropout = saved.dropout
        guard explicit != saved else { return saved }
        let differences = Self.differences(saved, explicit)
        throw ValidationError("\(path) holds a model with \(differences.map { "\($0.flag) \($0.saved)" }.joined(separator: ", ")), "
            + "but the command line says \(differences.map { "\($0.flag) \($0.given)" }.joined(separator: ", ")); "
            + "drop those options (the file's model configuration is used) or give weights of the model you mean")
    }

    /// The options whose values differ between two configurations, as (flag, first value, second value).
    static func differences(_ a: ModelConfig, _ b: ModelConfig) -> [(flag: String, saved: String, given: String)] {
        var out = [(flag: String, saved: String, given: String)]()
        func add<T: Equatable>(_ flag: String, _ x: T, _ y: T) { if x != y { out.append((flag, "\(x)", "\(y)")) } }
        add("--model", a.architecture.rawValue, b.architecture.rawValue)
        add("--classes", a.classes, b.classes)
        add("--stem", a.stem.rawValue, b.stem.rawValue)
        add("--late-downsample", a.lateDownsample ? "on" : "off", b.lateDownsample ? "on" : "off")
        add("--batch-norm", a.batchNorm ? "on" : "off", b.batchNorm ? "on" : "off")
        add("--bypass", a.bypass.rawValue, b.bypass.rawValue)
        add("--base-e", a.fire.baseE, b.fire.baseE)
        add("--incr-e", a.fire.incrE, b.fire.incrE)
        add("--pct-3x3", a.fire.pct3x3, b.fire.pct3x3)
        add("--freq", a.fire.freq, b.fire.freq)
        add("--sr", a.fire.squeezeRatio, b.fire.squeezeRatio)
        return out
    }
}
