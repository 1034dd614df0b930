// A ZeroMQ endpoint given on the command line, checked before any socket sees it.

/// `tcp://HOST:PORT` (PORT 1–65535, or `*` for a free one when binding; HOST a name, an IPv4
/// address, `[IPv6]` or `*`) or `ipc://PATH`. libzmq itself would wrap a port above 65535 into
/// another one and listen there; this refuses it instead.
public struct Endpoint: Sendable, Equatable, CustomStringConvertible {
    public enum Kind: String, Sendable { case tcp, ipc }
    public let kind: Kind
    /// tcp: the host and port as written; ipc: the path.
    public let host: String, port: Int?, path: String

    public var description: String { kind == .ipc ? "ipc://\(path)" : "tcp://\(host):\(port.map(String.init) ?? "*")" }

    /// Parses `text`; the error names `flag` and what is wrong.
    public init(_ text: String, flag: String) throws(EndpointError) {
        func refuse(_ why: String) -> EndpointError {
            EndpointError("\(flag) \(text): \(why); expected tcp://HOST:PORT (port 1-65535) or ipc://PATH")
        }
        if text.hasPrefix("ipc://") {
            path = String(text.dropFirst(6))
            guard !path.isEmpty else { throw refuse("no socket path") }
            guard !path.contains("\0") else { throw refuse("a NUL byte in the path") }
            kind = .ipc; host = ""; port = nil
            return
        }
        guard text.hasPrefix("tcp://") else { throw refuse("unknown scheme") }
        let rest = text.dropFirst(6)
        guard let colon = rest.lastIndex(of: ":") else { throw refuse("no port") }
        let hostPart = String(rest[..<colon]), portPart = String(rest[rest.index(after: colon)...])
        guard !hostPart.isEmpty else { throw refuse("no host") }
        if hostPart.hasPrefix("[") {
            guard hostPart.hasSuffix("]"), hostPart.count > 2 else { throw refuse("an IPv6 host must be written [ADDRESS]") }
        } else {
            guard hostPart.allSatisfy({ $0.isLetter || $0.isNumber || "-._*".contains($0) }), !hostPart.contains(":") else {
                throw refuse("'\(hostPart)' is not a host name or address")
            }
        }
        if portPart == "*" {
            port = nil
        } else {
            guard let p = Int(portPart), portPart.allSatisfy(\.isASCII), portPart.first != "+" else {
                throw refuse("the port '\(portPart)' is not a number")
            }
            guard (1...65_535).contains(p) else { throw refuse("port \(p) is outside 1-65535") }
            port = p
        }
        kind = .tcp; host = hostPart; path = ""
    }
}

public struct EndpointError: Error, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}
