import Foundation
import Testing
import SqueezeData
import SqueezeEngine
import SqueezeTraining
@testable import SqueezeCompress
import SqueezeTestSupport

/// 256 training records (real ones when ../shared has CIFAR-10, else generated), loaded once (an error, not a
/// trap, when unreadable).
let smallTrainingSetResult = Result {
    let file = try CIFAR10(directory: TestInputs.cifar10, files: ["data_batch_1.bin"])
    return try CIFAR10(images: Array(file.images[0..<(256 * CIFAR10.imageBytes)]), labels: Array(file.labels[0..<256]))
}
var smallTrainingSet: CIFAR10 { get throws { try smallTrainingSetResult.get() } }

/// A small SqueezeNet with BatchNorm, trained with augmentation, momentum and weight decay.
func smallConfig(steps: Int) -> TrainingConfig {
    var c = TrainingConfig()
    c.model.batchNorm = true
    c.model.fire.baseE = 32; c.model.fire.incrE = 32
    c.batchSize = 16
    c.totalSteps = steps
    c.learningRate = 0.05
    c.schedule = .constant
    return c
}

func train(_ trainer: Trainer, steps: Int) throws {
    let loader = trainer.makeLoader()
    defer { loader.stop() }
    for _ in 0..<steps {
        guard let batch = loader.next() else { break }
        _ = try trainer.trainStep(batch)
    }
}

func temporaryDirectory(_ name: String) throws -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("squeezetrain-\(name)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    return dir.path
}

func values(_ store: ParameterStore, _ spec: ParameterSpec) -> [Float] {
    Array(UnsafeBufferPointer(start: store.values.pointer + spec.offset, count: spec.count))
}

@Suite("Deep Compression's retraining")
struct CompressionTrainingTests {
    @Test func densityPolicyGroupsTheLayersAndNamesWin() {
        let policy = DensityPolicy(.squeezenet1_1, overrides: ["expand3x3": 0.5, "features.12.expand3x3.weight": 0.1])
        #expect(policy.group(of: "features.0.weight") == "conv1")
        #expect(policy.group(of: "features.3.squeeze.weight") == "squeeze")
        #expect(policy.group(of: "features.12.expand3x3.weight") == "expand3x3")
        #expect(policy.group(of: "classifier.1.weight") == "conv10")
        #expect(policy.density(of: "features.3.expand3x3.weight") == 0.5)
        #expect(policy.density(of: "features.12.expand3x3.weight") == 0.1)
        #expect(policy.density(of: "classifier.1.weight") == 0.21)
    }

    @Test func alexNetGetsDeepCompressionsLayerDensities() throws {
        var config = ModelConfig()
        config.architecture = .alexnet
        let net = Network(config: config, seed: 1)
        let policy = DensityPolicy(.alexnet, overrides: ["fc8": 0.5])
        let groups = net.compressibleWeights.map { policy.group(of: $0.name) }
        #expect(groups == DensityPolicy.groups(of: .alexnet))  // every weight tensor is one of the paper's layers, in order
        #expect(policy.density(of: "classifier.1.weight") == 0.09)  // fc6, not SqueezeNet's conv10
        #expect(policy.density(of: "features.0.weight") == 0.84)
        #expect(policy.density(of: "classifier.6.weight") == 0.5)
        let kept = net.compressibleWeights.reduce(0.0) { $0 + Double($1.count) * policy.density(of: $1.name) }
        let total = Double(net.compressibleWeights.reduce(0) { $0 + $1.count })
        #expect(abs(kept / total - 0.11) < 0.01)  // the paper's 11% overall (with fc8 at 0.5: still about 11%)
    }

