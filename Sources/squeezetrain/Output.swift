// What every command shares: printing (JSON, tables, numbers), the one error report, flag range checks.

import Foundation
import ArgumentParser
import SqueezeTraining

/// JSON with snake_case keys, one object per call.
func printJSON<T: Encodable>(_ value: T) throws {
    print(String(decoding: try jsonText(value), as: UTF8.self))
}

/// `value` as pretty-printed JSON with snake_case keys, sorted.
func jsonText<T: Encodable>(_ value: T) throws -> [UInt8] {
    let encoder = JSONEncoder()
    encoder.keyEncodingStrategy = .convertToSnakeCase
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    return Array(try encoder.encode(value))
}

func pad(_ s: String, _ width: Int, right: Bool = false) -> String {
    let fill = String(repeating: " ", count: max(0, width - s.count))
    return right ? fill + s : s + fill
}

/// Bytes as "2.78 MiB".
func humanBytes(_ bytes: Double) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var v = bytes, u = 0
    while v >= 1024 && u < units.count - 1 { v /= 1024; u += 1 }
    return u == 0 ? "\(Int(v)) B" : String(format: "%.2f %@", v, units[u])
}

/// Peak resident set size of this process, in bytes.
func peakResidentBytes() -> Int {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    return usage.ru_maxrss * 1024
}

enum FileHandleOutput {
    static func standardError(_ text: String) { FileHandle.standardError.write(Data(text.utf8)) }
}

/// A command whose failures are all reported one way (`reported(_:)`): it implements `execute()`.
protocol ReportingCommand: ParsableCommand {
    func execute() throws
}

extension ReportingCommand {
    func run() throws {
        do { try execute() } catch { throw reported(error) }
    }
}

/// Reports a command's error and returns the exit code to end with: an `ExitCode` passes as it is; a
/// stop before the work began (`Interrupted`) is said plainly, exit 128 + the signal (1 without one);
/// anything else is printed for people (no stack trace for expected failures), exit 1.
func reported(_ error: any Error) -> ExitCode {
    switch error {
    case let code as ExitCode: return code
    case let stop as Interrupted:
        emit("\(stop)\n")
        return ExitCode(stop.exitCode)
    default:
        printError("\(error)")
        return ExitCode(1)
    }
}

/// `squeezetrain: error: MESSAGE` on standard error.
func printError(_ message: String) {
    FileHandleOutput.standardError("squeezetrain: error: \(message)\n")
}

/// Throws a `ValidationError` naming `flag` unless `value` lies in `range`.
func requireRange<T: Comparable>(_ flag: String, _ value: T, _ range: ClosedRange<T>, _ unit: String = "") throws {
    guard range.contains(value) else {
        throw ValidationError("\(flag) must be in \(range.lowerBound)...\(range.upperBound)\(unit) (got \(value))")
    }
}

/// Throws unless `value` is finite and in `range`.
func requireFinite(_ flag: String, _ value: Double, _ range: ClosedRange<Double>) throws {
    guard value.isFinite, range.contains(value) else {
        throw ValidationError("\(flag) must be a finite number in \(range.lowerBound)...\(range.upperBound) (got \(value))")
    }
}

/// Most worker processes `launch` starts on this machine: more than four per CPU only thrash.
var maxLocalWorkers: Int { max(2, 4 * ProcessInfo.processInfo.activeProcessorCount) }
