import ArgumentParser
import Foundation
import SqueezeCompress
import SqueezeEngine
import SqueezeTraining

struct Export: ReportingCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a checkpoint's or a compressed model's weights as safetensors with torchvision's names (for eval, --init-weights or PyTorch).")

    @Option(help: "A checkpoint file, or a checkpoint directory (its newest valid checkpoint).")
    var checkpoint: String?
    @Option(help: "A compressed model (.sqz) to decompress.")
    var weights: String?
    @Option(help: "Where to write the weights.")
    var output: String

    func validate() throws {
        guard (checkpoint == nil) != (weights == nil) else { throw ValidationError("give either --checkpoint or --weights") }
    }

    func execute() throws {
        if let weights {
            guard isCompressedModel(weights) else { throw ValidationError("\(weights) is not a compressed model (.sqz); eval reads safetensors as they are") }
            let compressed = try CompressedModel.load(path: weights)
            let net = Network(config: compressed.config)
            try compressed.load(into: net)
            try net.saveWeights(to: output)
            emit("wrote \(output): \(compressed.config.architecture.rawValue) weights decoded from \(weights)\n")
            return
        }
        guard let checkpoint else { return }
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: checkpoint, isDirectory: &isDirectory) else {
            throw TrainingError.checkpoint("\(checkpoint) does not exist")
        }
        let found: Checkpoint
        if isDirectory.boolValue {
            let (newest, skipped) = Checkpoint.newestValid(in: checkpoint)
            for s in skipped { emit("skipping checkpoint \(s.path): \(s.reason)\n") }
            guard let newest else { throw TrainingError.checkpoint("no valid checkpoint in \(checkpoint)") }
            found = newest
        } else {
            found = try Checkpoint.load(path: checkpoint)
        }
        let net = Network(config: found.config.model)
        try found.copyWeights(into: net)
        try net.saveWeights(to: output)
        emit("wrote \(output): \(found.config.model.architecture.rawValue) weights at step \(found.step) of \(found.path ?? checkpoint)\n")
    }
}