    @Test func maskedRetrainingKeepsPrunedWeightsAtZeroThroughStepsAndACheckpoint() throws {
        let config = smallConfig(steps: 8)
        let trainer = try Trainer(config: config, trainSet: smallTrainingSet)
        try train(trainer, steps: 2)  // momentum is nonzero everywhere before pruning
        let densities = Dictionary(uniqueKeysWithValues: trainer.network.compressibleWeights.map { ($0.name, 0.3) })
        let pruning = PrunedTraining(pruning: trainer.network, densities: densities)
        trainer.constraint = pruning
        let before = trainer.network.parameters.copyValues()
        try train(trainer, steps: 3)
        let net = trainer.network, velocity = trainer.optimizer.velocity.pointer
        func prunedStayZero(_ net: Network, velocity: UnsafeMutablePointer<Float>) -> Bool {
            pruning.masks.allSatisfy { spec, mask in
                (0..<spec.count).allSatisfy { mask[$0] != 0 || (net.parameters.values.pointer[spec.offset + $0] == 0 && velocity[spec.offset + $0] == 0) }
            }
        }
        #expect(prunedStayZero(net, velocity: velocity))
        #expect(abs(pruning.density - 0.3) < 0.001)
        // The steps did train: kept weights moved.
        let kept = pruning.masks[0]
        #expect((0..<kept.spec.count).contains { kept.mask[$0] != 0 && net.parameters.values.pointer[kept.spec.offset + $0] != before[kept.spec.offset + $0] })

        // Through a checkpoint: the resumed run finds the same masks in the zeros and keeps them.
        let dir = try temporaryDirectory("pruned")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Checkpoint(trainer: trainer).save(directory: dir)
        let resumed = try Trainer(config: config, trainSet: smallTrainingSet)
        try #require(Checkpoint.newestValid(in: dir).0).restore(into: resumed)
        let found = PrunedTraining(zerosOf: resumed.network, names: Set(densities.keys))
        #expect(found.masks.map(\.mask) == pruning.masks.map(\.mask))
        resumed.constraint = found
        try train(resumed, steps: 3)
        #expect(resumed.step == 8)
        #expect(prunedStayZero(resumed.network, velocity: resumed.optimizer.velocity.pointer))

        // Without the constraint the same steps would move the pruned weights (so the checks above can fail).
        let unmasked = try Trainer(config: config, trainSet: smallTrainingSet)
        try Checkpoint.newestValid(in: dir).0!.restore(into: unmasked)
        try train(unmasked, steps: 1)
        #expect(!prunedStayZero(unmasked.network, velocity: unmasked.optimizer.velocity.pointer))
    }

    @Test(arguments: [6, 4]) func quantizedFineTuningKeepsEveryWeightInItsCodebook(bits: Int) throws {
        let trainer = try Trainer(config: smallConfig(steps: 4), trainSet: smallTrainingSet)
        let net = trainer.network
        let names = Set(net.compressibleWeights.map(\.name))
        _ = PrunedTraining(pruning: net, densities: Dictionary(uniqueKeysWithValues: names.map { ($0, 0.4) }))
        let zeros = net.compressibleWeights.map { values(net.parameters, $0).map { $0 == 0 } }
        let sharing = SharedTraining(quantizing: net, names: names, bits: bits)
        let initial = sharing.layers.map(\.sharing.codebook)
        trainer.constraint = sharing
        let plainBefore = values(net.parameters, net.parameters.specs.first { $0.shape.count == 1 }!)
        try train(trainer, steps: 4)
        for (i, (spec, layer)) in sharing.layers.enumerated() {
            let w = values(net.parameters, spec)
            let codebook = Set(layer.codebook)
            #expect(layer.codebook.count <= 1 << bits && layer.codebook[0] == 0)
            #expect(w.allSatisfy { codebook.contains($0) }, "\(spec.name)")
            #expect(w.map { $0 == 0 } == zeros[i], "\(spec.name): the pruned positions stay zero, the kept ones nonzero")
        }
        // The fine-tuning moved the shared values, and trained the plain tensors (BatchNorm).
        #expect(sharing.layers.map(\.sharing.codebook) != initial)
        #expect(values(net.parameters, net.parameters.specs.first { $0.shape.count == 1 }!) != plainBefore)

        // compress → decode gives exactly the shared values and the zeros, and the same logits.
        let model = sharing.compressedModel(of: net)
        let decoded = try CompressedModel.decode(try model.encoded(), file: "fine-tuned.sqz")
        let other = Network(config: decoded.config, seed: 7)
        try decoded.load(into: other)
        #expect(other.parameters.copyValues() == net.parameters.copyValues())
        #expect(other.buffers.copyValues() == net.buffers.copyValues())
        let x = FloatBuffer(count: 3 * 4 * 32 * 32)
        let images = try smallTrainingSet.images
        for i in 0..<(3 * 4 * 32 * 32) { x.pointer[i] = Float(images[i]) / 255 - 0.5 }
        let input = Tensor(data: x.pointer, shape: Shape(c: 3, n: 4, h: 32, w: 32))
        #expect(net.predict(input) == other.predict(input))
    }
}
