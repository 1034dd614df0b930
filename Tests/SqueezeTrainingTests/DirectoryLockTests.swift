import Foundation
import Testing
@testable import SqueezeTraining

/// One run per checkpoint directory (in one process: a second open file description conflicts as a
/// second process would; tests with real processes are in SqueezeClusterTests/DirectoryLockProcessTests).
@Suite("Checkpoint directory lock")
struct DirectoryLockTests {
    @Test func aSecondLockIsRefusedNamingTheHolderAndTheFirstsReleaseFreesTheDirectory() throws {
        let dir = try temporaryDirectory("lock") + "/ckpt"  // created by the lock
        defer { try? FileManager.default.removeItem(atPath: (dir as NSString).deletingLastPathComponent) }
        var first: DirectoryLock? = try DirectoryLock(directory: dir)
        #expect(DirectoryLock.holder(in: dir) == first?.holder)
        #expect(first?.holder.pid == getpid())
        do {
            _ = try DirectoryLock(directory: dir)
            Issue.record("a locked directory was locked a second time")
        } catch {
            let message = String(describing: error)
            #expect(message.contains(dir) && message.contains("pid \(getpid()) on \(DirectoryLock.hostName())"), "\(message)")
        }
        #expect(throws: TrainingError.self) { try DirectoryLock.requireFree(dir) }
        try DirectoryLock.requireHeld(dir, by: first!.holder)
        let holder = first!.holder
        first = nil  // released
        try DirectoryLock.requireFree(dir)
        #expect(throws: TrainingError.self) { try DirectoryLock.requireHeld(dir, by: holder) }  // its run is over
        let second = try DirectoryLock(directory: dir)
        #expect(throws: TrainingError.self) { try DirectoryLock.requireHeld(dir, by: holder) }  // another run has it
        withExtendedLifetime(second) {}
        try DirectoryLock.requireFree(dir + "/missing")  // creates nothing
        #expect(!FileManager.default.fileExists(atPath: dir + "/missing"))
    }

    @Test func theLockFileIsNoCheckpoint() throws {
        let dir = try temporaryDirectory("lock-file")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let lock = try DirectoryLock(directory: dir)
        try Checkpoint.requireNoCheckpoints(in: dir)  // a run without --resume accepts a directory holding only the lock
        #expect(try Resume.start(directory: dir, resume: true, startOver: false, log: { _ in }) == nil)
        let trainer = try Trainer(config: deterministicConfig(steps: 4, batch: 8), trainSet: firstTrainingFile)
        trainer.step = 2
        try Checkpoint(trainer: trainer).save(directory: dir, keep: 1)
        trainer.step = 3
        try Checkpoint(trainer: trainer).save(directory: dir, keep: 1)  // prunes step 2, not the lock
        #expect(Checkpoint.newestValid(in: dir).skipped.isEmpty)
        #expect(try Checkpoint.removeAll(in: dir) == 1)  // --start-over
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir) == [DirectoryLock.fileName])
        withExtendedLifetime(lock) {}
    }

    @Test func mountsWhoseLocksStayOnThisMachineAreNamed() {
        let table = """
            22 1 0:21 / / rw,relatime - ext4 /dev/sda1 rw
            30 22 0:40 / /shared rw,relatime - nfs4 server:/export rw,vers=4.2,local_lock=none,addr=10.0.0.1
            31 22 0:41 / /old rw,relatime - nfs server:/old rw,vers=3,nolock,local_lock=all,addr=10.0.0.1
            32 31 0:42 / /old/ssh rw,nosuid - fuse.sshfs host:/ rw,user_id=0
            33 22 0:43 / /my\\040disk rw - cifs //srv/share rw,nobrl
            """
        #expect(DirectoryLock.localOnlyLocks(path: "/home/ckpt", mountinfo: table) == nil)
        #expect(DirectoryLock.localOnlyLocks(path: "/shared/ckpt", mountinfo: table) == nil)  // NFSv4 with server locks
        #expect(DirectoryLock.localOnlyLocks(path: "/old/ckpt", mountinfo: table)?.contains("nfs mounted at /old with nolock,local_lock=all") == true)
        #expect(DirectoryLock.localOnlyLocks(path: "/old/ssh/ckpt", mountinfo: table)?.contains("FUSE") == true)
        #expect(DirectoryLock.localOnlyLocks(path: "/oldish", mountinfo: table) == nil)  // not under /old
        #expect(DirectoryLock.localOnlyLocks(path: "/my disk/c", mountinfo: table)?.contains("nobrl") == true)
    }
}
