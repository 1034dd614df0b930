import Foundation

/// Finding where a run continues: the one place `train`, the coordinator and the launcher look.
public enum Resume {
    /// The newest checkpoint in `directory` that verifies; every one skipped on the way, and the
    /// absence of any, is logged.
    public static func newest(in directory: String, log: (String) -> Void) -> Checkpoint? {
        let (found, skipped) = Checkpoint.newestValid(in: directory)
        for s in skipped { log("skipping checkpoint \(s.path): \(s.reason)") }
        if found == nil { log("no valid checkpoint in \(directory); starting from step 0") }
        return found
    }
}
