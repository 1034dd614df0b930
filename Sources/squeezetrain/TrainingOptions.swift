import ArgumentParser
import SqueezeCluster
import SqueezeCollectives
import SqueezeData
import SqueezeEngine
import SqueezeTraining

extension LearningRateSchedule.Kind: ExpressibleByArgument {}
extension FlipMode: ExpressibleByArgument {}

/// Options defining a training run; shared by `train`, `coordinator` and `launch`.
struct TrainingOptions: ParsableArguments {
    @OptionGroup var model: ModelOptions

    @Option(help: "CIFAR-10 directory (binary version). Default: $CIFAR10_DIR, ./data/cifar-10-batches-bin, ../shared/data/cifar-10-batches-bin.")
    var data: String?

    @Option(help: "Length of the run in epochs (counting epochs before a resume).")
    var epochs: Int?
    @Option(help: "Length of the run in steps (counting steps before a resume); overrides --epochs.")
    var steps: Int?

    @Option(help: "Global batch size per step.")
    var batchSize = 128
    @Option(help: "Peak learning rate.")
    var lr: Float = 0.05
    @Option(help: "SGD momentum.")
    var momentum: Float = 0.9
    @Flag(help: "Nesterov momentum.")
    var nesterov = false
    @Option(help: "L2 weight decay (applied to every parameter, as torch.optim.SGD).")
    var weightDecay: Float = 5e-4
    @Flag(help: "Decouple the weight decay (SGDW, Loshchilov & Hutter): instead of adding λ·p to the gradient, shrink every parameter by (lr now / --lr)·λ·p each step, outside the momentum; λ = --weight-decay.")
    var decoupledWeightDecay = false
    @Option(help: ArgumentHelp("Train BatchNorm's biases (β) at S × the learning rate, with their L2 weight decay divided by S (airbench's bias scaler; needs --batch-norm).", valueName: "S"))
    var bnBiasLrScale: Float = 1
    @Option(help: "Learning-rate schedule after the warm-up: constant, step (×0.1 at 50% and 75% of the run), cosine (to 0) or linear (a straight line down to --lr-floor × --lr; with --warmup-epochs, triangular).")
    var schedule: LearningRateSchedule.Kind = .cosine
    @Option(help: ArgumentHelp("With --schedule linear: the rate it ends at, as a fraction of --lr (0...1).", valueName: "F"))
    var lrFloor: Float = 0
    @Option(help: "Linear learning-rate warm-up, in epochs.")
    var warmupEpochs: Double = 0
    @Option(help: "Seed for initialisation, data order, augmentation and dropout.")
    var seed: UInt64 = 0
    @Option(help: "Dropout probability before the classifier.")
    var dropout: Float = 0.5
    @Flag(help: "No random crop and flip.")
    var noAugment = false
    @Option(help: "Horizontal flips of training images: random (each image with probability ½ every epoch), alternating (each image every other epoch, which epochs drawn once per image from the seed; airbench's derandomised flips) or none.")
    var flip: FlipMode = .random
    @Option(help: ArgumentHelp("Random crop: shift each training image by up to N pixels in each direction (a 32×32 crop of the image zero-padded by N; 0...4).", valueName: "N"))
    var translate = 4
    @Option(help: "Cutout: blank a random N×N square of every training image after crop and flip (DeVries & Taylor, 2017; 0: off).")
    var cutout = 0
    @Option(help: "Label smoothing ε of the training loss: targets (1 − ε)·one-hot + ε/classes, as PyTorch's CrossEntropyLoss(label_smoothing:). Test loss stays plain.")
    var labelSmoothing: Float = 0
    @Flag(help: "Take records in file order instead of a seeded shuffle per epoch.")
    var noShuffle = false
    @Option(help: ArgumentHelp("Keep an exponential moving average of the weights and BatchNorm statistics, e ← d·e + (1 − d)·w after each step, and use it for the per-epoch test accuracy and the final weights (--save-weights); checkpoints keep it (0: off).", valueName: "d"))
    var ema: Float = 0
    @Option(help: ArgumentHelp("With --ema: the average only follows the weights for the first E epochs, then starts averaging.", valueName: "E"))
    var emaStartEpochs: Double = 0
    @Option(help: ArgumentHelp("With --ema: update the average every K steps.", valueName: "K"))
    var emaEvery = 1
    @Flag(help: "With --ema: after each update set the weights to the average (airbench's Lookahead-style variant).")
    var emaLookahead = false
    @Option(help: ArgumentHelp("With --ema: the update after step t of T uses d·(t/T)^P instead of d (airbench: P = 3; 0: a constant d).", valueName: "P"))
    var emaDecayPower: Double = 0

