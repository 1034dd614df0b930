import Foundation
import Testing
import SqueezeData
import SqueezeEngine
@testable import SqueezeTraining

/// Who may write the checkpoint directory, the mode of what is written there, and what pruning may
/// delete (issue 30): a directory others can write lets them plant a checkpoint `--resume` prefers.
@Suite("Checkpoint directory permissions and pruning")
struct CheckpointPermissionTests {
    /// A trainer over 8 synthetic images (no data files needed).
    func trainer() throws -> Trainer {
        var config = TrainingConfig()
        config.batchSize = 8
        config.totalSteps = 100
        let data = try CIFAR10(images: (0..<8 * CIFAR10.imageBytes).map { UInt8(truncatingIfNeeded: $0) }, labels: (0..<8).map { UInt8($0) })
        return try Trainer(config: config, trainSet: data)
    }

    func privateDirectory(_ name: String) throws -> String {
        let dir = NSTemporaryDirectory() + "squeezetrain-\(name)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        chmod(dir, 0o700)
        return dir
    }

    func mode(_ path: String) -> mode_t {
        var info = stat()
        return stat(path, &info) == 0 ? info.st_mode & 0o7777 : 0
    }

    @Test func aDirectoryOthersCanWriteIsRefusedNamingTheFix() throws {
        let dir = try privateDirectory("ckpt-open")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let t = try trainer()
        for open in [0o777, 0o775, 0o1777] as [mode_t] {
            chmod(dir, open)
            #expect { try Checkpoint(trainer: t).save(directory: dir) } throws: {
                "\($0)".contains(dir) && "\($0)".contains("chmod go-w")
            }
            #expect { try Resume.start(directory: dir, resume: true, startOver: false, log: { _ in }) } throws: { "\($0)".contains("chmod go-w") }
        }
        #expect(Checkpoint.files(in: dir).isEmpty)
    }

    @Test(.enabled(if: getuid() == 0, "changing a directory's owner needs root"))
    func anotherUsersDirectoryIsRefused() throws {
        let dir = try privateDirectory("ckpt-owner")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(chown(dir, 65534, 65534) == 0)
        let t = try trainer()
        #expect { try Checkpoint(trainer: t).save(directory: dir) } throws: { "\($0)".contains(dir) && "\($0)".contains("65534") }
    }

    @Test func checkpointsAndWeightsAre0600UnlessTheReplacedFileHadAnotherMode() throws {
        let dir = try privateDirectory("ckpt-mode")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let t = try trainer()
        t.step = 1
        let path = try Checkpoint(trainer: t).save(directory: dir)
        #expect(mode(path) == 0o600)
        #expect(mode(dir + "/latest") == 0o600)
        let weights = dir + "/w.safetensors"
        try t.network.saveWeights(to: weights)
        #expect(mode(weights) == 0o600)
        chmod(weights, 0o640)
        try t.network.saveWeights(to: weights)
        #expect(mode(weights) == 0o640)
    }

    /// A corrupt file with a higher step never outlives the valid checkpoints it would displace.
    @Test func pruningNeverKeepsAnInvalidCheckpointOverAValidOne() throws {
        let dir = try privateDirectory("ckpt-prune")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let t = try trainer()
        t.step = 10
        let ten = try Checkpoint(trainer: t).save(directory: dir, keep: 2)
        let corrupt = dir + "/checkpoint-000000030.safetensors"
        try Data("not a checkpoint".utf8).write(to: URL(fileURLWithPath: corrupt))
        t.step = 20
        try Checkpoint(trainer: t).save(directory: dir, keep: 2)
        #expect(FileManager.default.fileExists(atPath: ten), "the valid step-10 checkpoint was pruned while the corrupt step-30 file stayed")
        t.step = 25
        let newest = try Checkpoint(trainer: t).save(directory: dir, keep: 2)
        // Step 10 goes now (two valid ones remain), and the corrupt file with it.
        #expect(Checkpoint.files(in: dir) == [newest, dir + "/checkpoint-000000020.safetensors"])
    }
}
