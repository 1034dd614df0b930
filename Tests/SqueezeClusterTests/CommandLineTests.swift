import Foundation
import SqueezeEngine
import Testing
import SqueezeTestSupport

/// The commands that read weights take the model from the file's metadata; flags given must agree.
@Suite(.timeLimit(.minutes(10))) struct WeightsMetadataCommandLineTests {
    static let shipped = packageRoot.appendingPathComponent("docs/results/squeezenet-bn-late-80-epochs.safetensors").path

    /// A CIFAR-10 directory whose test set is the first `records` records of the tests' one.
    func smallTestSet(_ dir: String, records: Int = 200) throws -> String {
        let data = dir + "/cifar"
        try FileManager.default.createDirectory(atPath: data, withIntermediateDirectories: true)
        let test = try Data(contentsOf: URL(fileURLWithPath: cifarDirectory + "/test_batch.bin"))
        try test.prefix(records * 3073).write(to: URL(fileURLWithPath: data + "/test_batch.bin"))
        return data
    }

    func eval(_ arguments: [String], in dir: String) throws -> (status: Int32, output: String) {
        let c = try Child(["eval", "--data", try smallTestSet(dir)] + arguments, log: dir + "/eval-\(UUID().uuidString).log")
        let status = c.wait()
        return (status, c.output)
    }

    /// The shipped weights score above 80% only on real images.
    @Test(.needsRealCIFAR10) func evalNeedsNoModelFlagsForWeightsWithMetadata() throws {
        let dir = try temporaryDirectory("meta-eval")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // The 90% model (BatchNorm, late downsampling): without the metadata these flags were required,
        // and without them the weights loaded (same shapes) and scored 45.6%.
        let plain = try eval(["--weights", Self.shipped, "--json"], in: dir)
        #expect(plain.status == 0, "\(plain.output)")
        let accuracy = try #require(try JSONSerialization.jsonObject(with: Data(plain.output.utf8)) as? [String: Any])["accuracy"] as? Double
        #expect((accuracy ?? 0) > 0.8, "\(plain.output)")

        let agreeing = try eval(["--weights", Self.shipped, "--json", "--batch-norm", "--late-downsample", "--model", "squeezenet1_1"], in: dir)
        #expect(agreeing.status == 0 && agreeing.output == plain.output, "\(agreeing.output)")
    }

    @Test func flagsThatContradictTheMetadataAreRefusedNamingTheDifference() throws {
        let dir = try temporaryDirectory("meta-conflict")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = try eval(["--weights", Self.shipped, "--bypass", "simple", "--classes", "100"], in: dir)
        #expect(r.status == 1)
        #expect(r.output.contains("--bypass none") && r.output.contains("--bypass simple"), "\(r.output)")
        #expect(r.output.contains("--classes 10") && r.output.contains("--classes 100"), "\(r.output)")
        #expect(!r.output.contains("test accuracy"))
    }

    @Test func weightsWithoutMetadataStillWorkWithFlags() throws {
        let dir = try temporaryDirectory("meta-none")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // The same tensors without "__metadata__", as PyTorch would write them.
        let (tensors, _) = try Safetensors.read(path: Self.shipped)
        let bare = dir + "/bare.safetensors"
        try Safetensors.write(path: bare, tensors: Array(tensors.values))
        #expect(try Network.savedConfig(path: bare) == nil)

        let withFlags = try eval(["--weights", bare, "--json", "--batch-norm", "--late-downsample"], in: dir)
        let withMetadata = try eval(["--weights", Self.shipped, "--json"], in: dir)
        #expect(withFlags.status == 0, "\(withFlags.output)")
        // The reports differ only in the file named.
        #expect(withFlags.output.replacingOccurrences(of: bare, with: "W") == withMetadata.output.replacingOccurrences(of: Self.shipped, with: "W"))

        // Without the flags the tensors do not fit the default model: an error, not a wrong answer.
        let withoutFlags = try eval(["--weights", bare], in: dir)
        #expect(withoutFlags.status == 1 && withoutFlags.output.contains("do not match the model"), "\(withoutFlags.output)")
    }

    @Test func hostileModelMetadataIsAnErrorNotACrash() throws {
        let dir = try temporaryDirectory("meta-hostile")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (tensors, metadata) = try Safetensors.read(path: Self.shipped)
        let huge = metadata["squeezetrain.model"]!.replacingOccurrences(of: "\"baseE\":128", with: "\"baseE\":4000000000")
        for (name, value) in [("garbage", "{\"architecture\":"), ("huge", huge)] {
            let path = dir + "/\(name).safetensors"
            try Safetensors.write(path: path, tensors: Array(tensors.values), metadata: ["squeezetrain.model": value])
            let r = try eval(["--weights", path], in: dir)
            #expect(r.status == 1 && r.output.contains(path) && r.output.contains("squeezetrain.model"), "\(name): \(r.output)")
        }
    }
}

