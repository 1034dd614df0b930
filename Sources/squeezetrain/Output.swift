import Foundation
import ArgumentParser

/// JSON with snake_case keys, one object per call.
func printJSON<T: Encodable>(_ value: T) throws {
    let encoder = JSONEncoder()
    encoder.keyEncodingStrategy = .convertToSnakeCase
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    print(String(decoding: try encoder.encode(value), as: UTF8.self))
}

/// 1234567 → "1,234,567"
func grouped(_ n: Int) -> String {
    let digits = String(n.magnitude)
    var out = ""
    for (i, ch) in digits.enumerated() {
        if i > 0 && (digits.count - i) % 3 == 0 { out.append(",") }
        out.append(ch)
    }
    return n < 0 ? "-" + out : out
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
