import Foundation
import Testing
import SqueezeCollectives
import SqueezeTransport
@testable import SqueezeCluster
import SqueezeTestSupport

/// The package root (…/Tests/SqueezeClusterTests/ProcessHelpers.swift → …).
let packageRoot = URL(fileURLWithPath: TestInputs.packageRoot)
/// The CIFAR-10 every child process trains on: real when ../shared has it, else generated (SyntheticCIFAR10).
let cifarDirectory = TestInputs.cifar10
/// The weights every rank of a run starts from: PyTorch's reference initial weights, else seed-0 ones.
let goldenWeights = TestInputs.initialWeights

/// The run key every child process gets through $SQUEEZETRAIN_KEY_FILE, so the tests run the
/// default, encrypted path (a private directory, removed with the machine's temporary files).
let testKeyFile: String = {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("squeezetrain-test-key-\(getpid())").path
    mkdir(dir, 0o700)
    let path = dir + "/run.key"
    if !FileManager.default.fileExists(atPath: path) { try! RunKey.generate().write(to: path) }
    return path
}()

func temporaryDirectory(_ name: String) throws -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("squeezetrain-\(name)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    return dir.path
}

/// nil when the two files hold the same bytes, else where they first differ. (`#expect(a == b)` on
/// two megabytes of Data would have the testing library diff them element by element, for hours.)
func byteDifference(_ a: String, _ b: String) throws -> String? {
    let x = try Data(contentsOf: URL(fileURLWithPath: a)), y = try Data(contentsOf: URL(fileURLWithPath: b))
    if x == y { return nil }
    let common: Int = min(x.count, y.count)
    let at: Int = (0..<common).first { (i: Int) -> Bool in x[x.startIndex + i] != y[y.startIndex + i] } ?? common
    return "\(a) (\(x.count) bytes) and \(b) (\(y.count) bytes) first differ at byte \(at)"
}

/// A child process whose combined output goes to a file.
final class Child {
    let process = Process()
    let logPath: String

    /// `executable` (default: squeezetrain) runs with this process's environment, CIFAR10_DIR, the test
    /// key and `environment` on top.
    init(_ arguments: [String], log: String, executable: String = squeezetrain, environment: [String: String] = [:]) throws {
        logPath = log
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardOutput = handle
        process.standardError = handle
        var env = ProcessInfo.processInfo.environment
        env["CIFAR10_DIR"] = cifarDirectory
        env["SQUEEZETRAIN_KEY_FILE"] = testKeyFile
        env.merge(environment) { $1 }
        process.environment = env
        try startProcess(process)
    }

    var output: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// Waits up to `timeout` seconds; kills the process if it is still running then. Returns the exit status.
    @discardableResult
    func wait(timeout: Double = 120) -> Int32 {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(50_000) }
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            Issue.record("process \(process.arguments ?? []) did not finish in \(timeout) s; output:\n\(output)")
        }
        return process.terminationStatus
    }

    /// Waits until the output contains `text` (or the process ends / `timeout` passes).
    func waitForOutput(_ text: String, timeout: Double = 60) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if output.contains(text) { return true }
            if !process.isRunning { return output.contains(text) }
            usleep(50_000)
        }
        return false
    }

    /// The events (`--events`) the process has printed so far.
    var events: [ClusterEvent] { output.split(separator: "\n").compactMap { ClusterEvent(line: String($0)) } }

    /// Waits until the process has printed an event of `kind` (or ends / `timeout` passes).
    func waitForEvent(_ kind: ClusterEvent.Kind, timeout: Double = 60) -> ClusterEvent? {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let e = events.first(where: { $0.event == kind }) { return e }
            if !process.isRunning { break }
            usleep(50_000)
        }
        return events.first { $0.event == kind }
    }

    deinit { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
}

/// Starts a coordinator on an ephemeral loopback port and returns it with the endpoint it bound
/// (from its `listening` event); `environment` as for `Child`.
func startCoordinator(_ arguments: [String], in dir: String, environment: [String: String] = [:]) throws -> (Child, String) {
    let c = try Child(["coordinator", "--bind", "tcp://127.0.0.1:*", "--events"] + arguments, log: dir + "/coordinator.log",
                      environment: environment)
    guard let event = c.waitForEvent(.listening), let endpoint = event.endpoint else {
        throw TestFailure("the coordinator did not start:\n\(c.output)")
    }
    return (c, endpoint)
}

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// Per-worker step lines of a metrics file (epoch lines, without `rank`, left out).
func readMetrics(_ path: String) throws -> [[String: Any]] {
    try readAllMetrics(path).filter { $0["rank"] != nil }
}

/// Every JSON line of a metrics file.
func readAllMetrics(_ path: String) throws -> [[String: Any]] {
    try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n").map {
        try JSONSerialization.jsonObject(with: Data($0.utf8)) as! [String: Any]
    }
}

/// SIGKILLs every process whose command line matches `pattern` (pkill -f).
func killProcesses(matching pattern: String) throws {
    let pkill = Process()
    pkill.executableURL = URL(fileURLWithPath: "/usr/bin/pkill")
    pkill.arguments = ["-9", "-f", pattern]
    try startProcess(pkill)
    pkill.waitUntilExit()
}
