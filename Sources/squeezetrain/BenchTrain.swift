import ArgumentParser
import Foundation
import SqueezeEngine
import SqueezeSystem

struct BenchTrain: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "train",
        abstract: "Training throughput (forward + backward + SGD step) on random data, after a warm-up.")

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var precisionOption: PrecisionOption
    @Option(help: "Images per step.") var batchSize = 128
    @Option(help: "Compute threads (oneDNN/OpenMP).") var threads = 1
    @Option(help: "Timed steps (the median is reported).") var steps = 20
    @Option(help: "Untimed warm-up steps.") var warmup = 3
    @Flag(help: "Print a JSON object.") var json = false
    @OptionGroup(title: "Timeline (steps numbered from 0, warm-up steps included; to see its cost, compare with and without)")
    var tracing: TraceOptions

    struct Report: Encodable {
        var model: String, stem: String, batchSize: Int, threads: Int, steps: Int
        var imagesPerSecond: Double
        var secondsPerStepMedian: Double, secondsPerStepMin: Double
        var forwardSeconds: Double, backwardSeconds: Double, optimizerSeconds: Double
        var peakResidentBytes: Int
        /// The precision that ran (bf16 falls back to fp32 on a CPU without AVX512_BF16).
        var precision: String
    }

    func validate() throws {
        guard batchSize >= 1 else { throw ValidationError("--batch-size must be at least 1") }
        guard threads >= 1 else { throw ValidationError("--threads must be at least 1") }
        guard steps >= 1, warmup >= 0 else { throw ValidationError("--steps must be at least 1 and --warmup not negative") }
    }

    func run() throws {
        ComputeThreads.set(threads)
        let config = modelOptions.config
        let net = Network(config: config, seed: 0)
        net.precision = precisionOption.resolved()
        net.useDirectConvolution = directConvolutionRequested
        let tracer = tracing.tracer(pid: 0, processName: "bench train")
        net.tracer = tracer
        let size = config.inputSize
        let shape = Shape(c: 3, n: batchSize, h: size, w: size)
        let input = FloatBuffer(count: shape.count)
        var rng = SeededRNG(seed: 1)
        for i in 0..<shape.count { input.pointer[i] = rng.normal() }
        let labels = (0..<batchSize).map { _ in Int32(rng.below(config.classes)) }
        let x = Tensor(data: input.pointer, shape: shape)
        let sgd = SGD(parameterCount: net.parameters.count, momentum: 0.9, weightDecay: 5e-4)

        var total = [Double](), fwd = [Double](), bwd = [Double](), opt = [Double]()
        for i in 0..<(warmup + steps) {
            tracer?.beginStep(i)
            let t0 = DispatchTime.now().uptimeNanoseconds
            let logits = net.forward(x, training: true)
            let t1 = DispatchTime.now().uptimeNanoseconds
            let grad = FloatBuffer(count: logits.shape.count)
            _ = softmaxCrossEntropy(logits: logits.data, classes: logits.shape.c, batch: batchSize, labels: labels, gradient: grad.pointer)
            net.backward(Tensor(data: grad.pointer, shape: logits.shape))
            let t2 = DispatchTime.now().uptimeNanoseconds
            traced(tracer, .compute, "optimizer", "optimizer step", ["step": i]) { sgd.step(net.parameters, learningRate: 0.01) }
            let t3 = DispatchTime.now().uptimeNanoseconds
            guard i >= warmup else { continue }
            fwd.append(Double(t1 - t0) / 1e9); bwd.append(Double(t2 - t1) / 1e9); opt.append(Double(t3 - t2) / 1e9)
            total.append(Double(t3 - t0) / 1e9)
        }
        tracer?.endRecording()
        if !json { writeTrace(tracer) } else { try tracer?.write() }
        let median = total.sorted()[total.count / 2]
        let report = Report(model: config.architecture.rawValue, stem: config.stem.rawValue, batchSize: batchSize,
                            threads: threads, steps: steps, imagesPerSecond: Double(batchSize) / median,
                            secondsPerStepMedian: median, secondsPerStepMin: total.min()!,
                            forwardSeconds: fwd.sorted()[fwd.count / 2], backwardSeconds: bwd.sorted()[bwd.count / 2],
                            optimizerSeconds: opt.sorted()[opt.count / 2], peakResidentBytes: peakResidentBytes(),
                            precision: net.precision.rawValue)
        if json { return try printJSON(report) }
        print("\(report.model) \(report.stem) stem, batch \(batchSize), \(threads) thread(s), \(report.precision), median of \(steps) steps:")
        print(String(format: "  %.0f images/s  (%.1f ms/step: forward %.1f, backward %.1f, optimizer %.1f)",
                     report.imagesPerSecond, median * 1e3, report.forwardSeconds * 1e3, report.backwardSeconds * 1e3,
                     report.optimizerSeconds * 1e3))
        print("  peak resident memory \(humanBytes(Double(report.peakResidentBytes)))")
    }
}
