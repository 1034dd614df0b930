import Foundation

/// Finding where a run continues: the one place `train`, the coordinator and the launcher look.
public enum Resume {
    /// The checkpoint a run with checkpoints in `directory` starts from, enforcing the rules that keep
    /// checkpoints from being lost or mixed up:
    /// - `startOver`: the checkpoints already there (another run's) are deleted first; start at step 0.
    /// - `resume`: the newest checkpoint that verifies; none in a missing or empty directory (start
    ///   fresh, saying so); an error naming each file when checkpoints exist but none verifies.
    /// - neither: the directory must hold no checkpoint (an error names them), so that one run's
    ///   pruning never deletes another's and a later `--resume` cannot pick the wrong run.
    public static func start(directory: String?, resume: Bool, startOver: Bool, log: (String) -> Void) throws -> Checkpoint? {
        guard let directory else { return nil }
        try CheckpointDirectory.check(directory)
        if startOver {
            let removed = try Checkpoint.removeAll(in: directory)
            if removed > 0 { log("--start-over: deleted \(removed) checkpoint(s) of an earlier run in \(directory)") }
            return nil
        }
        guard resume else {
            try Checkpoint.requireNoCheckpoints(in: directory)
            return nil
        }
        let (found, skipped) = try Checkpoint.resumePoint(in: directory)
        for s in skipped { log("skipping checkpoint \(s.path): \(s.reason)") }
        if found == nil { log("no checkpoint in \(directory) yet; starting from step 0") }
        return found
    }
}
