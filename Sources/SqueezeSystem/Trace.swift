// A timeline of a run, as Horovod's: Chrome trace-event JSON (Perfetto, chrome://tracing).

import Foundation

/// A thread of a process's track in the timeline (the trace's `tid`).
public enum TraceTrack: Int, Sendable, CaseIterable {
    /// The training thread: data waits, forward and backward per layer, the wait for the all-reduce,
    /// the optimizer step, checkpoints.
    case compute = 1
    /// The communication thread: each bucket's all-reduce, its sends, receives and reduces.
    case allReduce = 2

    public var name: String { self == .compute ? "compute" : "all-reduce" }
}

/// Integer arguments of a trace event (step, bucket, bytes), kept in order.
public typealias TraceArgs = KeyValuePairs<String, Int>

/// Which steps a trace records: `N`, the N steps after the process's first (warm-up) step, or
/// `A:B`, steps A to B − 1 as numbered in the metrics (`step`, from 0). At most `maxSteps` steps,
/// which bounds the trace's memory and size.
public struct TraceWindow: Sendable, Equatable, CustomStringConvertible {
    public static let maxSteps = 1000
    /// nil: relative to the first step the process runs.
    public let range: Range<Int>?
    public let count: Int

    public init(parsing text: String) throws(TraceError) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        let numbers = parts.map { Int($0) }
        switch (parts.count, numbers.first ?? nil, numbers.last ?? nil) {
        case (1, let n?, _) where (1...Self.maxSteps).contains(n):
            range = nil; count = n
        case (2, let a?, let b?) where a >= 0 && b > a && b - a <= Self.maxSteps:
            range = a..<b; count = b - a
        default:
            throw TraceError("--trace-steps must be N (the N steps after the first, 1...\(Self.maxSteps)) or A:B "
                             + "(steps A to B-1 as the metrics number them, A < B, at most \(Self.maxSteps) steps), not '\(text)'")
        }
    }

    /// The steps recorded by a process whose first step is `first`.
    public func steps(first: Int) -> Range<Int> { range ?? (first + 1)..<(first + 1 + count) }

    public var description: String { range.map { "\($0.lowerBound):\($0.upperBound)" } ?? "\(count)" }
}

/// Coded as its text form (`--trace-steps`).
extension TraceWindow: Codable {
    public init(from decoder: any Decoder) throws { try self.init(parsing: try decoder.singleValueContainer().decode(String.self)) }
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

public struct TraceError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// One process's timeline: complete events (`ph: X`) on its track (`pid`), recorded only during the
/// steps of its `TraceWindow`. Code that may be traced holds a `Tracer?`; untraced, it costs a nil
/// check (`traced`). Thread-safe: the compute and the communication thread record into it.
///
/// Timestamps are whole microseconds since the Unix epoch: CLOCK_MONOTONIC, shifted once at creation by
/// CLOCK_REALTIME − CLOCK_MONOTONIC. Within a process they are monotonic; across processes they
/// agree as well as the machines' wall clocks do (on one machine exactly, up to the microsecond
/// between the two clock readings; across machines, their NTP skew, typically well under a millisecond).
public final class Tracer: @unchecked Sendable {
    // @unchecked Sendable: every mutable field is guarded by `lock`.
    public let path: String
    public let pid: Int
    public let window: TraceWindow
    private let processName: String
    private let offsetNanos: Int64
    private let lock = NSLock()
    private var events = [TraceEvent]()
    private var steps: Range<Int>?
    private var recording = false
    private var unwritten = true

    /// A trace of process `pid` (the rank; the star hub: the number of workers), named `processName`, written to `path`.
    public init(path: String, pid: Int, processName: String, window: TraceWindow) {
        self.path = path; self.pid = pid; self.processName = processName; self.window = window
        offsetNanos = Int64(clockNanos(CLOCK_REALTIME)) - Int64(clockNanos(CLOCK_MONOTONIC))
    }

    /// Step `step` begins: recording is on while it is in the window (fixed by the first call).
    /// Once the window has passed, the trace is written (and again by `write()` at the end).
    public func beginStep(_ step: Int) {
        let passed = lock.withLock {
            let steps = self.steps ?? window.steps(first: step)
            self.steps = steps
            recording = steps.contains(step)
            return step >= steps.upperBound && unwritten
        }
        if passed { try? write() }
    }

    /// Stops recording (the run ended, or left the window).
    public func endRecording() { lock.withLock { recording = false } }

    /// Now, if recording: the start of an event to pass to `end`.
    public func begin() -> UInt64? {
        lock.withLock { recording } ? clockNanos(CLOCK_MONOTONIC) : nil
    }

    /// Records the event that began at `start` (from `begin`) and ends now.
    public func end(_ start: UInt64, _ track: TraceTrack, _ category: String, _ name: String, _ args: TraceArgs = [:]) {
        let now = clockNanos(CLOCK_MONOTONIC)
        let (from, to) = (microseconds(start), microseconds(now))
        let event = TraceEvent(name: name, cat: category, ph: "X", ts: from, dur: to - from,
                               pid: pid, tid: track.rawValue, args: Dictionary(uniqueKeysWithValues: args.map { ($0, .int($1)) }))
        lock.withLock { events.append(event); unwritten = true }
    }

