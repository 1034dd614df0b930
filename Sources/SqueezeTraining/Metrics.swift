import Foundation
import SqueezeSystem

/// Appends JSON lines (one object per line) to a metrics file, flushing each line so that a killed
/// run loses nothing already reported. Each line is one `MetricsLine` type; values are numbers,
/// strings or booleans.
public final class MetricsWriter: MetricsSink {
    private let handle: FileHandle
    public let path: String
    /// The first failed write (the disk is full, say), reported once on standard error; training goes on.
    public private(set) var failure: SystemError?

    public init(path: String, append: Bool) throws {
        self.path = path
        // O_APPEND: every line lands at the end even when another process (the launcher recording a
        // restart) appends to the same file. O_NOFOLLOW: a link planted where the file goes (in a shared
        // or temporary directory) must not make it truncate whatever the link names.
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC | (append ? 0 : O_TRUNC), 0o644)
        guard fd >= 0 else {
            let e = errno
            throw TrainingError.invalidConfiguration("cannot open the metrics file \(path): \(String(cString: strerror(e)))"
                                                     + (e == ELOOP ? " (it is a symbolic link, which is not followed: give the file's own path)" : ""))
        }
        handle = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
    }

    deinit { try? handle.close() }

    /// Appends the line with write(2) (FileHandle.write would trap on an I/O error). A failure is
    /// kept in `failure` and reported once, naming the file; later lines are still tried.
    public func record<Line: MetricsLine>(_ line: Line) {
        let bytes = Array((MetricsLineEncoder.line(line) + "\n").utf8)
        do {
            try bytes.withUnsafeBytes { buffer in
                var done = 0
                while done < buffer.count {
                    let n = try systemCallRequired("write", operation: "append to the metrics file \(path)") {
                        write(handle.fileDescriptor, buffer.baseAddress! + done, buffer.count - done)
                    }
                    done += n
                }
            }
        } catch let error as SystemError {
            if failure == nil {
                failure = error
                FileHandle.standardError.write(Data("squeezetrain: warning: metrics lines are being lost: \(error)\n".utf8))
            }
        } catch {}
    }

    static func encode(_ v: Any) -> String {
        switch v {
        case let d as Double:  // whole numbers (byte counts) exactly, the rest to 6 significant digits
            guard d.isFinite else { return "null" }
            return d == d.rounded() && abs(d) < 1e15 ? String(Int64(d)) : String(format: "%.6g", d)
        case let f as Float: return f.isFinite ? String(format: "%.6g", Double(f)) : "null"
        case let i as Int: return String(i)
        case let b as Bool: return b ? "true" : "false"
        case let s as String:
            let data = (try? JSONSerialization.data(withJSONObject: [s], options: [.withoutEscapingSlashes])) ?? Data("[\"\"]".utf8)
            return String(decoding: data.dropFirst().dropLast(), as: UTF8.self)
        case let a as [Int]: return "[" + a.map(String.init).joined(separator: ",") + "]"
        case let a as [Double]: return "[" + a.map { encode($0) }.joined(separator: ",") + "]"
        case let m as [[Int]]: return "[" + m.map { encode($0) }.joined(separator: ",") + "]"
        default: return "null"
        }
    }
}

/// Training progress for people: a redrawn bar on a terminal, plain periodic lines otherwise.
public final class ProgressDisplay {
    public let isTerminal: Bool
    private let prefix: String
    private var lastPlain = DispatchTime.now().uptimeNanoseconds
    private let plainInterval: UInt64

    public init(prefix: String = "", plainIntervalSeconds: Double = 10) {
        isTerminal = isatty(STDOUT_FILENO) == 1 && ProcessInfo.processInfo.environment["TERM"] != "dumb"
        self.prefix = prefix
        plainInterval = UInt64(plainIntervalSeconds * 1e9)
    }

    /// One step's progress within an epoch: `done` of `total` steps. `extra` follows the standard fields.
    public func update(epoch: Int, epochs: Int, done: Int, total: Int, loss: Double, accuracy: Double,
                       imagesPerSecond: Double, etaSeconds: Double, extra: String = "") {
        let stats = String(format: "loss %.4f  acc %5.1f%%  %5.0f img/s  ETA %@", loss, accuracy * 100, imagesPerSecond,
                           ProgressDisplay.duration(etaSeconds)) + (extra.isEmpty ? "" : "  " + extra)
        if isTerminal {
            let width = 24, filled = total == 0 ? width : min(width, done * width / total)
            let bar = String(repeating: "█", count: filled) + String(repeating: "·", count: width - filled)
            emit("\r\u{1B}[2K\(prefix)epoch \(epoch + 1)/\(epochs) \(bar) \(done)/\(total)  \(stats)" + (done == total ? "\n" : ""))
        } else {
            let now = DispatchTime.now().uptimeNanoseconds
            guard now - lastPlain >= plainInterval || done == total else { return }
            lastPlain = now
            emit("\(prefix)epoch \(epoch + 1)/\(epochs) step \(done)/\(total)  \(stats)\n")
        }
    }

    /// A line of its own (ends any bar in progress).
    public func line(_ text: String) {
        emit(prefix + text + "\n")
    }

    public static func duration(_ seconds: Double) -> String {
        guard seconds.isFinite, seconds >= 0 else { return "--:--" }
        let s = Int(seconds.rounded())
        return s >= 3600 ? String(format: "%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60) : String(format: "%02d:%02d", s / 60, s % 60)
    }
}

/// Writes straight to standard output (unbuffered), so lines appear at once even through a pipe.
public func emit(_ text: String) {
    FileHandle.standardOutput.write(Data(text.utf8))
}
