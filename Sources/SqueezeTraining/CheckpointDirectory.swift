// Who may write a checkpoint directory. Whoever can write it can plant a checkpoint with a higher
// step, which `--resume` prefers, or replace one: a directory of another user, or one that group or
// others may write, is refused before anything is read, written or deleted there.

import Foundation

public enum CheckpointDirectory {
    /// Makes `directory` (mode 0700, with its parents) if it is missing; then throws, naming it and
    /// the fix, unless it is a directory of this user that neither group nor others may write.
    public static func check(_ directory: String) throws {
        if !FileManager.default.fileExists(atPath: directory) {
            do {
                try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true,
                                                        attributes: [.posixPermissions: 0o700])
            } catch {
                throw TrainingError.checkpoint("cannot create the checkpoint directory \(directory): \(error.localizedDescription)")
            }
        }
        var info = stat()
        guard stat(directory, &info) == 0 else {
            throw TrainingError.checkpoint("cannot inspect the checkpoint directory \(directory): \(String(cString: strerror(errno)))")
        }
        guard info.st_mode & S_IFMT == S_IFDIR else { throw TrainingError.checkpoint("the checkpoint directory \(directory) is not a directory") }
        let me = geteuid()
        guard info.st_uid == me else {
            throw TrainingError.checkpoint("the checkpoint directory \(directory) belongs to user \(info.st_uid), not to this user (\(me)): "
                + "its owner could plant or replace checkpoints; use a directory of your own")
        }
        guard info.st_mode & 0o022 == 0 else {
            throw TrainingError.checkpoint("the checkpoint directory \(directory) has mode \(String(info.st_mode & 0o7777, radix: 8)): group or others "
                + "may write it, and so plant a checkpoint that --resume would prefer; make it private with chmod go-w \(directory)")
        }
    }
}