    @Flag(help: "With --compress topk:F (a cluster): Deep Gradient Compression's momentum correction. Each worker applies --momentum (and --nesterov) to its own gradients before it picks its top k and accumulates that velocity in its residual; the entries it sends leave the velocity too (momentum factor masking). The optimizer's momentum then acts on the weight decay alone.")
    var momentumCorrection = false
    @Option(help: ArgumentHelp("With --compress topk:F (a cluster): Deep Gradient Compression's local gradient clipping. Each worker scales each gradient bucket down to an L2 norm of C/√workers before it picks its top k (0: off).", valueName: "C"))
    var localClipNorm: Float = 0
    @Option(help: ArgumentHelp("With --compress topk:F (a cluster): Deep Gradient Compression's sparsity warm-up. During epoch e < E the workers keep F^((e+1)/(E+1)) of the entries instead of F, so the sparsity rises exponentially to F's (0: off).", valueName: "E"))
    var sparsityWarmupEpochs = 0

    func validate() throws {
        try requireRange("--batch-size", batchSize, 1...50_000)
        // Bounded so that epochs × steps per epoch cannot overflow (a billion steps is decades here).
        if let epochs { try requireRange("--epochs", epochs, 1...100_000) }
        if let steps { try requireRange("--steps", steps, 1...1_000_000_000) }
        guard lr > 0, lr.isFinite, lr <= 1000 else { throw ValidationError("--lr must be a positive finite number up to 1000 (got \(lr))") }
        guard momentum >= 0, momentum < 1 else { throw ValidationError("--momentum must be in [0, 1) (got \(momentum))") }
        guard weightDecay >= 0, weightDecay <= 1 else { throw ValidationError("--weight-decay must be in 0...1 (got \(weightDecay))") }
        try requireFinite("--warmup-epochs", warmupEpochs, 0...100_000)
        guard lrFloor >= 0, lrFloor <= 1 else { throw ValidationError("--lr-floor must be a fraction of --lr in 0...1 (got \(lrFloor))") }
        if lrFloor > 0 && schedule != .linear { throw ValidationError("--lr-floor is where the linear schedule ends; add --schedule linear") }
        guard bnBiasLrScale > 0, bnBiasLrScale <= 1000 else { throw ValidationError("--bn-bias-lr-scale must be in (0, 1000] (got \(bnBiasLrScale))") }
        if bnBiasLrScale != 1 && !model.config.batchNorm {
            throw ValidationError("--bn-bias-lr-scale scales BatchNorm's biases, and this model has no BatchNorm; add --batch-norm")
        }
        guard dropout >= 0, dropout < 1 else { throw ValidationError("--dropout must be in [0, 1) (got \(dropout))") }
        guard (0...CIFAR10.imageSide).contains(cutout) else { throw ValidationError("--cutout must be in 0...32 pixels (got \(cutout))") }
        guard labelSmoothing >= 0, labelSmoothing < 1 else { throw ValidationError("--label-smoothing must be in [0, 1) (got \(labelSmoothing))") }
        if cutout > 0 && noAugment { throw ValidationError("--cutout is an augmentation; it cannot be combined with --no-augment") }
        try requireRange("--translate", translate, 0...4, " pixels")
        for (flag, given) in [("--flip", flip != .random), ("--translate", translate != 4)] where given && noAugment {
            throw ValidationError("\(flag) is an augmentation; it cannot be combined with --no-augment")
        }
        try validateEMA()
        guard localClipNorm >= 0, localClipNorm.isFinite else { throw ValidationError("--local-clip-norm must be a finite norm ≥ 0 (got \(localClipNorm))") }
        try requireRange("--sparsity-warmup-epochs", sparsityWarmupEpochs, 0...100_000)
        if momentumCorrection && momentum == 0 {
            throw ValidationError("--momentum-correction moves --momentum into each worker's top-k, and --momentum is 0: set --momentum (e.g. 0.9)")
        }
    }

