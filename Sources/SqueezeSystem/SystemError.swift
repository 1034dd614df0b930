// The one error type of failed system calls (-1 or NULL + errno), and the loop that makes them:
// errno is read right after the call that failed, EINTR is retried, EAGAIN is not an error.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A system or C-library call failed: its errno, the function and, where it helps, what it was
/// doing ("create temporary file '/ckpt/.latest.tmp-41-x'"). Used by the ZeroMQ wrapper, CPU
/// binding and every file write.
public struct SystemError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The errno value.
    public let code: Int32
    /// The C function that failed, e.g. "open", "zmq_bind".
    public let function: String
    /// The text of `code` (`strerror`, or the library's own, e.g. `zmq_strerror`).
    public let message: String
    /// What the call was for, with the path or argument involved; nil when `function` says it all.
    public let operation: String?

    public init(code: Int32, function: String, operation: String? = nil, message: String? = nil) {
        self.code = code
        self.function = function
        self.operation = operation
        self.message = message ?? String(cString: strerror(code))
    }

    /// The error of the call that just failed: reads `errno` now, so call it before anything else
    /// (a `close`, an `unlink`, a string conversion) can change it.
    public static func last(_ function: String, operation: String? = nil) -> SystemError {
        SystemError(code: errno, function: function, operation: operation)
    }

    public var description: String {
        "\(function)\(operation.map { " (\($0))" } ?? "") failed: \(message) (errno \(code))"
    }
}

/// Runs a call that returns -1 and sets errno on failure: retries EINTR, returns nil on EAGAIN
/// (nothing to do now, not an error) and throws `SystemError` for anything else.
@inline(__always)
public func systemCall<R: BinaryInteger>(_ function: StaticString, operation: @autoclosure () -> String? = nil,
                                         _ body: () -> R) throws(SystemError) -> R? {
    while true {
        let rc = body()
        if rc != -1 { return rc }
        let e = errno
        if e == EINTR { continue }
        if e == EAGAIN || e == EWOULDBLOCK { return nil }
        throw SystemError(code: e, function: "\(function)", operation: operation())
    }
}

/// `systemCall` for calls that must complete: EAGAIN is an error too (blocking descriptors).
@inline(__always)
@discardableResult
public func systemCallRequired<R: BinaryInteger>(_ function: StaticString, operation: @autoclosure () -> String? = nil,
                                                 _ body: () -> R) throws(SystemError) -> R {
    while true {
        let rc = body()
        if rc != -1 { return rc }
        let e = errno
        if e == EINTR { continue }
        throw SystemError(code: e, function: "\(function)", operation: operation())
    }
}
