/// The SqueezeNet family, and AlexNet for comparison, with torchvision's topology and state_dict names.
public struct ModelConfig: Equatable, Sendable, Codable {
    public enum Architecture: String, Sendable, Codable, CaseIterable { case squeezenet1_0, squeezenet1_1, alexnet }
    /// `imagenet`: torchvision's conv1 (7×7/2, 96 channels for 1.0; 3×3/2, 64 channels for 1.1).
    /// `cifar`: conv1 becomes 3×3, stride 1, padding 1 (same channels), for 32×32 inputs.
    public enum Stem: String, Sendable, Codable, CaseIterable { case imagenet, cifar }
    public enum Bypass: String, Sendable, Codable, CaseIterable { case none, simple }

    /// The paper's Section 5 meta-parameters generating the Fire stack. Fire module i (0-based, 8 of them)
    /// has e_i = baseE + incrE·⌊i / freq⌋ expand filters, of which pct3x3 are 3×3, and SR·e_i squeeze filters.
    /// The defaults reproduce SqueezeNet 1.0 (and 1.1, which has the same Fire modules).
    public struct FireMeta: Equatable, Sendable, Codable {
        public var baseE = 128, incrE = 128, freq = 2
        public var pct3x3: Double = 0.5, squeezeRatio: Double = 0.125
        public init() {}
        public func fire(_ i: Int) -> (squeeze: Int, expand1x1: Int, expand3x3: Int) {
            let e = baseE + incrE * (i / freq)
            let e3 = Int((Double(e) * pct3x3).rounded())
            return (max(1, Int((Double(e) * squeezeRatio).rounded())), e - e3, e3)
        }
    }

    public var architecture: Architecture = .squeezenet1_1
    public var classes = 10
    public var stem: Stem = .cifar
    /// Drop the first max-pool (the paper's strategy 3: downsample late).
    public var lateDownsample = false
    public var batchNorm = false
    public var bypass: Bypass = .none
    public var fire = FireMeta()
    /// Dropout probability before the classifier (torchvision: 0.5).
    public var dropout: Float = 0.5
    /// The input normalisation the weights expect, per RGB channel: `(byte / 255 − inputMean[c]) / inputStd[c]`.
    public var inputMean = ModelConfig.engineInputMean
    public var inputStd = ModelConfig.engineInputStd
    /// ε of every BatchNorm.
    public var batchNormEps = ModelConfig.engineBatchNormEps

    /// What the data pipeline and the engine implement (CIFAR-10's per-channel mean and standard deviation,
    /// PyTorch's BatchNorm ε): the only values `invalidReason` accepts, and what files that predate the
    /// keys mean. docs/model-config.md.
    public static let engineInputMean: [Float] = [0.4914, 0.4822, 0.4465]
    public static let engineInputStd: [Float] = [0.2470, 0.2435, 0.2616]
    public static let engineBatchNormEps: Float = 1e-5

    public init() {}

    /// Spatial size of the inputs this model is meant for. AlexNet (whose stem is always torchvision's
    /// 11×11/4 convolution) takes CIFAR-10 upsampled to 64×64, as it needs at least 63×63.
    public var inputSize: Int {
        if architecture == .alexnet { return stem == .cifar ? 64 : 224 }
        return stem == .cifar ? 32 : 224
    }

    /// Side of the CIFAR-10 images fed to the model in training and evaluation (32, or 64 upsampled
    /// for AlexNet).
    public var cifarImageSize: Int { architecture == .alexnet ? 64 : 32 }
}

extension ModelConfig {
    /// Decodes every key; `inputMean`, `inputStd` and `batchNormEps`, absent from files written before
    /// they existed, default to the engine's values.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        architecture = try c.decode(Architecture.self, forKey: .architecture)
        classes = try c.decode(Int.self, forKey: .classes)
        stem = try c.decode(Stem.self, forKey: .stem)
        lateDownsample = try c.decode(Bool.self, forKey: .lateDownsample)
        batchNorm = try c.decode(Bool.self, forKey: .batchNorm)
        bypass = try c.decode(Bypass.self, forKey: .bypass)
        fire = try c.decode(FireMeta.self, forKey: .fire)
        dropout = try c.decode(Float.self, forKey: .dropout)
        inputMean = try c.decodeIfPresent([Float].self, forKey: .inputMean) ?? Self.engineInputMean
        inputStd = try c.decodeIfPresent([Float].self, forKey: .inputStd) ?? Self.engineInputStd
        batchNormEps = try c.decodeIfPresent(Float.self, forKey: .batchNormEps) ?? Self.engineBatchNormEps
    }
}

extension Network {
    /// The layers of `config`'s model; dropout layer i draws from stream 0xD0 + i of `seed`.
    static func layers(_ config: ModelConfig, workspace: Workspace, seed: UInt64) -> [any Layer] {
        config.architecture == .alexnet
            ? alexNetLayers(config, workspace: workspace, seed: seed)
            : squeezeNetLayers(config, workspace: workspace, dropoutRNG: SeededRNG(seed: seed, stream: 0xD0))
    }

