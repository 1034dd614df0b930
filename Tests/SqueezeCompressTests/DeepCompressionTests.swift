import Foundation
import Testing
import SqueezeData
import SqueezeEngine
import SqueezeTraining
@testable import SqueezeCompress
import SqueezeTestSupport

/// `DeepCompression.run`, the pipeline of `squeezetrain compress`, in this process on a small model.
@Suite struct DeepCompressionTests {
    func config(_ dir: String, pruneSteps: Int, quantizeSteps: Int) throws -> DeepCompression.Config {
        let data = try smallTrainingSet
        let net = Network(config: smallConfig(steps: 1).model, seed: 3)
        var c = DeepCompression.Config(network: net, weights: "dense.safetensors", output: dir + "/small.sqz", trainSet: data, testSet: data,
                                       policy: DensityPolicy(.squeezenet1_1))
        (c.bits, c.batchSize, c.evalImages, c.pruneSteps, c.quantizeSteps) = (4, 16, 64, pruneSteps, quantizeSteps)
        c.log = { _ in }
        return c
    }

    @Test func writesTheModelItReportsWithEveryStage() throws {
        let dir = try temporaryDirectory("deep-compression")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let report = try DeepCompression.run(try config(dir, pruneSteps: 2, quantizeSteps: 1))
        #expect(report.stages.map(\.stage) == ["dense", "pruned to \(String(format: "%.1f", 100 * report.density))% of the weights",
                                               "after pruning retraining", "quantized to 4 bits", "after quantized fine-tuning"])
        #expect(report.stages.map(\.steps) == [0, 0, 2, 0, 1])
        let bytes = try readWholeFile(dir + "/small.sqz")
        #expect(report.compressedBytes == bytes.count)
        let model = try CompressedModel.decode(bytes, file: "small.sqz")
        #expect(model.byteCounts().allSatisfy { $0.bits <= 4 || $0.bits == 32 })
        #expect(report.density > 0 && report.density < 1 && report.evalImages == 64)
        #expect(report.fp32Bytes == 4 * report.parameters && report.compressedBytes < report.fp32Bytes / 4)
    }

    @Test func aStopDuringRetrainingWritesNothing() throws {
        let dir = try temporaryDirectory("deep-compression-stop")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var c = try config(dir, pruneSteps: 5, quantizeSteps: 1)
        c.stop.request(signal: SIGTERM)
        #expect { try DeepCompression.run(c) } throws: { error in
            guard let stop = error as? Interrupted else { return false }
            return stop.signal == SIGTERM && stop.exitCode == 128 + SIGTERM && "\(stop)".contains("during pruning retraining; nothing written")
        }
        #expect(!FileManager.default.fileExists(atPath: dir + "/small.sqz"))
    }
}