/// Every numeric flag is checked before anything starts: an error naming the flag and the value.
@Suite(.timeLimit(.minutes(10))) struct NumericFlagTests {
    @Test(arguments: [
        (["launch", "--port", "70000"], "--port"),
        (["launch", "--workers", "100000"], "--workers"),
        (["train", "--epochs", "9223372036854775807"], "--epochs"),
        (["train", "--steps", "0"], "--steps"),
        (["train", "--lr", "inf"], "--lr"),
        (["train", "--warmup-epochs", "nan"], "--warmup-epochs"),
        (["launch", "--timeout", "inf"], "--timeout"),
        (["launch", "--join-timeout", "1e18"], "--join-timeout"),
        (["launch", "--bucket-mb", "inf"], "--bucket-mb"),
        (["eval", "--weights", "w.safetensors", "--batch-size", "0"], "--batch-size"),
        (["train", "--threads", "0"], "--threads"),
        (["coordinator", "--bind", "tcp://127.0.0.1:1", "--workers", "5000"], "--workers"),
        (["join", "--master-port", "70000"], "--master-port"),
        (["join", "--world-size", "0"], "--world-size"),
        (["join", "--rank=-1"], "--rank"),
        (["join", "--threads", "0"], "--threads"),
        (["join", "--join-timeout", "0"], "--join-timeout"),
    ])
    func badNumbersAreRefusedNamingTheFlag(arguments: [String], flag: String) throws {
        let output = try refusedBeforeStarting(arguments)
        #expect(output.contains(flag) && output.contains("must"), "\(arguments): \(output)")
    }
}

/// Runs a command that must fail before it starts anything; its output.
func refusedBeforeStarting(_ arguments: [String]) throws -> String {
    let dir = try temporaryDirectory("refused")
    defer { try? FileManager.default.removeItem(atPath: dir) }
    let c = try Child(arguments, log: dir + "/out.log")
    #expect(c.wait(timeout: 60) != 0, "\(arguments) exited 0: \(c.output)")
    for started in ["training squeezenet", "waiting for", "joined"] {
        #expect(!c.output.contains(started), "\(arguments) started: \(c.output)")
    }
    return c.output
}

/// A value an option does not take is refused naming the flag and the values it takes.
@Suite(.timeLimit(.minutes(10))) struct OptionValueTests {
    @Test(arguments: [
        (["launch", "--compress", "zip"], "'--compress <compress>'. Please provide one of 'none', 'fp16', 'bf16', 'int8' or 'topk:F with 0 < F ≤ 1'"),
        (["bench", "cluster", "--compress", "topk:2"], "'--compress <compress>'. Please provide one of"),
        (["coordinator", "--bind", "tcp://127.0.0.1:1", "--workers", "1", "--transport", "udp"], "'--transport <transport>'. Please provide one of 'tcp' and 'ipc'"),
        (["bench", "allreduce", "--transport", "udp"], "'--transport <transport>'. Please provide one of 'tcp' and 'ipc'"),
        (["eval", "--weights", "w.safetensors", "--tta", "both"], "'--tta <tta>'. Please provide one of 'none' and 'flip'"),
    ])
    func badValuesAreRefusedNamingTheChoices(arguments: [String], message: String) throws {
        let output = try refusedBeforeStarting(arguments)
        #expect(output.contains(message), "\(arguments): \(output)")
    }
}

