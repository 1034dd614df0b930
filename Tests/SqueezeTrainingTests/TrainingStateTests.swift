import Testing
import SqueezeData
import SqueezeEngine
@testable import SqueezeTraining

/// The in-memory state a joining worker receives (issue 29).
@Suite("Training state in memory")
struct TrainingStateTests {
    func bits(_ p: UnsafeMutablePointer<Float>, _ count: Int) -> [UInt32] { UnsafeBufferPointer(start: p, count: count).map(\.bitPattern) }
    func parameterBits(_ t: Trainer) -> [UInt32] { bits(t.network.parameters.values.pointer, t.network.parameters.count) }
    func momentumBits(_ t: Trainer) -> [UInt32] { bits(t.optimizer.velocity.pointer, t.optimizer.count) }

    /// A trainer two steps in, so that its momentum is not zero (shuffle, augmentation, dropout on).
    func trained(_ config: TrainingConfig) throws -> Trainer {
        let trainer = try Trainer(config: config, trainSet: firstTrainingFile)
        _ = try train(trainer, steps: 2)
        return trainer
    }

    func config() -> TrainingConfig {
        var c = TrainingConfig()
        c.batchSize = 16
        c.totalSteps = 4
        return c
    }

    @Test func aRoundTripRestoresTheStateBitForBitAndTrainingContinuesIdentically() throws {
        let live = try trained(config())
        let sent = try TrainingState(trainer: live, worldSize: 3)
        let bytes = try sent.encoded()
        // Sent once: parameters and momentum, 4 bytes each, and a header of a few kilobytes.
        let parameters = live.network.parameters.count
        #expect(bytes.count > 8 * parameters && bytes.count < 8 * parameters + 16_384, "\(bytes.count) bytes for \(parameters) parameters")
        let joiner = try Trainer(config: config(), trainSet: firstTrainingFile)
        try TrainingState(decoding: bytes, from: "rank 0", expected: sent.checksum).restore(into: joiner)
        #expect(joiner.step == 2)
        let sameParameters = parameterBits(joiner) == parameterBits(live), sameMomentum = momentumBits(joiner) == momentumBits(live)
        #expect(sameParameters && sameMomentum)
        #expect(momentumBits(live).contains { $0 != 0 })
        // Every rank holding this state computes the same checksum.
        #expect(try TrainingState(trainer: joiner, worldSize: 3).checksum == sent.checksum)
        #expect(try TrainingState(trainer: joiner, worldSize: 3).encoded() == bytes)
        // The next step: the same batch, the same rate, the same weights.
        _ = try train(live, steps: 1)
        _ = try train(joiner, steps: 1)
        let sameAfter = parameterBits(joiner) == parameterBits(live)
        #expect(sameAfter)
        // The state of another step is refused by its checksum.
        let later = try TrainingState(trainer: live, worldSize: 3)
        let stale = #expect(throws: TrainingError.self) {
            try TrainingState(decoding: try later.encoded(), from: "rank 2", expected: sent.checksum)
        }
        #expect(stale?.description.contains("the training state from rank 2 has checksum \(later.checksum), not \(sent.checksum)") == true)
    }

    @Test func aDamagedStateIsRefused() throws {
        let state = try TrainingState(trainer: try trained(config()), worldSize: 2)
        let bytes = try state.encoded()
        var flipped = bytes
        flipped[bytes.count - 3] ^= 0x10  // a bit of the last tensor's data
        let damaged = #expect(throws: TrainingError.self) { try TrainingState(decoding: flipped, from: "rank 1", expected: state.checksum) }
        #expect(damaged?.description.contains("the training state from rank 1: checksum mismatch") == true, "\(String(describing: damaged))")
        #expect(throws: TrainingError.self) { try TrainingState(decoding: Array(bytes.dropLast(4)), from: "rank 1", expected: state.checksum) }
        var header = bytes
        header[9] = UInt8(ascii: "!")  // inside the JSON header
        #expect(throws: TrainingError.self) { try TrainingState(decoding: header, from: "rank 1", expected: state.checksum) }
        #expect(throws: TrainingError.self) { try TrainingState(decoding: [1, 2, 3], from: "rank 1", expected: state.checksum) }
    }

    @Test func aJoinerConfiguredOtherwiseIsRefusedNamingEachField() throws {
        let state = try TrainingState(trainer: try trained(config()), worldSize: 2)
        var other = config()
        other.model.classes = 100
        other.seed = 7
        let joiner = try Trainer(config: other, trainSet: firstTrainingFile)
        let before = parameterBits(joiner)
        let refused = #expect(throws: TrainingError.self) { try state.restore(into: joiner) }
        #expect(refused?.description == "this worker cannot take the run's training state (step 2): its configuration differs: "
                + "model.classes: 10 in the run, 100 here; seed: 0 in the run, 7 here")
        #expect(joiner.step == 0 && parameterBits(joiner) == before)
        #expect(state.differences(from: config()).isEmpty)
    }
}
