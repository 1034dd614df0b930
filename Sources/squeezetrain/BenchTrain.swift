import ArgumentParser
import Foundation
import SqueezeTraining
import SqueezeEngine
import SqueezeSystem

struct BenchTrain: ReportingCommand {
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
    @Flag(help: ArgumentHelp(
        "Also time every layer: forward and backward milliseconds (medians), GFLOP/s and the implementation that ran.",
        discussion: "Each convolution (a Fire module's three separately), its BatchNorm, pooling and dropout. GFLOP/s counts "
            + "2 operations per multiply-accumulate: forward 2·MACs·batch, backward twice that (weight and input gradients; "
            + "once for the first convolution, whose input gradient nobody needs)."))
    var layers = false
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
        /// Per layer, with `--layers`.
        var layers: [LayerTime]?
    }

    /// One row of `--layers`: medians over the timed steps.
    struct LayerTime: Encodable {
        var name: String, implementation: String
        var forwardMilliseconds: Double, backwardMilliseconds: Double
        /// nil for layers without multiply-accumulates (BatchNorm, pooling, dropout).
        var forwardGflops: Double?, backwardGflops: Double?

        init(_ e: LayerProfile.Entry) {
            func median(_ v: [Double]) -> Double { v.isEmpty ? 0 : v.sorted()[v.count / 2] }
            func rate(_ flops: Int, _ seconds: Double) -> Double? { flops > 0 && seconds > 0 ? Double(flops) / seconds / 1e9 : nil }
            let (f, b) = (median(e.forwardSeconds), median(e.backwardSeconds))
            (name, implementation) = (e.name, e.implementation)
            (forwardMilliseconds, backwardMilliseconds) = (f * 1e3, b * 1e3)
            (forwardGflops, backwardGflops) = (rate(e.forwardFLOPs, f), rate(e.backwardFLOPs, b))
        }
    }

    func validate() throws {
        guard batchSize >= 1 else { throw ValidationError("--batch-size must be at least 1") }
        guard threads >= 1 else { throw ValidationError("--threads must be at least 1") }
        guard steps >= 1, warmup >= 0 else { throw ValidationError("--steps must be at least 1 and --warmup not negative") }
        _ = try convolutionOverride()
    }

    func execute() throws {
        ComputeThreads.set(threads)
        let config = modelOptions.config
        let net = Network(config: config, seed: 0)
        net.precision = precisionOption.resolved()
        net.convolutionAlgorithm = try convolutionOverride()
        let profile = layers ? LayerProfile() : nil
        net.profile = profile
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
            if i == warmup { profile?.clearSamples() }
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
                            precision: net.precision.rawValue, layers: profile?.entries.map(LayerTime.init))
        if json { return try printJSON(report) }
        print("\(report.model) \(report.stem) stem, batch \(batchSize), \(threads) thread(s), \(report.precision), median of \(steps) steps:")
        print(String(format: "  %.0f images/s  (%.1f ms/step: forward %.1f, backward %.1f, optimizer %.1f)",
                     report.imagesPerSecond, median * 1e3, report.forwardSeconds * 1e3, report.backwardSeconds * 1e3,
                     report.optimizerSeconds * 1e3))
        print("  peak resident memory \(humanBytes(Double(report.peakResidentBytes)))")
        if let rows = report.layers { printLayers(rows) }
    }

    private func printLayers(_ rows: [LayerTime]) {
        func gflops(_ g: Double?) -> String { g.map { String(format: "%.1f", $0) } ?? "-" }
        let width = max(5, rows.map(\.name.count).max() ?? 0), implWidth = max(14, rows.map(\.implementation.count).max() ?? 0)
        print("\n" + pad("layer", width) + "  " + pad("implementation", implWidth) + "  forward ms  GFLOP/s  backward ms  GFLOP/s")
        for r in rows {
            print(pad(r.name, width) + "  " + pad(r.implementation, implWidth)
                  + pad(String(format: "%.2f", r.forwardMilliseconds), 12, right: true) + pad(gflops(r.forwardGflops), 9, right: true)
                  + pad(String(format: "%.2f", r.backwardMilliseconds), 13, right: true) + pad(gflops(r.backwardGflops), 9, right: true))
        }
        let f = rows.reduce(0) { $0 + $1.forwardMilliseconds }, b = rows.reduce(0) { $0 + $1.backwardMilliseconds }
        print(pad("total", width + implWidth + 2) + pad(String(format: "%.2f", f), 12, right: true) + pad("", 9)
              + pad(String(format: "%.2f", b), 13, right: true))
    }
}
