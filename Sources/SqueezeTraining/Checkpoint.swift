import Foundation
import SqueezeEngine
import SqueezeSystem

/// A checkpoint: one safetensors file holding everything needed to continue a run exactly.
///
/// Tensors: the parameters and buffers under torchvision's names, the SGD momentum buffers as
/// `optimizer.momentum.<name>`, and with `--ema` the averaged parameters and buffers as `ema.<name>`.
/// Metadata (strings): `format` = "squeezetrain-checkpoint", `format_version`, `step` (steps
/// completed; with the configuration it fixes the epoch, the position inside the epoch and the
/// learning-rate schedule), `world_size`, `config` (the `TrainingConfig` as
/// JSON, which includes the model and the seed; data order, augmentation and dropout masks are pure
/// functions of the seed, the epoch or step, the record and the rank, so no generator state is
/// needed), and `checksum` (FNV-1a-64 over the tensors in name order and the other metadata).
///
/// Files are `checkpoint-<step, 9 digits>.safetensors` in the checkpoint directory, written
/// atomically (temporary file, fsync, rename, directory fsync); then `latest` (the file name) is
/// replaced the same way. See docs/checkpoint-format.md.
public struct Checkpoint {
    public static let formatVersion = 1
    public static let format = "squeezetrain-checkpoint"

    public var config: TrainingConfig
    public var step: Int
    public var worldSize: Int
    /// name → values, for parameters, buffers and `optimizer.momentum.*`.
    public var tensors: [String: [Float]]
    /// name → PyTorch shape of each tensor.
    public var shapes: [String: [Int]]
    public var path: String?

    /// Captures a trainer's state (any rank's: after the all-reduce every rank holds the same).
    public init(trainer: Trainer, worldSize: Int = 1) {
        config = trainer.config
        step = trainer.step
        self.worldSize = worldSize
        var t = [String: [Float]](), shapes = [String: [Int]]()
        let net = trainer.network
        func take(_ specs: [ParameterSpec], from base: UnsafeMutablePointer<Float>, prefix: String = "") {
            for s in specs {
                t[prefix + s.name] = Array(UnsafeBufferPointer(start: base + s.offset, count: s.count))
                shapes[prefix + s.name] = s.shape
            }
        }
        take(net.parameters.specs, from: net.parameters.values.pointer)
        take(net.buffers.specs, from: net.buffers.values.pointer)
        take(net.parameters.specs, from: trainer.optimizer.velocity.pointer, prefix: "optimizer.momentum.")
        if let average = trainer.average {
            take(net.parameters.specs, from: average.parameters.pointer, prefix: Checkpoint.averagePrefix)
            take(net.buffers.specs, from: average.buffers.pointer, prefix: Checkpoint.averagePrefix)
        }
        tensors = t
        self.shapes = shapes
    }

    /// Prefix of the moving average's tensors (`--ema` runs only): `ema.<parameter or buffer name>`.
    static let averagePrefix = "ema."

    static func fileName(step: Int) -> String { String(format: "checkpoint-%09d.safetensors", step) }

    /// Writes the checkpoint into `directory` (created if needed; refused if others may write it,
    /// `CheckpointDirectory.check`), reads it back, and only once it verifies points `latest` at it
    /// and prunes the others (`prune`). Returns the file's path.
    @discardableResult
    public func save(directory: String, keep: Int = 3) throws -> String {
        try CheckpointDirectory.check(directory)
        let name = Checkpoint.fileName(step: step)
        let path = (directory as NSString).appendingPathComponent(name)
        let meta = try signedMetadata()
        let names = tensors.keys.sorted()
        try withFloatViews(names) { views in
            try Safetensors.write(path: path, tensors: zip(names, views).map { ($0, shapes[$0] ?? [$1.count], $1) }, metadata: meta)
        }
        do { _ = try Checkpoint.load(path: path) } catch {
            throw TrainingError.checkpoint("the checkpoint just written does not read back (\(error)); the earlier ones are kept")
        }
        try AtomicFile.write(Array((name + "\n").utf8), to: (directory as NSString).appendingPathComponent("latest"))
        try prune(directory: directory, current: name, keep: max(keep, 1))
        return path
    }

    /// The metadata with its `checksum` (of the tensors and the rest of the metadata).
    func signedMetadata() throws -> [String: String] {
        var meta = try metadata()
        meta["checksum"] = Checkpoint.checksum(tensors: tensors, metadata: meta)
        return meta
    }