/// `--allreduce tree` with top-k compression is refused before anything starts, naming both flags.
@Suite(.timeLimit(.minutes(10))) struct TreeTopkFlagTests {
    @Test(arguments: [
        ["launch", "--allreduce", "tree", "--compress", "topk:0.01"],
        ["coordinator", "--bind", "tcp://127.0.0.1:1", "--workers", "2", "--allreduce", "tree", "--compress", "topk:0.01"],
        ["join", "--allreduce", "tree", "--compress", "topk:0.01"],
        ["bench", "allreduce", "--algorithm", "tree", "--compress", "topk:0.01"],
        ["bench", "cluster", "--allreduce", "tree", "--compress", "topk:0.01"],
    ])
    func treeWithTopkIsRefusedNamingBothFlags(arguments: [String]) throws {
        let output = try refusedBeforeStarting(arguments)
        #expect(output.contains("--allreduce tree does not take --compress topk:0.01"), "\(arguments): \(output)")
    }
}

/// Deep Gradient Compression's flags refine top-k: without it (or in `train`, one process) they are
/// refused before anything starts, naming the flag and what to add; bad values name the flag.
@Suite(.timeLimit(.minutes(10))) struct DGCFlagTests {
    @Test(arguments: [
        (["launch", "--momentum-correction"], "--momentum-correction refines top-k gradient compression, and this run has --compress none: add --compress topk:F"),
        (["coordinator", "--bind", "tcp://127.0.0.1:1", "--workers", "2", "--compress", "int8", "--local-clip-norm", "1"],
         "--local-clip-norm refines top-k gradient compression, and this run has --compress int8"),
        (["join", "--sparsity-warmup-epochs", "3"], "--sparsity-warmup-epochs refines top-k gradient compression"),
        (["train", "--momentum-correction"], "--momentum-correction refines a cluster's top-k gradient compression, and train is one process"),
        (["launch", "--compress", "topk:0.01", "--momentum-correction", "--momentum", "0"], "--momentum-correction moves --momentum"),
        (["launch", "--compress", "topk:0.01", "--local-clip-norm=-1"], "--local-clip-norm must be"),
        (["launch", "--compress", "topk:0.01", "--sparsity-warmup-epochs=-1"], "--sparsity-warmup-epochs"),
    ])
    func dgcFlagsAreRefusedWithoutTopK(arguments: [String], message: String) throws {
        let output = try refusedBeforeStarting(arguments)
        #expect(output.contains(message), "\(arguments): \(output)")
    }
}

/// A bad endpoint is refused before any socket sees it (libzmq would wrap port 99999 into 34463
/// and listen there), naming the flag and what is wrong.
@Suite struct EndpointFlagTests {
    @Test(arguments: [
        (["coordinator", "--bind", "tcp://127.0.0.1:99999", "--workers", "2"], "port 99999 is outside 1-65535"),
        (["coordinator", "--bind", "tcp://127.0.0.1:0", "--workers", "2"], "port 0 is outside 1-65535"),
        (["coordinator", "--bind", "udp://127.0.0.1:29500", "--workers", "2"], "unknown scheme"),
        (["coordinator", "--bind", "tcp://:29500", "--workers", "2"], "no host"),
        (["worker", "--coordinator", "tcp://127.0.0.1:65536"], "port 65536 is outside 1-65535"),
        (["worker", "--coordinator", "tcp://127.0.0.1:29500x"], "is not a number"),
        (["worker", "--coordinator", "tcp://127.0.0.1"], "no port"),
    ])
    func badEndpointsAreRefusedNamingTheFlag(arguments: [String], reason: String) throws {
        let output = try refusedBeforeStarting(arguments)
        #expect(output.contains(arguments[1]) && output.contains(reason), "\(arguments): \(output)")
    }
}
