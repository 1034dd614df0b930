import Foundation
import SqueezeData
import SqueezeEngine

/// Set when SIGINT/SIGTERM arrives; the training loop checkpoints and stops at the next step boundary.
nonisolated(unsafe) private var stopSignal: Int32 = 0

public enum StopSignals {
    /// Takes SIGINT and SIGTERM on a thread of their own (`sigwait`), so that no other thread is ever
    /// interrupted by them: no handler runs in the middle of an allocation, no call fails with EINTR.
    /// Call it before starting other threads; they inherit the blocked mask. A second SIGINT exits at once.
    public static func install() {
        stopSignal = 0
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGINT)
        sigaddset(&set, SIGTERM)
        pthread_sigmask(SIG_BLOCK, &set, nil)
        let blocked = set
        let waiter = Thread {
            var signals = blocked
            while true {
                var sig: Int32 = 0
                guard sigwait(&signals, &sig) == 0 else { continue }
                if sig == SIGINT && stopSignal != 0 { _exit(130) }
                stopSignal = sig
            }
        }
        waiter.name = "signals"
        waiter.start()
    }

    public static var received: Int32 { stopSignal }

    /// Ignores SIGINT and SIGTERM (a process whose stop someone else decides).
    public static func ignore() {
        signal(SIGINT, SIG_IGN)
        signal(SIGTERM, SIG_IGN)
    }
}

/// Where a single-process run writes and how often.
public struct RunOptions {
    public var checkpointDirectory: String?
    /// Also checkpoint every K steps (0: only at epoch ends, the end of the run and on SIGTERM).
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

/// The single-process training loop: batches from the prefetching loader, one step each, progress,
/// metrics, test accuracy after every epoch, checkpoints.
public func runTraining(_ trainer: Trainer, testSet: CIFAR10?, options: RunOptions) throws -> RunSummary {
    let metrics = try options.metricsPath.map { try MetricsWriter(path: $0, append: trainer.step > 0) }
    let display = ProgressDisplay()
    let loader = trainer.makeLoader()
    defer { loader.stop() }
    let perEpoch = trainer.stepsPerEpoch
    let epochs = (trainer.config.totalSteps + perEpoch - 1) / perEpoch
    let start = DispatchTime.now().uptimeNanoseconds
    let firstStep = trainer.step
    var epochLoss = 0.0, epochCorrect = 0, epochImages = 0, epochCompute = 0.0
    var epochStart = DispatchTime.now().uptimeNanoseconds, lastStepEnd = epochStart
    var lastEval: Evaluation?
    var interrupted: Int32?

    func checkpoint(_ why: String) throws {
        guard let dir = options.checkpointDirectory else { return }
        let path = try Checkpoint(trainer: trainer).save(directory: dir, keep: options.keepCheckpoints)
        if !options.quiet { display.line("checkpoint at step \(trainer.step) (\(why)): \(path)") }
    }

    while !trainer.isFinished, let batch = loader.next() {
        let r = try trainer.trainStep(batch)
        let now = DispatchTime.now().uptimeNanoseconds
        let stepSeconds = Double(now - lastStepEnd) * 1e-9
        lastStepEnd = now
        epochLoss += Double(r.loss) * Double(r.images); epochCorrect += r.correct; epochImages += r.images
        epochCompute += r.computeSeconds
        let done = r.step + 1 - r.epoch * perEpoch
        let total = min(perEpoch, trainer.config.totalSteps - r.epoch * perEpoch)  // the last epoch may be cut short
        let elapsed = Double(now - epochStart) * 1e-9
        let rate = Double(epochImages) / max(elapsed, 1e-9)
        metrics?.write([("step", r.step), ("epoch", r.epoch), ("rank", 0), ("world_size", 1), ("loss", r.loss),
                        ("accuracy", Double(r.correct) / Double(r.images)), ("learning_rate", r.learningRate),
                        ("images", r.images), ("images_per_second", Double(r.images) / max(stepSeconds, 1e-9)),
                        ("compute_seconds", r.computeSeconds), ("step_seconds", stepSeconds)])
        if !options.quiet {
            let remaining = Double(trainer.config.totalSteps - trainer.step) * Double(trainer.config.batchSize) / max(rate, 1e-9)
            display.update(epoch: r.epoch, epochs: epochs, done: done, total: total, loss: epochLoss / Double(epochImages),
                           accuracy: Double(epochCorrect) / Double(epochImages), imagesPerSecond: rate, etaSeconds: remaining)
        }
        let epochEnded = trainer.step % perEpoch == 0 || trainer.isFinished
        if epochEnded {
            let wait = loader.waitSeconds
            var line = String(format: "epoch %d: train loss %.4f, train accuracy %.2f%%, %.0f img/s, %.1f s; waiting for data %.1f%% of it",
                              r.epoch + 1, epochLoss / Double(epochImages), 100 * Double(epochCorrect) / Double(epochImages),
                              rate, elapsed, 100 * wait / max(elapsed, 1e-9))
            var fields: [(String, Any)] = [("step", r.step), ("epoch", r.epoch), ("train_loss", epochLoss / Double(epochImages)),
                                           ("train_accuracy", Double(epochCorrect) / Double(epochImages)),
                                           ("epoch_seconds", elapsed), ("data_wait_seconds", wait),
                                           ("data_load_seconds", loader.loadSeconds), ("compute_seconds", epochCompute)]
            if options.evaluateEachEpoch, let testSet {
                let e = trainer.evaluate(testSet)
                lastEval = e
                line += String(format: "; test accuracy %.2f%% (loss %.4f)", 100 * e.accuracy, e.loss)
                fields += [("test_accuracy", e.accuracy), ("test_loss", e.loss)]
            }
            if !options.quiet { display.line(line) }
            metrics?.write(fields)
            epochLoss = 0; epochCorrect = 0; epochImages = 0; epochCompute = 0
            loader.resetTimers()
            epochStart = DispatchTime.now().uptimeNanoseconds
            lastStepEnd = epochStart
            try checkpoint(trainer.isFinished ? "end of run" : "end of epoch \(r.epoch + 1)")
        } else if options.checkpointEvery > 0 && trainer.step % options.checkpointEvery == 0 {
            try checkpoint("every \(options.checkpointEvery) steps")
        }
        if StopSignals.received != 0 {
            interrupted = StopSignals.received
            if !epochEnded { try checkpoint("signal \(StopSignals.received)") }
            break
        }
    }
    return RunSummary(stepsRun: trainer.step - firstStep, finalStep: trainer.step, interruptedBy: interrupted,
                      lastEvaluation: lastEval, seconds: Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9)
}
