// A trainer's whole state in memory, for a worker that joins a running run (issue 29).

import SqueezeEngine

/// What a worker joining a running run needs from a live rank: the weights, buffers and momentum, and
/// the step, which with the configuration fixes the epoch, the sampler's position and the schedule's
/// (data order, augmentation and dropout masks are functions of the seed, step, record and rank). That
/// is exactly a checkpoint, so this is one, encoded as its file's bytes but never written: the
/// safetensors layout with the checksum in its metadata (docs/checkpoint-format.md).
public struct TrainingState {
    public let checkpoint: Checkpoint
    /// FNV-1a-64 over every tensor's bits in name order and the metadata (the checkpoint's checksum):
    /// ranks holding the same state compute the same, so they can agree on it before one sends it.
    /// It detects damage, not forgery; the sealed data plane does that.
    public let checksum: String

    /// Captures `trainer`'s state (any rank's: after each all-reduce every rank holds the same);
    /// `worldSize` (the number of workers that trained it) is recorded with it and enters the checksum,
    /// so every rank passes the same.
    public init(trainer: Trainer, worldSize: Int) throws {
        checkpoint = Checkpoint(trainer: trainer, worldSize: worldSize)
        checksum = try checkpoint.signedMetadata()["checksum"]!
    }

    /// Decodes a state received from `peer` (named in errors), after checking its format, version and
    /// own checksum, and that it is the state the run's ranks agreed on (`expected`; nil: not checked
    /// here, as when the ranks agree on another checksum, see `SqueezeCluster.StateTransfer`).
    public init(decoding bytes: [UInt8], from peer: String, expected: String?) throws {
        let source = "the training state from \(peer)"
        let (raw, meta): ([String: SafetensorsTensor], [String: String])
        do { (raw, meta) = try Safetensors.decode(bytes, source: source) } catch { throw TrainingError.checkpoint("\(error)") }
        checkpoint = try Checkpoint.verified(raw, meta, path: source)
        checksum = meta["checksum"]!
        if let expected, checksum != expected {
            throw TrainingError.checkpoint("\(source) has checksum \(checksum), not \(expected), the one the run's ranks agree on: "
                                           + "it is another step's state, or another run's")
        }
    }

    /// The bytes to send: the checkpoint's file, in memory (about 4 bytes per parameter and buffer, and
    /// as many again for the momentum).
    public func encoded() throws -> [UInt8] {
        let names = checkpoint.tensors.keys.sorted()
        return try checkpoint.withFloatViews(names) { views in
            try Safetensors.encode(tensors: zip(names, views).map { ($0, checkpoint.shapes[$0] ?? [$1.count], $1) },
                                   metadata: try checkpoint.signedMetadata())
        }
    }

    /// Each way in which a joiner configured with `config` differs from this state's run, one entry per
    /// field ("model.classes: 10 in the run, 100 here"); empty when it may take this state.
    public func differences(from config: TrainingConfig) -> [String] {
        Checkpoint.fieldDifferences(checkpoint.config, config).map { "\($0.field): \($0.a) in the run, \($0.b) here" }
    }

    /// Puts this state into a joiner's `trainer`, bit for bit: weights, buffers, momentum and step.
    /// Refuses a trainer configured otherwise than the run, naming every difference.
    public func restore(into trainer: Trainer) throws {
        let different = differences(from: trainer.config)
        guard different.isEmpty else {
            throw TrainingError.checkpoint("this worker cannot take the run's training state (step \(checkpoint.step)): its configuration differs: "
                                           + different.joined(separator: "; "))
        }
        try checkpoint.restore(into: trainer)
    }
}
