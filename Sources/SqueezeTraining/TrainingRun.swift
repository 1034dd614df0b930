import Foundation
import SqueezeData
import SqueezeEngine

/// Where a single-process run writes and how often.
public struct RunOptions {
    public var checkpointDirectory: String?
    /// Also checkpoint every K steps (0: only at epoch ends, the end of the run and on a stop).
    public var checkpointEvery = 0
    public var keepCheckpoints = 3
    public var metricsPath: String?
    public var evaluateEachEpoch = true
    public var quiet = false
    public init() {}
}

/// How a run ended.
public struct RunSummary {
    public var stepsRun: Int
    public var finalStep: Int
    public var interruptedBy: Int32?
    public var lastEvaluation: Evaluation?
    public var seconds: Double
}

/// The single-process run (`train`): `TrainingLoop` without a reducer, with progress, metrics
/// lines, test accuracy after every epoch and checkpoints. `stop` ends it early (with a checkpoint).
public func runTraining(_ trainer: Trainer, testSet: CIFAR10?, options: RunOptions, stop: StopToken = StopToken(),
                        metrics: MetricsSink? = nil) throws -> RunSummary {
    let sink = try metrics ?? options.metricsPath.map { try MetricsWriter(path: $0, append: trainer.step > 0) }
    let hooks = SingleProcessHooks(trainer: trainer, testSet: testSet, options: options, metrics: sink)
    let start = DispatchTime.now().uptimeNanoseconds
    let outcome = try TrainingLoop(trainer: trainer, policy: CheckpointPolicy(every: options.checkpointEvery), stop: stop).run(hooks)
    return RunSummary(stepsRun: outcome.stepsRun, finalStep: outcome.finalStep,
                      interruptedBy: outcome.stoppedEarly != nil ? stop.signal : nil,
                      lastEvaluation: hooks.lastEvaluation, seconds: Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9)
}

/// `train`'s side of the loop: a metrics line per step and per epoch, the progress display, the
/// test set after every epoch, checkpoints in one directory.
final class SingleProcessHooks: TrainingLoopHooks {
    let trainer: Trainer, testSet: CIFAR10?, options: RunOptions, metrics: MetricsSink?
    let display = ProgressDisplay()
    private(set) var lastEvaluation: Evaluation?
    private let perEpoch: Int, epochs: Int, forwardMACs: Int
    private let runStart = DispatchTime.now().uptimeNanoseconds
    private var epochLoss = 0.0, epochCorrect = 0, epochImages = 0, epochCompute = 0.0
    private var epochStart = DispatchTime.now().uptimeNanoseconds
    private lazy var lastStepEnd = epochStart

    init(trainer: Trainer, testSet: CIFAR10?, options: RunOptions, metrics: MetricsSink?) {
        self.trainer = trainer; self.testSet = testSet; self.options = options; self.metrics = metrics
        perEpoch = trainer.stepsPerEpoch
        epochs = (trainer.config.totalSteps + perEpoch - 1) / perEpoch
        forwardMACs = trainer.network.forwardMACs(inputSize: trainer.config.model.inputSize)
    }

    func willStep(_ step: Int, loader: BatchLoader) {}
    func stepFinished(_ result: StepResult) throws {}

    func didStep(_ r: StepResult, epochEnded: Bool, loader: BatchLoader) throws {
        let now = DispatchTime.now().uptimeNanoseconds
        let stepSeconds = Double(now - lastStepEnd) * 1e-9
        lastStepEnd = now
        epochLoss += Double(r.loss) * Double(r.images); epochCorrect += r.correct; epochImages += r.images
        epochCompute += r.computeSeconds
        let elapsed = Double(now - epochStart) * 1e-9
        let rate = Double(epochImages) / max(elapsed, 1e-9)
        metrics?.record(TrainStepMetrics(step: r.step, epoch: r.epoch, loss: r.loss, accuracy: Double(r.correct) / Double(r.images),
                                         learningRate: r.learningRate, images: r.images,
                                         imagesPerSecond: Double(r.images) / max(stepSeconds, 1e-9),
                                         computeSeconds: r.computeSeconds, stepSeconds: stepSeconds))
        if !options.quiet {
            let done = r.step + 1 - r.epoch * perEpoch
            let total = min(perEpoch, trainer.config.totalSteps - r.epoch * perEpoch)  // the last epoch may be cut short
            let remaining = Double(trainer.config.totalSteps - trainer.step) * Double(trainer.config.batchSize) / max(rate, 1e-9)
            display.update(epoch: r.epoch, epochs: epochs, done: done, total: total, loss: epochLoss / Double(epochImages),
                           accuracy: Double(epochCorrect) / Double(epochImages), imagesPerSecond: rate, etaSeconds: remaining)
        }
        if epochEnded { endEpoch(r, elapsed: elapsed, rate: rate, loader: loader) }
    }

    private func endEpoch(_ r: StepResult, elapsed: Double, rate: Double, loader: BatchLoader) {
        let wait = loader.waitSeconds
        var line = String(format: "epoch %d: train loss %.4f, train accuracy %.2f%%, %.0f img/s, %.1f s; waiting for data %.1f%% of it",
                          r.epoch + 1, epochLoss / Double(epochImages), 100 * Double(epochCorrect) / Double(epochImages),
                          rate, elapsed, 100 * wait / max(elapsed, 1e-9))
        var fields = TrainEpochMetrics(step: r.step, epoch: r.epoch, trainLoss: epochLoss / Double(epochImages),
                                       trainAccuracy: Double(epochCorrect) / Double(epochImages), epochSeconds: elapsed,
                                       dataWaitSeconds: wait, dataLoadSeconds: loader.loadSeconds, computeSeconds: epochCompute,
                                       elapsedSeconds: Double(DispatchTime.now().uptimeNanoseconds - runStart) * 1e-9,
                                       trainMacs: trainingMACs(steps: r.step + 1, batchSize: trainer.config.batchSize, forwardMACs: forwardMACs))
        if options.evaluateEachEpoch, let testSet {
            let e = trainer.evaluate(testSet)
            lastEvaluation = e
            line += String(format: "; test accuracy %.2f%% (loss %.4f)", 100 * e.accuracy, e.loss)
            fields.testAccuracy = e.accuracy; fields.testLoss = e.loss
        }
        if !options.quiet { display.line(line) }
        metrics?.record(fields)
        epochLoss = 0; epochCorrect = 0; epochImages = 0; epochCompute = 0
        loader.resetTimers()
        epochStart = DispatchTime.now().uptimeNanoseconds
        lastStepEnd = epochStart
    }

    func checkpoint(reason: String) throws {
        guard let dir = options.checkpointDirectory else { return }
        let path = try Checkpoint(trainer: trainer).save(directory: dir, keep: options.keepCheckpoints)
        if !options.quiet { display.line("checkpoint at step \(trainer.step) (\(reason)): \(path)") }
    }
}
