// The two tiers of the suite, and the one way a test starts a child process.
import Foundation
import Testing

/// `scripts/test --quick` (SQUEEZETRAIN_TEST_TIER=quick) runs the in-process tier: every test that starts
/// a process belongs to the full tier (`scripts/test`), and is skipped by `startProcess` in the quick one.
/// A new process test needs no marking: starting its first process is what puts it in the full tier.
public enum TestTier {
    public static let variable = "SQUEEZETRAIN_TEST_TIER"
    public static let isQuick = ProcessInfo.processInfo.environment[variable] == "quick"
}

/// Starts `process`; in the quick tier, ends the running test as skipped instead (tests start every
/// child through here: `Process.run()` anywhere else in Tests/ fails `TierTests`).
public func startProcess(_ process: Process) throws {
    if TestTier.isQuick {
        try Test.cancel("starts processes: in the full tier (scripts/test), not scripts/test --quick")
    }
    try process.run()
}

/// Starts `process` (through `startProcess`) and waits for it: its exit status and its standard output
/// and error together.
public func runCollectingOutput(_ process: Process) throws -> (status: Int32, output: String) {
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    try startProcess(process)
    let output = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: output, as: UTF8.self))
}

/// The `squeezetrain` executable built alongside the tests.
public let squeezetrain: String = {
    var candidates = [URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().path]
    if let exe = Bundle.main.executablePath { candidates.append((exe as NSString).deletingLastPathComponent) }
    candidates += ["release", "debug"].map { TestInputs.packageRoot + "/.build/\($0)" }
    return candidates.map { $0 + "/squeezetrain" }.first { FileManager.default.isExecutableFile(atPath: $0) }
        ?? "squeezetrain executable not found next to the tests (\(candidates)); run `swift build` first"
}()
