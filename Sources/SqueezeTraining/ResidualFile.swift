import Foundation
import SqueezeEngine

/// One rank's error-feedback residual at a checkpoint. With int8 or topk compression every rank
/// holds gradient mass it has not sent yet; rank 0's checkpoint cannot hold the others', so each
/// rank writes its own file beside it, `residual-<step, 9 digits>-rank<R>.safetensors`, and a run
/// resumed at that step with the same number of workers picks it up. See docs/checkpoint-format.md.
///
/// One F32 tensor `residual` (one value per parameter), and with DGC's momentum correction a second,
/// `velocity`, of the same length; metadata `format` = "squeezetrain-residual", `step`, `rank`,
/// `world_size`, `compression` (what wrote it) and `checksum` (as a checkpoint's, over both).
public enum ResidualFile {
    public static let format = "squeezetrain-residual"

    public static func path(directory: String, step: Int, rank: Int) -> String {
        (directory as NSString).appendingPathComponent(String(format: "residual-%09d-rank%d.safetensors", step, rank))
    }

    /// Writes `values` atomically: the residual of `count` parameters, followed by the velocity if there
    /// are twice as many (`ErrorFeedbackReducer.errorFeedback`). Then removes this rank's files older
    /// than its newest `keep`.
    @discardableResult
    public static func save(_ values: [Float], count: Int, directory: String, step: Int, rank: Int, worldSize: Int,
                            compression: String, keep: Int) throws -> String {
        try CheckpointDirectory.check(directory)
        let file = path(directory: directory, step: step, rank: rank)
        var meta = ["format": format, "step": String(step), "rank": String(rank), "world_size": String(worldSize),
                    "compression": compression]
        let tensorNames = values.count == 2 * count ? ["residual", "velocity"] : ["residual"]
        precondition(values.count == tensorNames.count * count, "\(values.count) error-feedback values for \(count) parameters")
        meta["checksum"] = Checkpoint.checksum(
            tensors: Dictionary(uniqueKeysWithValues: tensorNames.enumerated().map { ($1, Array(values[$0 * count..<($0 + 1) * count])) }),
            metadata: meta)
        try values.withUnsafeBufferPointer { all in
            try Safetensors.write(path: file, tensors: tensorNames.enumerated().map {
                ($1, [count], UnsafeBufferPointer(rebasing: all[$0 * count..<($0 + 1) * count]))
            }, metadata: meta)
        }
        // Only this process writes this rank's files, so any temporary file of this rank's is left over
        // from a writer that was killed mid-write; other ranks may be writing theirs right now.
        let suffix = "-rank\(rank).safetensors"
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        let mine = names.filter { $0.hasPrefix("residual-") && $0.hasSuffix(suffix) }.sorted(by: >)
        let stale = names.filter { $0.hasPrefix(".residual-") && $0.contains(suffix + ".tmp-") }
        for old in mine.dropFirst(max(keep, 1)) + stale {
            try? FileManager.default.removeItem(atPath: (directory as NSString).appendingPathComponent(old))
        }
        return file
    }

    /// Reads rank `rank`'s residual at `step` (followed by its velocity, if the file has one) and checks
    /// that it belongs to this run: checksum, step, rank, world size and lengths. Throws a message naming
    /// the file and what does not match.
    public static func load(directory: String, step: Int, rank: Int, worldSize: Int, count: Int) throws -> [Float] {
        let file = path(directory: directory, step: step, rank: rank)
        guard FileManager.default.fileExists(atPath: file) else {
            throw TrainingError.checkpoint("\(file) does not exist (the checkpoint was written without int8/topk compression, or this rank did not finish writing it)")
        }
        let (raw, meta) = try Safetensors.read(path: file)
        guard meta["format"] == format, let tensor = raw["residual"] else {
            throw TrainingError.checkpoint("\(file): not a squeezetrain residual file")
        }
        let values = try tensor.floats()
        let velocity = try raw["velocity"]?.floats()
        try Checkpoint.verifyChecksum(tensors: ["residual": values].merging(velocity.map { ["velocity": $0] } ?? [:]) { a, _ in a },
                                      metadata: meta, path: file)
        for (key, want) in [("step", step), ("rank", rank), ("world_size", worldSize)] where meta[key] != String(want) {
            throw TrainingError.checkpoint("\(file): \(key) is \(meta[key] ?? "missing"), this run needs \(want)")
        }
        for (name, tensor) in [("residual", values), ("velocity", velocity ?? values)] where tensor.count != count {
            throw TrainingError.checkpoint("\(file): \(tensor.count) \(name == "velocity" ? "velocity " : "")values, the model has \(count) parameters")
        }
        return values + (velocity ?? [])
    }
}