    /// Deep Gradient Compression's flags refine top-k: refused unless the run's `--compress` is topk:F
    /// (nil: `train`, one process, no gradient compression).
    func validateDGC(compress: GradientCompression?) throws {
        guard let dgc = dgcSettings(stepsPerEpoch: 1) else { return }
        guard let compress else {
            throw ValidationError("\(dgc.flags[0]) refines a cluster's top-k gradient compression, and train is one process: use launch --workers N --compress topk:F")
        }
        if let refusal = dgc.refusal(compress) { throw ValidationError(refusal) }
    }

    /// The DGC flags as the run's settings (nil: none given).
    private func dgcSettings(stepsPerEpoch: Int) -> DGCSettings? {
        guard momentumCorrection || localClipNorm > 0 || sparsityWarmupEpochs > 0 else { return nil }
        return DGCSettings(momentumCorrection: momentumCorrection, localClipNorm: localClipNorm > 0 ? localClipNorm : nil,
                           warmupEpochs: sparsityWarmupEpochs, stepsPerEpoch: stepsPerEpoch)
    }

    private func validateEMA() throws {
        guard ema == 0 else {
            guard ema > 0, ema < 1 else { throw ValidationError("--ema must be a decay in (0, 1), e.g. 0.999, or 0 for none (got \(ema))") }
            try requireFinite("--ema-start-epochs", emaStartEpochs, 0...100_000)
            try requireFinite("--ema-decay-power", emaDecayPower, 0...100)
            return try requireRange("--ema-every", emaEvery, 1...1_000_000)
        }
        for (flag, given) in [("--ema-start-epochs", emaStartEpochs != 0), ("--ema-every", emaEvery != 1), ("--ema-lookahead", emaLookahead),
                              ("--ema-decay-power", emaDecayPower != 0)] where given {
            throw ValidationError("\(flag) sets up the moving average of the weights; add --ema DECAY (e.g. --ema 0.999)")
        }
    }

    /// The run's configuration; `trainingRecords` sizes an epoch (for --epochs and warm-up).
    func config(trainingRecords: Int, workers: Int = 1) -> TrainingConfig {
        var c = TrainingConfig()
        c.model = model.config
        c.model.dropout = dropout
        c.batchSize = batchSize; c.learningRate = lr; c.momentum = momentum; c.nesterov = nesterov
        c.weightDecay = weightDecay; c.schedule = schedule; c.lrFloor = lrFloor > 0 ? lrFloor : nil
        c.decoupledWeightDecay = decoupledWeightDecay ? true : nil
        c.bnBiasLearningRateScale = bnBiasLrScale != 1 ? bnBiasLrScale : nil
        c.warmupEpochs = warmupEpochs; c.seed = seed
        c.augment = !noAugment; c.shuffle = !noShuffle
        c.cutout = cutout > 0 ? cutout : nil
        c.flip = flip == .random ? nil : flip
        c.translate = translate == 4 ? nil : translate
        c.labelSmoothing = labelSmoothing > 0 ? labelSmoothing : nil
        c.ema = ema > 0 ? EMASettings(decay: ema, startEpochs: emaStartEpochs, every: emaEvery, lookahead: emaLookahead,
                                           decayPower: emaDecayPower != 0 ? emaDecayPower : nil) : nil
        let perEpoch = c.stepsPerEpoch(trainingRecords: trainingRecords, workers: workers)
        c.totalSteps = steps ?? (epochs ?? 30) * perEpoch
        c.dgc = dgcSettings(stepsPerEpoch: perEpoch)
        return c
    }

    func dataDirectory() throws -> String { try CIFAR10.resolveDirectory(explicit: data) }
}
