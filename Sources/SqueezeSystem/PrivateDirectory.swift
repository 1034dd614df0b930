// Temporary directories only this user can enter, and opening files in them without following links.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A fresh directory `<parent>/<prefix>XXXXXX` made by mkdtemp(3): a random name, mode 0700, never a
/// path that already existed (a directory or link planted by someone else is never reused). `parent`
/// defaults to `$TMPDIR` (else /tmp).
public func makePrivateDirectory(prefix: String, in parent: String? = nil) throws(SystemError) -> String {
    var base = parent ?? getenv("TMPDIR").map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
    if !base.hasSuffix("/") { base += "/" }
    var template = Array((base + prefix + "XXXXXX").utf8CString)
    let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
    guard made != nil else { throw SystemError.last("mkdtemp", operation: "create a private directory \(base)\(prefix)XXXXXX") }
    return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// Opens `path` for reading without following a symbolic link in its last component (O_NOFOLLOW):
/// inside a private directory, a link can only have been planted. Returns the file's bytes.
public func readFileNoFollow(_ path: String) throws -> [UInt8] {
    let fd = try systemCallRequired("open", operation: "open '\(path)' (not following links)") { open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW) }
    defer { close(fd) }
    var bytes = [UInt8](), chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let n = try chunk.withUnsafeMutableBytes { b in
            try systemCallRequired("read", operation: "read '\(path)'") { read(fd, b.baseAddress, b.count) }
        }
        if n == 0 { return bytes }
        bytes += chunk[..<n]
    }
}
