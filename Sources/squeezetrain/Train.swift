import ArgumentParser
import Foundation
import SqueezeData
import SqueezeEngine
import SqueezeSystem
import SqueezeTraining

struct Train: ReportingCommand {
    static let configuration = CommandConfiguration(
        abstract: "Train on CIFAR-10 in this process (the training loop every cluster worker runs, without the all-reduce).")

    @OptionGroup var training: TrainingOptions
    @OptionGroup var precision: PrecisionOption
    @Option(help: "Compute threads (oneDNN/OpenMP); data loading runs on one more thread.")
    var threads = 1
    @Option(help: "Start from these weights (safetensors, torchvision names) instead of a fresh initialisation.")
    var initWeights: String?
    @Option(help: "Write the final weights here (safetensors, torchvision names).")
    var saveWeights: String?
    @Option(help: "Append JSON lines here: one per step, one per epoch with test_accuracy.")
    var metrics: String?
    @OptionGroup var checkpoints: CheckpointOptions
    @Flag(help: "Skip the test-set evaluation after each epoch.")
    var noEval = false
    @OptionGroup(title: "Timeline") var tracing: TraceOptions

    func validate() throws {
        try requireRange("--threads", threads, 1...256)
        try training.validateDGC(compress: nil)
        _ = try convolutionOverride()
    }

    func execute() throws {
        let stop = stopOnSignals()  // first: threads started later inherit its signal mask
        ComputeThreads.set(threads)
        // First: a directory another run holds is refused before any work; held for the whole run.
        let lock = try DirectoryLock.acquire(checkpoints.checkpointDir, log: { emit($0 + "\n") })
        defer { withExtendedLifetime(lock) {} }
        let dir = try training.dataDirectory()
        let trainSet = try CIFAR10(directory: dir, split: .train)
        let testSet = noEval ? nil : try CIFAR10(directory: dir, split: .test)
        var config = training.config(trainingRecords: trainSet.count)
        let precision = self.precision.resolved()
        config.precision = precision == .fp32 ? nil : precision
        let trainer = try Trainer(config: config, trainSet: trainSet)
        trainer.network.convolutionAlgorithm = try convolutionOverride()
        trainer.tracer = tracing.tracer(pid: 0, processName: "train")
        defer { writeTrace(trainer.tracer) }
        if let initWeights { try trainer.network.loadWeights(from: initWeights) }
        if let found = try Resume.start(directory: checkpoints.checkpointDir, resume: checkpoints.resume,
                                        startOver: checkpoints.startOver, log: { emit($0 + "\n") }) {
            try found.restore(into: trainer)
            emit("resuming from \(found.path!) at step \(found.step) (epoch \(trainer.epoch + 1), batch \(trainer.position.batch))\n")
        }
        emit("training \(config.model.architecture.rawValue) (\(grouped(trainer.network.parameters.count)) parameters) on \(dir): "
             + "\(trainSet.count) images, \(trainer.stepsPerEpoch) steps of \(config.batchSize) per epoch, "
             + "\(config.totalSteps) steps, \(threads) thread(s)" + (precision == .fp32 ? "" : ", \(precision.rawValue)") + "\n")
        var options = RunOptions()
        options.checkpointDirectory = checkpoints.checkpointDir
        options.checkpointEvery = checkpoints.checkpointEvery
        options.keepCheckpoints = checkpoints.keepCheckpoints
        options.metricsPath = metrics
        options.evaluateEachEpoch = !noEval
        let summary = try runTraining(trainer, testSet: testSet, options: options, stop: stop)
        if let saveWeights {
            try trainer.network.saveWeights(to: saveWeights)
            emit("weights written to \(saveWeights)\n")
        }
        if let sig = summary.interruptedBy {
            emit("stopped by signal \(sig) at step \(summary.finalStep)" + (checkpoints.checkpointDir != nil ? "; resume with --resume\n" : "\n"))
            throw ExitCode(128 + sig)
        }
        var line = "done: \(summary.stepsRun) steps in \(ProgressDisplay.duration(summary.seconds))"
        if let e = summary.lastEvaluation { line += String(format: ", test accuracy %.2f%%", 100 * e.accuracy) }
        emit(line + "\n")
    }
}

struct Eval: ReportingCommand {
    static let configuration = CommandConfiguration(
        abstract: "Test-set accuracy of saved weights: overall, per class, and the confusion matrix.")

    @OptionGroup(title: "Model options (read from the weights' metadata when they have it; given ones must agree)") var model: ModelOptions
    @OptionGroup var precision: PrecisionOption
    @Option(help: "Weights to evaluate: safetensors with torchvision names (e.g. from --save-weights or export) or a compressed model (.sqz).")
    var weights: String
    @Option(help: "CIFAR-10 directory (see train --help).")
    var data: String?
    @Option(help: "Compute threads.")
    var threads = 1
    @Option(help: "Images per forward pass.")
    var batchSize = 500
    @Option(help: "Test-time augmentation: none, or flip (average the softmax of each image and its mirror image).")
    var tta: TestTimeAugmentation = .none
    @Flag(help: "Print a JSON object (with `accuracy`).")
    var json = false

    struct Report: Encodable {
        var weights: String, images: Int, tta: String, accuracy: Double, loss: Double
        var classes: [String], perClassAccuracy: [Double], confusionMatrix: [[Int]]
    }

    func validate() throws {
        try requireRange("--batch-size", batchSize, 1...10_000)
        try requireRange("--threads", threads, 1...256)
    }

    func execute() throws {
        ComputeThreads.set(threads)
        let testSet = try CIFAR10(directory: try CIFAR10.resolveDirectory(explicit: data), split: .test)
        let net = try loadNetwork(weights: weights, model: model)
        net.precision = precision.resolved()
        let config = net.config
        guard config.classes >= CIFAR10.classNames.count else {
            throw ValidationError("\(weights) holds a model with \(config.classes) classes; CIFAR-10's test set has \(CIFAR10.classNames.count)")
        }
        let e = Trainer.evaluate(net, testSet, batchSize: batchSize, imageSize: config.cifarImageSize, flip: tta == .flip)
        let names = config.classes == 10 ? CIFAR10.classNames : (0..<config.classes).map { "class \($0)" }
        let report = Report(weights: weights, images: e.images, tta: tta.rawValue, accuracy: e.accuracy, loss: e.loss, classes: names,
                            perClassAccuracy: e.perClassAccuracy, confusionMatrix: e.confusion)
        if json { return try printJSON(report) }
        print(String(format: "test accuracy %.2f%% on %d images (loss %.4f)", 100 * e.accuracy, e.images, e.loss)
              + (tta == .flip ? ", each averaged with its mirror image" : ""))
        print("\nper class:")
        for (i, n) in names.enumerated() { print(pad(n, 12) + String(format: "%6.2f%%", 100 * e.perClassAccuracy[i])) }
        print("\nconfusion matrix (rows: true class, columns: predicted):")
        print(pad("", 12) + names.map { pad(String($0.prefix(5)), 6, right: true) }.joined())
        for (i, row) in e.confusion.enumerated() { print(pad(names[i], 12) + row.map { pad(String($0), 6, right: true) }.joined()) }
    }
}

/// `eval --tta`.
enum TestTimeAugmentation: String, ExpressibleByArgument, CaseIterable {
    case none, flip
}
