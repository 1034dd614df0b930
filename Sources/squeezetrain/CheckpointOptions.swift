import ArgumentParser

/// Checkpoint options, shared by `train`, `coordinator` and `launch`.
struct CheckpointOptions: ParsableArguments {
    @Option(help: "Save checkpoints here (in a cluster: a directory every worker can reach; rank 0 writes) at every epoch end, the end of the run and on SIGINT/SIGTERM.")
    var checkpointDir: String?
    @Option(help: "Also checkpoint every K steps (0: only at epoch ends).")
    var checkpointEvery = 0
    @Option(help: "Checkpoints to keep.")
    var keepCheckpoints = 3
    @Flag(help: "Continue from the newest valid checkpoint in --checkpoint-dir (a corrupt one is skipped, and an error lists them when none verifies; a missing or empty directory starts fresh; a cluster may have another number of workers). Without it, a directory holding checkpoints is refused.")
    var resume = false
    @Flag(help: "Delete the checkpoints already in --checkpoint-dir (an earlier run's) and start from step 0.")
    var startOver = false

    func validate() throws {
        guard (0...1_000_000_000).contains(checkpointEvery) else { throw ValidationError("--checkpoint-every must be in 0...1000000000 (got \(checkpointEvery))") }
        guard (1...1_000_000).contains(keepCheckpoints) else { throw ValidationError("--keep-checkpoints must be in 1...1000000 (got \(keepCheckpoints))") }
        if resume && checkpointDir == nil { throw ValidationError("--resume needs --checkpoint-dir") }
        if startOver && checkpointDir == nil { throw ValidationError("--start-over needs --checkpoint-dir") }
        if resume && startOver { throw ValidationError("--resume continues the checkpoints in --checkpoint-dir and --start-over deletes them: give one") }
    }
}