    /// torchvision's AlexNet: five convolutions (11×11/4, 5×5, 3×3 ×3; ReLU; floor-mode 3×3/2 pools
    /// after the 1st, 2nd and 5th), adaptive average pooling to 6×6, then dropout, 9216→4096, ReLU,
    /// dropout, 4096→4096, ReLU, 4096→classes. 57,044,810 parameters with 10 classes. `batchNorm`,
    /// the stem choice, bypasses and the Fire meta-parameters do not apply.
    static func alexNetLayers(_ config: ModelConfig, workspace: Workspace, seed: UInt64) -> [any Layer] {
        func conv(_ index: Int, _ cin: Int, _ cout: Int, kernel: Int, stride: Int = 1, padding: Int) -> Conv2d {
            Conv2d(name: "features.\(index)", cin: cin, cout: cout, kernel: kernel, stride: stride, padding: padding,
                   relu: true, batchNorm: false, workspace: workspace)
        }
        func linear(_ index: Int, _ cin: Int, _ cout: Int, kernel: Int = 1, relu: Bool) -> Conv2d {
            Conv2d(name: "classifier.\(index)", cin: cin, cout: cout, kernel: kernel, relu: relu, batchNorm: false,
                   flat: true, workspace: workspace)
        }
        return [
            conv(0, 3, 64, kernel: 11, stride: 4, padding: 2), MaxPool(name: "features.2", ceilMode: false, workspace: workspace),
            conv(3, 64, 192, kernel: 5, padding: 2), MaxPool(name: "features.5", ceilMode: false, workspace: workspace),
            conv(6, 192, 384, kernel: 3, padding: 1),
            conv(8, 384, 256, kernel: 3, padding: 1),
            conv(10, 256, 256, kernel: 3, padding: 1), MaxPool(name: "features.12", ceilMode: false, workspace: workspace),
            AdaptiveAvgPool(name: "avgpool", size: 6, workspace: workspace),
            Dropout(name: "classifier.0", p: config.dropout, rng: SeededRNG(seed: seed, stream: 0xD0)),
            linear(1, 256, 4096, kernel: 6, relu: true),
            Dropout(name: "classifier.3", p: config.dropout, rng: SeededRNG(seed: seed, stream: 0xD1)),
            linear(4, 4096, 4096, relu: true),
            linear(6, 4096, config.classes, relu: false),
        ]
    }

    /// Builds the layers of a SqueezeNet. Names follow torchvision's `features.K` / `classifier.1`
    /// indices, including the positions of ReLUs and pools (so a dropped pool keeps the others' names).
    static func squeezeNetLayers(_ config: ModelConfig, workspace: Workspace, dropoutRNG: SeededRNG) -> [any Layer] {
        let v10 = config.architecture == .squeezenet1_0
        let stemChannels = v10 ? 96 : 64
        var layers = [any Layer]()
        switch config.stem {
        case .imagenet:
            layers.append(Conv2d(name: "features.0", cin: 3, cout: stemChannels, kernel: v10 ? 7 : 3, stride: 2,
                                 relu: true, batchNorm: config.batchNorm, workspace: workspace))
        case .cifar:
            layers.append(Conv2d(name: "features.0", cin: 3, cout: stemChannels, kernel: 3, stride: 1, padding: 1,
                                 relu: true, batchNorm: config.batchNorm, workspace: workspace))
        }
        // torchvision feature indices: 1 is the stem's ReLU, 2 the first pool.
        if !config.lateDownsample { layers.append(MaxPool(name: "features.2", workspace: workspace)) }
        let poolsAfterFire: Set<Int> = v10 ? [2, 6] : [1, 3]  // Fire indices (0-based) followed by a pool
        var index = 3, channels = stemChannels
        for i in 0..<8 {
            let f = config.fire.fire(i)
            let out = f.expand1x1 + f.expand3x3
            layers.append(Fire(name: "features.\(index)", input: channels, squeeze: f.squeeze,
                               expand1x1: f.expand1x1, expand3x3: f.expand3x3,
                               bypass: config.bypass == .simple && channels == out,
                               batchNorm: config.batchNorm, workspace: workspace))
            channels = out
            index += 1
            if poolsAfterFire.contains(i) {
                layers.append(MaxPool(name: "features.\(index)", workspace: workspace))
                index += 1
            }
        }
        layers.append(Dropout(name: "classifier.0", p: config.dropout, rng: dropoutRNG))
        layers.append(Conv2d(name: "classifier.1", cin: channels, cout: config.classes, kernel: 1,
                             relu: true, batchNorm: false, workspace: workspace))
        layers.append(GlobalAvgPool(name: "classifier.3", workspace: workspace))
        return layers
    }
}
