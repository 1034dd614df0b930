import SqueezeData
import SqueezeEngine

/// Everything that defines a training run's arithmetic (not where it runs): saved in checkpoints,
/// sent by the coordinator to every worker, and compared on resume.
public struct TrainingConfig: Codable, Equatable, Sendable {
    public var model = ModelConfig()
    /// Global batch per step (split evenly over workers in a cluster).
    public var batchSize = 128
    /// Length of the run in steps, counting steps before any resume. Set from --epochs or --steps.
    public var totalSteps = 0
    public var learningRate: Float = 0.05
    public var momentum: Float = 0.9
    public var nesterov = false
    public var weightDecay: Float = 5e-4
    /// `--decoupled-weight-decay`: SGDW's decay instead of L2 (`SGD`; nil: L2, as before).
    public var decoupledWeightDecay: Bool?
    /// `--bn-bias-lr-scale`: BatchNorm's biases train at this multiple of the learning rate (nil: 1).
    public var bnBiasLearningRateScale: Float?
    public var schedule: LearningRateSchedule.Kind = .cosine
    /// `--lr-floor`: where the `linear` schedule ends, as a fraction of the learning rate (nil: 0).
    public var lrFloor: Float?
    public var warmupEpochs: Double = 0
    public var seed: UInt64 = 0
    public var augment = true
    /// Side of a Cutout square applied after crop and flip (nil: none; optional so that
    /// checkpoints written before it existed still decode).
    public var cutout: Int?
    /// `--flip`: how training images are mirrored (nil: `.random`, the original; optional for the same reason).
    public var flip: FlipMode?
    /// `--translate`: the crop's largest shift in pixels, 0...4 (nil: 4, the original).
    public var translate: Int?
    /// Label smoothing ε of the training loss (nil: none; optional for the same reason).
    public var labelSmoothing: Float?
    public var shuffle = true
    /// Arithmetic of the convolution GEMMs (nil: fp32; optional so that older checkpoints decode).
    /// Gradients stay fp32 either way, so the all-reduce is unchanged.
    public var precision: Precision?
    /// `--ema`: an exponential moving average of the weights, used for evaluation and the final
    /// weights (nil: none; optional so that older checkpoints decode).
    public var ema: EMASettings?
    /// Deep Gradient Compression's additions to a cluster's `--compress topk:F` (nil: none; optional
    /// so that older checkpoints decode).
    public var dgc: DGCSettings?
    /// Side of the (square) training images: 32, CIFAR-10's own, or 64 (upsampled) for AlexNet.
    public var imageSize: Int { model.cifarImageSize }

    public init() {}

    /// Number of optimizer steps in one epoch of `trainingRecords` records at this global batch.
    public func stepsPerEpoch(trainingRecords: Int, workers: Int = 1) -> Int {
        let padded = (trainingRecords + workers - 1) / workers * workers
        return max(padded / batchSize, 1)
    }

    public func learningRateSchedule(stepsPerEpoch: Int) -> LearningRateSchedule {
        LearningRateSchedule(kind: schedule, baseRate: learningRate, totalSteps: totalSteps,
                             warmupSteps: Int((warmupEpochs * Double(stepsPerEpoch)).rounded()), floor: lrFloor ?? 0)
    }
}

/// `--momentum-correction`, `--local-clip-norm` and `--sparsity-warmup-epochs`: Deep Gradient
/// Compression's additions to top-k (SqueezeCollectives' `DGCOptions` says what each does). They
/// change the run's arithmetic, so they are part of its configuration; a cluster with
/// `--compress topk:F` alone uses them.
public struct DGCSettings: Codable, Equatable, Sendable {
    /// Momentum correction and momentum factor masking, with the run's `--momentum` and `--nesterov`.
    public var momentumCorrection: Bool
    /// Local gradient clipping: each bucket's L2 norm at most this / √workers (nil: none).
    public var localClipNorm: Float?
    /// Sparsity warm-up over this many epochs (0: none) of `stepsPerEpoch` steps.
    public var warmupEpochs: Int
    public var stepsPerEpoch: Int

    /// The command-line flags that set these.
    public var flags: [String] {
        [(momentumCorrection, "--momentum-correction"), (localClipNorm != nil, "--local-clip-norm"),
         (warmupEpochs > 0, "--sparsity-warmup-epochs")].filter(\.0).map(\.1)
    }

    public init(momentumCorrection: Bool = false, localClipNorm: Float? = nil, warmupEpochs: Int = 0, stepsPerEpoch: Int = 1) {
        self.momentumCorrection = momentumCorrection; self.localClipNorm = localClipNorm
        self.warmupEpochs = warmupEpochs; self.stepsPerEpoch = stepsPerEpoch
    }
}
