import ArgumentParser

/// Checkpoint options, shared by `train`, `coordinator` and `launch`.
struct CheckpointOptions: ParsableArguments {
    @Option(help: "Save checkpoints here (in a cluster: a directory every worker can reach; rank 0 writes) at every epoch end, the end of the run and on SIGINT/SIGTERM.")
    var checkpointDir: String?
    @Option(help: "Also checkpoint every K steps (0: only at epoch ends).")
    var checkpointEvery = 0
    @Option(help: "Checkpoints to keep.")
    var keepCheckpoints = 3
    @Flag(help: "Continue from the newest valid checkpoint in --checkpoint-dir (a corrupt one is skipped; a cluster may have another number of workers).")
    var resume = false

    func validate() throws {
        guard checkpointEvery >= 0, keepCheckpoints >= 1 else { throw ValidationError("--checkpoint-every must be ≥ 0 and --keep-checkpoints ≥ 1") }
        if resume && checkpointDir == nil { throw ValidationError("--resume needs --checkpoint-dir") }
    }

    /// These options as command-line arguments (for the processes `launch` starts), with an absolute directory.
    var arguments: [String] {
        ["--checkpoint-every", "\(checkpointEvery)", "--keep-checkpoints", "\(keepCheckpoints)"] + (resume ? ["--resume"] : [])
            + (checkpointDir.map { ["--checkpoint-dir", absolutePath($0)] } ?? [])
    }
}
