import Foundation
import SqueezeEngine

/// One rank's error-feedback residual at a checkpoint. With int8 or topk compression every rank
/// holds gradient mass it has not sent yet; rank 0's checkpoint cannot hold the others', so each
/// rank writes its own file beside it, `residual-<step, 9 digits>-rank<R>.safetensors`, and a run
/// resumed at that step with the same number of workers picks it up. See docs/checkpoint-format.md.
///
/// One F32 tensor `residual` (one value per parameter); metadata `format` = "squeezetrain-residual",
/// `step`, `rank`, `world_size`, `compression` (what wrote it) and `checksum` (as a checkpoint's).
public enum ResidualFile {
    public static let format = "squeezetrain-residual"

    public static func path(directory: String, step: Int, rank: Int) -> String {
        (directory as NSString).appendingPathComponent(String(format: "residual-%09d-rank%d.safetensors", step, rank))
    }

    /// Writes `residual` atomically, then removes this rank's files older than its newest `keep`.
    @discardableResult
    public static func save(_ residual: [Float], directory: String, step: Int, rank: Int, worldSize: Int,
                            compression: String, keep: Int) throws -> String {
        try CheckpointDirectory.check(directory)
        let file = path(directory: directory, step: step, rank: rank)
        var meta = ["format": format, "step": String(step), "rank": String(rank), "world_size": String(worldSize),
                    "compression": compression]
        meta["checksum"] = Checkpoint.checksum(tensors: ["residual": residual], metadata: meta)
        try residual.withUnsafeBufferPointer {
            try Safetensors.write(path: file, tensors: [("residual", [residual.count], $0)], metadata: meta)
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

    /// Reads rank `rank`'s residual at `step` and checks that it belongs to this run: checksum, step,
    /// rank, world size and length. Throws a message naming the file and what does not match.
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
        try Checkpoint.verifyChecksum(tensors: ["residual": values], metadata: meta, path: file)
        for (key, want) in [("step", step), ("rank", rank), ("world_size", worldSize)] where meta[key] != String(want) {
            throw TrainingError.checkpoint("\(file): \(key) is \(meta[key] ?? "missing"), this run needs \(want)")
        }
        guard values.count == count else {
            throw TrainingError.checkpoint("\(file): \(values.count) values, the model has \(count) parameters")
        }
        return values
    }
}
