import Foundation
import Testing
import SqueezeEngine
import SqueezeTestSupport

/// Runs `squeezetrain arguments`; returns its exit status and its standard output and error together.
func runSqueezetrain(_ arguments: [String]) throws -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: squeezetrain)
    process.arguments = arguments
    var env = ProcessInfo.processInfo.environment
    env["CIFAR10_DIR"] = TestInputs.cifar10
    process.environment = env
    let log = FileManager.default.temporaryDirectory.appendingPathComponent("squeezetrain-compress-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).log")
    _ = FileManager.default.createFile(atPath: log.path, contents: nil)
    defer { try? FileManager.default.removeItem(at: log) }
    let handle = try FileHandle(forWritingTo: log)
    process.standardOutput = handle
    process.standardError = handle
    try startProcess(process)
    process.waitUntilExit()
    try handle.close()
    return (process.terminationStatus, try String(contentsOf: log, encoding: .utf8))
}

@Suite("squeezetrain compress (the binary)", .timeLimit(.minutes(10)))
struct CompressCommandTests {
    /// Weights of a small SqueezeNet with BatchNorm (so that evaluating the test set is quick), written into `dir`.
    func smallWeights(in dir: String) throws -> String {
        let path = dir + "/small.safetensors"
        try Network(config: smallConfig(steps: 0).model, seed: 1).saveWeights(to: path)
        return path
    }

    @Test func aTinyRunWritesAFileThatInspectAndEvalAccept() throws {
        let dir = try temporaryDirectory("compress")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let weights = try smallWeights(in: dir)
        let output = dir + "/m.sqz", report = dir + "/report.json"
        let run = try runSqueezetrain(["compress", "--weights", weights, "--output", output, "--bits", "6", "--prune-steps", "2",
                                       "--quantize-steps", "2", "--batch-size", "16", "--report", report])
        #expect(run.status == 0, "\(run.output)")
        for stage in ["dense", "pruned to", "after pruning retraining", "quantized to 6 bits", "after quantized fine-tuning", "wrote \(output)"] {
            #expect(run.output.contains(stage), "\(stage) in \(run.output)")
        }
        let json = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: report))) as? [String: Any])
        let stages = try #require(json["stages"] as? [[String: Any]])
        let names = stages.map { $0["stage"] as? String ?? "" }
        #expect(names.count == 5 && names[1].hasPrefix("pruned to "), "\(names)")
        #expect([names[0]] + names.dropFirst(2) == ["dense", "after pruning retraining", "quantized to 6 bits", "after quantized fine-tuning"])
        let bytes = try #require(json["compressed_bytes"] as? Int)
        #expect(bytes == (try FileManager.default.attributesOfItem(atPath: output)[.size] as? Int))

        let inspect = try runSqueezetrain(["inspect", output, "--json"])
        #expect(inspect.status == 0, "\(inspect.output)")
        let table = try #require(try JSONSerialization.jsonObject(with: Data(inspect.output.utf8)) as? [String: Any])
        #expect(table["file_bytes"] as? Int == bytes)
        let layers = try #require(table["layers"] as? [[String: Any]])
        let expand = try #require(layers.first { $0["name"] as? String == "features.3.expand3x3.weight" })
        #expect(expand["bits"] as? Int == 6)
        #expect(abs((expand["density"] as? Double ?? 0) - 0.33) < 0.01)

        // eval decodes the file into the model compress last evaluated: the same test accuracy, to the last digit.
        let eval = try runSqueezetrain(["eval", "--weights", output, "--json"])
        #expect(eval.status == 0, "\(eval.output)")
        let accuracy = try #require((try JSONSerialization.jsonObject(with: Data(eval.output.utf8)) as? [String: Any])?["accuracy"] as? Double)
        #expect(accuracy == stages.last?["test_accuracy"] as? Double)

        // The output is not replaced without --force.
        let again = try runSqueezetrain(["compress", "--weights", weights, "--output", output])
        #expect(again.status != 0 && again.output.contains("--output \(output) exists; give --force"), "\(again.output)")
    }

    @Test func badInputIsRefusedBeforeAnyTrainingNamingTheProblem() throws {
        let dir = try temporaryDirectory("compress-bad")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let out = dir + "/m.sqz", weights = try smallWeights(in: dir)
        let cases: [([String], String)] = [
            (["--weights", dir + "/missing.safetensors", "--output", out], "missing.safetensors: no such file"),
            (["--weights", weights, "--output", out, "--bits", "9"], "--bits must be in 1...8 (got 9)"),
            (["--weights", weights, "--output", out, "--density", "expand3x3=1.5"], "--density 'expand3x3=1.5': the density must be in (0, 1]"),
            (["--weights", weights, "--output", out, "--density", "fc7=0.1"], "'fc7' is neither a group"),
            (["--weights", weights, "--output", out, "--density", "features.99.weight=0.1"], "'features.99.weight' is neither a group of squeezenet1_1"),
            (["--weights", weights, "--output", dir + "/no/such/dir/m.sqz"], "does not exist"),
        ]
        for (arguments, message) in cases {
            let run = try runSqueezetrain(["compress"] + arguments)
            #expect(run.status != 0 && run.output.contains(message), "\(arguments): \(run.output)")
        }
        #expect(!FileManager.default.fileExists(atPath: out))
    }
}