    private func metadata() throws -> [String: String] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        return [
            "format": Checkpoint.format,
            "format_version": String(Checkpoint.formatVersion),
            "step": String(step),
            "world_size": String(worldSize),
            "config": String(decoding: try encoder.encode(config), as: UTF8.self),
        ]
    }

    func withFloatViews<R>(_ names: [String], _ body: ([UnsafeBufferPointer<Float>]) throws -> R) rethrows -> R {
        var views = [UnsafeBufferPointer<Float>]()
        func go(_ i: Int) throws -> R {
            if i == names.count { return try body(views) }
            return try tensors[names[i]]!.withUnsafeBufferPointer { views.append($0); return try go(i + 1) }
        }
        return try go(0)
    }

    /// Reads and verifies a checkpoint file: format, version, checksum and every metadata field.
    public static func load(path: String) throws -> Checkpoint {
        let (raw, meta) = try Safetensors.read(path: path)
        return try verified(raw, meta, path: path)
    }

    /// The checkpoint in `raw` and `meta` (read from `path`, or received from the peer it names), once its
    /// format, version, checksum and every metadata field check out.
    static func verified(_ raw: [String: SafetensorsTensor], _ meta: [String: String], path: String) throws -> Checkpoint {
        func field(_ key: String) throws -> String {
            guard let v = meta[key] else { throw TrainingError.checkpoint("\(path): not a squeezetrain checkpoint (no '\(key)' in its metadata)") }
            return v
        }
        guard try field("format") == format else { throw TrainingError.checkpoint("\(path): not a squeezetrain checkpoint") }
        guard let version = Int(try field("format_version")), version == formatVersion else {
            throw TrainingError.checkpoint("\(path): checkpoint format version \(meta["format_version"] ?? "?") is not supported (this build reads \(formatVersion))")
        }
        var tensors = [String: [Float]]()
        for (name, t) in raw { tensors[name] = try t.floats() }
        let shapes = raw.mapValues(\.shape)
        try verifyChecksum(tensors: tensors, metadata: meta, path: path)
        guard let step = Int(try field("step")), let world = Int(try field("world_size")) else {
            throw TrainingError.checkpoint("\(path): bad step or world_size in metadata")
        }
        let decoder = JSONDecoder()
        let config = try decoder.decode(TrainingConfig.self, from: Data(try field("config").utf8))
        if let reason = config.model.invalidReason { throw TrainingError.checkpoint("\(path): its model configuration describes no valid model: \(reason)") }
        return Checkpoint(config: config, step: step, worldSize: world, tensors: tensors, shapes: shapes, path: path)
    }

    private init(config: TrainingConfig, step: Int, worldSize: Int, tensors: [String: [Float]], shapes: [String: [Int]], path: String?) {
        self.config = config; self.step = step; self.worldSize = worldSize
        self.tensors = tensors; self.shapes = shapes; self.path = path
    }

    /// The newest checkpoint in `directory` that verifies, trying `latest` first and then the others
    /// from newest to oldest. `skipped` lists each file passed over and why.
    public static func newestValid(in directory: String) -> (checkpoint: Checkpoint?, skipped: [(path: String, reason: String)]) {
        var candidates = files(in: directory).map { ($0 as NSString).lastPathComponent }
        if let latest = try? String(contentsOfFile: (directory as NSString).appendingPathComponent("latest"), encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines), let i = candidates.firstIndex(of: latest) {
            candidates.insert(candidates.remove(at: i), at: 0)
        }
        var skipped = [(path: String, reason: String)]()
        for name in candidates {
            let path = (directory as NSString).appendingPathComponent(name)
            do { return (try load(path: path), skipped) } catch { skipped.append((path, String(describing: error))) }
        }
        return (nil, skipped)
    }

    /// Puts this state into `trainer` (model, buffers, momentum, the moving average, step).
    /// The trainer's configuration must equal the checkpoint's, except the run length.
    public func restore(into trainer: Trainer) throws {
        try checkCompatible(with: trainer.config)
        try copyWeights(into: trainer.network)
        try copy(trainer.network.parameters.specs, prefix: "optimizer.momentum.", to: trainer.optimizer.velocity.pointer)
        if let average = trainer.average {
            try copy(trainer.network.parameters.specs, prefix: Checkpoint.averagePrefix, to: average.parameters.pointer)
            try copy(trainer.network.buffers.specs, prefix: Checkpoint.averagePrefix, to: average.buffers.pointer)
        }
        trainer.step = step
    }

    /// Throws unless `config` is the checkpoint's configuration up to the run length (`totalSteps`),
    /// and that length reaches the checkpoint's step.
    public func checkCompatible(with config: TrainingConfig) throws {
        guard config.totalSteps >= step else {
            throw TrainingError.checkpoint("\(path ?? "checkpoint") is at step \(step), beyond this run's --steps \(config.totalSteps): "
                + "resume with --steps \(step) or more (or --start-over to begin again)")
        }
        var mine = config, theirs = self.config
        mine.totalSteps = 0; theirs.totalSteps = 0
        if mine.model != theirs.model {
            throw TrainingError.checkpoint("\(path ?? "checkpoint"): its model (\(Checkpoint.describe(theirs.model))) differs from this run's (\(Checkpoint.describe(mine.model)))")
        }
        if mine != theirs {
            throw TrainingError.checkpoint("\(path ?? "checkpoint"): its training configuration differs from this run's: \(Checkpoint.differences(theirs, mine)); resume with the original options")
        }
    }

    /// Copies the parameters and buffers (not the momentum) into `network`.
    public func copyWeights(into network: Network) throws {
        try copy(network.parameters.specs, to: network.parameters.values.pointer)
        try copy(network.buffers.specs, to: network.buffers.values.pointer)
    }

    private func copy(_ specs: [ParameterSpec], prefix: String = "", to base: UnsafeMutablePointer<Float>) throws {
        for s in specs {
            guard let v = tensors[prefix + s.name], v.count == s.count else {
                throw TrainingError.checkpoint("\(path ?? "checkpoint"): tensor \(prefix + s.name) is missing or mis-sized")
            }
            (base + s.offset).update(from: v, count: v.count)
        }
    }

    static func describe(_ m: ModelConfig) -> String {
        "\(m.architecture.rawValue), \(m.classes) classes, \(m.stem.rawValue) stem" + (m.lateDownsample ? ", late downsample" : "")
            + (m.batchNorm ? ", batch norm" : "") + (m.bypass == .simple ? ", simple bypass" : "") + ", dropout \(m.dropout)"
    }

    static func differences(_ a: TrainingConfig, _ b: TrainingConfig) -> String {
        fieldDifferences(a, b).map { "\($0.field) was \($0.a), now \($0.b)" }.joined(separator: "; ")
    }

    /// Each field in which `a` and `b` differ, by its JSON name (a nested one dotted: `model.classes`),
    /// with both values ("unset" for an optional field that is not set), in name order.
    static func fieldDifferences(_ a: TrainingConfig, _ b: TrainingConfig) -> [(field: String, a: String, b: String)] {
        func fields(_ object: [String: Any], prefix: String = "") -> [String: String] {
            var out = [String: String]()
            for (key, value) in object {
                if let nested = value as? [String: Any] { out.merge(fields(nested, prefix: prefix + key + "."), uniquingKeysWith: { $1 }) }
                else { out[prefix + key] = String(describing: value) }
            }
            return out
        }
        func fields(_ c: TrainingConfig) -> [String: String] {
            let data = (try? JSONEncoder().encode(c)) ?? Data()
            return fields((try? JSONSerialization.jsonObject(with: data)) as? [String: Any] ?? [:])
        }
        let fa = fields(a), fb = fields(b)
        // Optional fields (cutout) are absent from the JSON when unset.
        return Set(fa.keys).union(fb.keys).sorted().filter { fa[$0] != fb[$0] }.map { ($0, fa[$0] ?? "unset", fb[$0] ?? "unset") }
    }

    /// Throws unless `metadata["checksum"]` is the checksum of `tensors` and the rest of `metadata`.
    static func verifyChecksum(tensors: [String: [Float]], metadata: [String: String], path: String) throws {
        var unsigned = metadata
        guard let stored = unsigned.removeValue(forKey: "checksum"), stored == checksum(tensors: tensors, metadata: unsigned) else {
            throw TrainingError.checkpoint("\(path): checksum mismatch (the file is corrupt or was modified)")
        }
    }

    /// FNV-1a (64-bit) over each tensor's name and bytes in name order, then the metadata in key order.
    static func checksum(tensors: [String: [Float]], metadata: [String: String]) -> String {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325
        func mix<C: Collection>(_ bytes: C) where C.Element == UInt8 { for b in bytes { h = (h ^ UInt64(b)) &* 0x100_0000_01B3 } }
        func mixWords(_ floats: [Float]) {
            floats.withUnsafeBufferPointer { f in
                for v in f { h = (h ^ UInt64(v.bitPattern)) &* 0x100_0000_01B3 }
            }
        }
        for name in tensors.keys.sorted() { mix(name.utf8); mixWords(tensors[name]!) }
        for key in metadata.keys.sorted() { mix(key.utf8); mix(metadata[key]!.utf8) }
        return String(h, radix: 16)
    }

    /// Keeps the checkpoint just written (`current`, which `latest` names, read back valid) and the newest
    /// `keep − 1` others that verify; removes the older ones, and with them every one that does not verify,
    /// so an invalid checkpoint never outlives a valid one. Also removes temporary files that a writer
    /// killed mid-write left behind (any but this process's, which has just finished).
    private func prune(directory: String, current: String, keep: Int) throws {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        let others = names.compactMap { name in Checkpoint.step(ofFileName: name).map { (name: name, step: $0) } }
            .filter { $0.name != current }.sorted { $0.step > $1.step }.map(\.name)
        var kept = 0, invalid = [String](), older = [String]()
        for name in others {
            if kept == keep - 1 { older.append(name); continue }
            if (try? Checkpoint.load(path: (directory as NSString).appendingPathComponent(name))) != nil { kept += 1 } else { invalid.append(name) }
        }
        let stale = names.filter { ($0.hasPrefix(".checkpoint-") || $0.hasPrefix(".latest")) && $0.contains(".tmp-") && !$0.contains(".tmp-\(getpid())") }
        for old in older + (older.isEmpty ? [] : invalid) + stale {
            try? FileManager.default.removeItem(atPath: (directory as NSString).appendingPathComponent(old))
        }
    }

    /// The step in a checkpoint file name (`checkpoint-000000120.safetensors` → 120), or nil for other names.
    static func step(ofFileName name: String) -> Int? {
        guard name.hasPrefix("checkpoint-"), name.hasSuffix(".safetensors") else { return nil }
        let digits = name.dropFirst("checkpoint-".count).dropLast(".safetensors".count)
        guard !digits.isEmpty, digits.allSatisfy(\.isASCII), digits.allSatisfy(\.isNumber) else { return nil }
        return Int(digits)
    }

    /// The checkpoint files in `directory` (names of the form `checkpoint-<step>.safetensors`), newest
    /// step first; empty when the directory is missing or empty.
    public static func files(in directory: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [])
            .compactMap { name in step(ofFileName: name).map { (name, $0) } }.sorted { $0.1 > $1.1 }
            .map { (directory as NSString).appendingPathComponent($0.0) }
    }

    /// Where a `--resume` continues: nil when `directory` holds no checkpoint (missing or empty: start
    /// fresh), else the newest that verifies. When checkpoints exist but none verifies, throws an error
    /// naming each file and why, rather than silently starting over. `skipped` lists files passed over.
    public static func resumePoint(in directory: String) throws -> (checkpoint: Checkpoint?, skipped: [(path: String, reason: String)]) {
        let (found, skipped) = newestValid(in: directory)
        if found == nil && !skipped.isEmpty {
            throw TrainingError.checkpoint("--resume: no checkpoint in \(directory) verifies, so there is nothing to resume from "
                + "(remove them or choose another --checkpoint-dir to start over):" + skipped.map { "\n  \($0.path): \($0.reason)" }.joined())
        }
        return (found, skipped)
    }

    /// Throws unless `directory` is free of checkpoints: a run that is not resuming must not mix its
    /// checkpoints with another run's (pruning would delete one run's by the other's steps, and a later
    /// `--resume` would pick whichever is newer). Names the files found.
    public static func requireNoCheckpoints(in directory: String) throws {
        let found = files(in: directory)
        guard found.isEmpty else {
            throw TrainingError.checkpoint("\(directory) already holds \(found.count) checkpoint\(found.count == 1 ? "" : "s") of another run ("
                + found.prefix(5).map { ($0 as NSString).lastPathComponent }.joined(separator: ", ") + (found.count > 5 ? ", …" : "")
                + "); continue it with --resume, start over with --start-over (deletes them), or choose another --checkpoint-dir")
        }
    }

    /// Deletes the checkpoints in `directory`, the workers' residual files beside them and `latest`
    /// (for `--start-over`); returns how many checkpoints.
    @discardableResult
    public static func removeAll(in directory: String) throws -> Int {
        let found = files(in: directory)
        let residuals = ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [])
            .filter { $0.hasPrefix("residual-") && $0.hasSuffix(".safetensors") }.map { (directory as NSString).appendingPathComponent($0) }
        for path in found + residuals { try FileManager.default.removeItem(atPath: path) }
        try? FileManager.default.removeItem(atPath: (directory as NSString).appendingPathComponent("latest"))
        return found.count
    }
}
