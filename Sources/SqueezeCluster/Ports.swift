import Foundation

/// A TCP port that was free a moment ago on `host` (bind to port 0, read it back, close).
/// Another process could take it before it is used again; callers bind it at once.
public func freeTCPPort(host: String = "127.0.0.1") throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw ClusterError("socket() failed: \(String(cString: strerror(errno)))") }
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = 0
    guard inet_pton(AF_INET, host, &address.sin_addr) == 1 else { throw ClusterError("'\(host)' is not an IPv4 address") }
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let ok = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
    }
    guard ok else { throw ClusterError("cannot find a free TCP port on \(host): \(String(cString: strerror(errno)))") }
    return Int(UInt16(bigEndian: address.sin_port))
}
