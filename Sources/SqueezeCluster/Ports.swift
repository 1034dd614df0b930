import Foundation
import SqueezeTransport

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

/// Whether `host` names this machine: it resolves (IPv4) to an address a socket here can bind.
/// nil when it does not resolve (yet: a Kubernetes Service's name may appear a moment later).
/// Rank 0 of `join` checks MASTER_ADDR with it: the other ranks will look for the coordinator there.
public func isThisHost(_ host: String) -> Bool? {
    var hints = addrinfo()
    hints.ai_family = AF_INET
    hints.ai_socktype = Int32(SOCK_DGRAM.rawValue)
    var info: UnsafeMutablePointer<addrinfo>?
    guard getaddrinfo(host, nil, &hints, &info) == 0, let info else { return nil }
    defer { freeaddrinfo(info) }
    var entry: UnsafeMutablePointer<addrinfo>? = info
    while let e = entry {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        if fd >= 0 {
            defer { close(fd) }
            if bind(fd, e.pointee.ai_addr, e.pointee.ai_addrlen) == 0 { return true }  // port 0: any free port
        }
        entry = e.pointee.ai_next
    }
    return false
}

/// nil when a TCP socket can listen on `port` on all IPv4 interfaces right now (a trial bind, with
/// SO_REUSEADDR as ZeroMQ's, closed at once), else why not, naming the port and, when it can be
/// found, the process listening there (`tcpListener(port:)`).
public func tcpPortRefusal(_ port: Int) -> String? {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return "socket() failed: \(String(cString: strerror(errno)))" }
    defer { close(fd) }
    var on: Int32 = 1
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, socklen_t(MemoryLayout<Int32>.size))
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = UInt16(port).bigEndian
    address.sin_addr.s_addr = INADDR_ANY
    let bound = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
    }
    if bound { return nil }
    let reason = String(cString: strerror(errno))
    guard errno == EADDRINUSE else { return "port \(port) cannot be bound: \(reason)" }
    return "port \(port) is already taken (\(reason)): " + (tcpListener(port: port).map { "\($0) listens on it" }
        ?? "no listener on it in /proc/net/tcp, so its owner is unknown")
}