    /// Whole microseconds (rounded down), so that an event inside another ends inside it in the file too.
    private func microseconds(_ monotonic: UInt64) -> Int { Int((Int64(monotonic) + offsetNanos) / 1000) }

    /// The process's and threads' names, then the events so far.
    public var traceEvents: [TraceEvent] {
        let names = [TraceEvent.metadata("process_name", pid: pid, tid: 0, name: processName),
                     TraceEvent.metadata("process_sort_index", pid: pid, tid: 0, index: pid)]
            + TraceTrack.allCases.map { TraceEvent.metadata("thread_name", pid: pid, tid: $0.rawValue, name: $0.name) }
        return names + lock.withLock { events }
    }

    /// Writes what is recorded so far to `path` (atomically: a reader never sees half a trace).
    public func write() throws {
        lock.withLock { unwritten = false }
        try TraceFile.write(traceEvents, to: path)
    }
}

/// Marks `body` as an event of `tracer`'s timeline (when recording); without a tracer, just runs it.
@inlinable
public func traced<R>(_ tracer: Tracer?, _ track: TraceTrack, _ category: String, _ name: @autoclosure () -> String,
                      _ args: @autoclosure () -> TraceArgs = [:], _ body: () throws -> R) rethrows -> R {
    guard let tracer, let start = tracer.begin() else { return try body() }
    defer { tracer.end(start, track, category, name(), args()) }
    return try body()
}

/// One trace event (Chrome trace-event format): a complete event (`ph: X`, `ts` and `dur` in
/// microseconds) or a metadata event (`ph: M`) naming a process or thread.
public struct TraceEvent: Codable, Sendable, Equatable {
    public enum Arg: Codable, Sendable, Equatable {
        case int(Int), string(String)
        public init(from decoder: Decoder) throws {
            let c = try decoder.singleValueContainer()
            if let i = try? c.decode(Int.self) { self = .int(i) } else { self = .string(try c.decode(String.self)) }
        }
        public func encode(to encoder: Encoder) throws {
            var c = encoder.singleValueContainer()
            switch self {
            case .int(let i): try c.encode(i)
            case .string(let s): try c.encode(s)
            }
        }
    }

    public var name: String, cat: String?, ph: String
    /// Microseconds (see `Tracer` for the clock).
    public var ts: Int?, dur: Int?
    public var pid: Int, tid: Int
    public var args: [String: Arg]?

    static func metadata(_ kind: String, pid: Int, tid: Int, name: String? = nil, index: Int? = nil) -> TraceEvent {
        TraceEvent(name: kind, cat: nil, ph: "M", ts: nil, dur: nil, pid: pid, tid: tid,
                   args: name.map { ["name": .string($0)] } ?? ["sort_index": .int(index ?? 0)])
    }
}

/// Trace files: `{"traceEvents": [...], "displayTimeUnit": "ms"}`, one event per line.
public enum TraceFile {
    /// Writes `events` to `path` atomically (`AtomicFile`).
    public static func write(_ events: [TraceEvent], to path: String) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        var text = "{\"displayTimeUnit\": \"ms\", \"otherData\": {\"clock\": \"CLOCK_MONOTONIC shifted to Unix-epoch microseconds at process start\"},\n\"traceEvents\": [\n"
        for (i, e) in events.enumerated() {
            text += String(decoding: try encoder.encode(e), as: UTF8.self) + (i == events.count - 1 ? "\n" : ",\n")
        }
        text += "]}\n"
        try AtomicFile.write(to: path) { try $0.write(Array(text.utf8)) }
    }

    /// The events of the trace file at `path`.
    public static func read(_ path: String) throws -> [TraceEvent] {
        struct File: Decodable { var traceEvents: [TraceEvent] }
        do {
            return try JSONDecoder().decode(File.self, from: Data(contentsOf: URL(fileURLWithPath: path))).traceEvents
        } catch {
            throw TraceError("\(path) is not a readable trace (\(error))")
        }
    }

    /// Checks up front that `path` can be written: its directory exists and is writable, and it is not a directory.
    public static func checkWritable(_ path: String) throws(TraceError) {
        let directory = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), isDirectory.boolValue {
            throw TraceError("--trace \(path) is a directory; give a file name")
        }
        guard FileManager.default.fileExists(atPath: directory.isEmpty ? "/" : directory, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw TraceError("--trace \(path) cannot be written: the directory \(directory) does not exist")
        }
        guard access(directory.isEmpty ? "/" : directory, W_OK) == 0 else {
            throw TraceError("--trace \(path) cannot be written: the directory \(directory) is not writable (\(String(cString: strerror(errno))))")
        }
    }
}

private func clockNanos(_ clock: clockid_t) -> UInt64 {
    var t = timespec()
    clock_gettime(clock, &t)
    return UInt64(t.tv_sec) * 1_000_000_000 + UInt64(t.tv_nsec)
}
