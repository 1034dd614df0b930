// Replacing a file so that a crash leaves either the old one or the complete new one.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The one atomic write of the project (checkpoints, `latest`, safetensors, residual files):
/// mode 0600 for a new file, the old mode for a file replaced; a temporary file `.<name>.tmp-<pid>-<random>` in the same directory, filled by a full write
/// loop, fsync'ed, closed and renamed over the path; then the directory is fsync'ed so the
/// rename itself survives a crash. On any failure the temporary file is removed and the path is
/// untouched. System failures throw `SystemError` (errno read right after the failing call, the
/// operation naming the file); errors of `body` pass through as they are.
public enum AtomicFile {
    /// The open temporary file `AtomicFile.write` hands to its body.
    public struct Writer: ~Copyable {
        let fd: Int32
        let path: String

        /// Writes all of `bytes` (looping over short writes, retrying EINTR).
        public func write(_ bytes: UnsafeRawBufferPointer) throws(SystemError) {
            guard var p = bytes.baseAddress else { return }
            var left = bytes.count
            while left > 0 {
                let n = try systemCallRequired("write", operation: "write '\(path)'") {
                    systemWrite(fd, p, min(left, 1 << 30))
                }
                p += n
                left -= n
            }
        }

        public func write(_ bytes: [UInt8]) throws(SystemError) {
            var failure: SystemError?
            bytes.withUnsafeBytes { b in
                do throws(SystemError) { try write(b) } catch { failure = error }
            }
            if let failure { throw failure }
        }
    }

    /// Replaces `path` by what `body` writes.
    public static func write(to path: String, _ body: (borrowing Writer) throws -> Void) throws {
        let slash = path.lastIndex(of: "/")
        let directory = slash.map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? "."
        let base = slash.map { String(path[path.index(after: $0)...]) } ?? path
        guard !base.isEmpty else {
            throw SystemError(code: EISDIR, function: "open", operation: "write '\(path)': the path names a directory")
        }
        let temporary = (slash.map { String(path[...$0]) } ?? "")
            + ".\(base).tmp-\(getpid())-\(String(UInt64.random(in: 0...UInt64.max), radix: 36))"

        // A new file is private (0600, whatever the umask); a file replaced keeps its mode.
        var replaced = stat()
        let mode = stat(path, &replaced) == 0 && replaced.st_mode & S_IFMT == S_IFREG ? replaced.st_mode & 0o777 : 0o600
        let fd = try systemCallRequired("open", operation: "create temporary file '\(temporary)'") {
            open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
        }
        var renamed = false
        defer { if !renamed { unlink(temporary) } }
        do {
            try systemCallRequired("fchmod", operation: "set the mode of '\(temporary)'") { fchmod(fd, mode) }
            try body(Writer(fd: fd, path: temporary))
            try systemCallRequired("fsync", operation: "fsync '\(temporary)'") { fsync(fd) }
        } catch {
            close(fd)
            throw error
        }
        // close is not retried: on Linux the descriptor is gone even when it reports EINTR.
        guard close(fd) == 0 else { throw SystemError.last("close", operation: "close '\(temporary)'") }
        guard rename(temporary, path) == 0 else {
            throw SystemError.last("rename", operation: "rename '\(temporary)' to '\(path)'")
        }
        renamed = true

        let directoryFD = try systemCallRequired("open", operation: "open directory '\(directory)'") {
            open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        }
        defer { close(directoryFD) }
        try systemCallRequired("fsync", operation: "fsync directory '\(directory)'") { fsync(directoryFD) }
    }

    /// Replaces `path` by `bytes`.
    public static func write(_ bytes: [UInt8], to path: String) throws {
        try write(to: path) { try $0.write(bytes) }
    }
}

/// The C library's write(2), out of reach of `Writer.write`'s own name.
private func systemWrite(_ fd: Int32, _ buffer: UnsafeRawPointer, _ count: Int) -> Int {
    write(fd, buffer, count)
}
