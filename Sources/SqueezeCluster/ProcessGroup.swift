#if os(Linux)
import CLinux
#endif
import Foundation

/// One process of a group started by `launch`.
public struct ProcessSpec: Sendable {
    /// Shown in front of every line of its output, e.g. "coordinator" or "worker 1".
    public var name: String
    public var executable: String
    public var arguments: [String]
    public init(name: String, executable: String, arguments: [String]) {
        self.name = name; self.executable = executable; self.arguments = arguments
    }
}

/// Starts processes, prefixes every line they print with `[name]`, and stops them all together:
/// when one fails (non-zero exit or a signal) the others get SIGTERM, then SIGKILL after a grace
/// period, and the failure names the culprit. Like torchrun's local agent.
public final class ProcessGroup: @unchecked Sendable {
    // @unchecked Sendable: `output` writes are serialised by `outputLock`; the rest is used from
    // the thread that calls `start` and `wait` (plus `terminate`, which only sends signals).
    public enum Outcome: Equatable, Sendable, CustomStringConvertible {
        case success
        case failed(culprit: String, description: String)
        case interrupted(Int32)

        public var description: String {
            switch self {
            case .success: "all processes finished"
            case .failed(_, let d): d
            case .interrupted(let s): "stopped by signal \(s)"
            }
        }
        public var exitCode: Int32 {
            switch self {
            case .success: 0
            case .failed: 1
            case .interrupted(let s): 128 + s
            }
        }
    }

    public private(set) var specs: [ProcessSpec]
    private var processes = [Process]()
    private var pipes = [Pipe]()
    private let outputLock = NSLock()
    private let write: @Sendable (String) -> Void
    private let onEvent: @Sendable (String, ClusterEvent) -> Void
    private let stopLock = NSLock()
    private var stopSignal: Int32?
    /// Processes (by name) whose failure does not end the group (an elastic run's workers): it is said, once.
    public var survivable = Set<String>()
    /// How many times a survivable process that failed is replaced by a new one of the same command
    /// line, named "joiner N" (an elastic run's worker, which joins the running run).
    public var replacements = 0
    private var survived = Set<Int>()
    /// One member per pipe until its end of file: `wait` returns only after every line is written.
    private let outputOpen = DispatchGroup()

    /// `write` receives whole prefixed lines (default: standard output); `onEvent` gets the
    /// `ClusterEvent` lines (with the process's name), which are not written.
    public init(_ specs: [ProcessSpec], write: @escaping @Sendable (String) -> Void = { FileHandle.standardOutput.write(Data($0.utf8)) },
                onEvent: @escaping @Sendable (String, ClusterEvent) -> Void = { _, _ in }) {
        self.specs = specs
        self.write = write
        self.onEvent = onEvent
    }

    public func start() throws {
        for spec in specs {
            do { try run(spec) } catch {
                terminateAll(gracePeriod: .seconds(2))
                throw error
            }
        }
    }

    private func run(_ spec: ProcessSpec) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: spec.executable)
        p.arguments = spec.arguments
        let pipe = Pipe()
        p.standardInput = FileHandle.nullDevice  // never stuck reading the terminal
        var environment = ProcessInfo.processInfo.environment
        environment[ProcessGroup.launcherVariable] = String(getpid())  // see `endWithLauncher`
        p.environment = environment
        p.standardOutput = pipe
        p.standardError = pipe
        do { try p.run() } catch { throw ClusterError("cannot start \(spec.name) (\(spec.executable)): \(error)") }
        forwardOutput(pipe, name: spec.name)
        processes.append(p)
    }

    /// Starts a new process with the command line of process `i`, which failed (`replacements`).
    private func replace(_ i: Int) {
        replacements -= 1
        let spec = ProcessSpec(name: "joiner \(specs.filter { $0.name.hasPrefix("joiner ") }.count + 1)",
                               executable: specs[i].executable, arguments: specs[i].arguments)
        do {
            try run(spec)
            specs.append(spec)
            survivable.insert(spec.name)
            emitLine("launch", "started \(spec.name) (pid \(processes[processes.count - 1].processIdentifier)) in place of \(specs[i].name)")
        } catch {
            emitLine("launch", "\(error)")
        }
    }

    /// Set in every child's environment to the launcher's pid: the child calls `endWithLauncher`.
    public static let launcherVariable = "SQUEEZETRAIN_LAUNCHER_PID"

    /// Called first thing by a process that a group may have started (the `coordinator` and `worker`
    /// commands): if `launcherVariable` names its parent, the kernel SIGKILLs it when that parent
    /// ends, however the parent ends (also SIGKILL, which no handler sees); if the parent has already
    /// ended before this call, the process ends now. SIGKILL rather than SIGTERM: with the launcher
    /// gone nobody reads the output and nothing restarts the run, and a graceful stop would write one
    /// more checkpoint after it, into a directory a new run may already own. A checkpoint being
    /// written is lost as a temporary file (writes are atomic); the newest complete one stays. The
    /// signal follows the thread that started the child, so the group is started from the launcher's
    /// main thread, which lives as long as the launcher. Elsewhere than Linux it does nothing.
    public static func endWithLauncher() {
        guard let value = getenv(launcherVariable), let launcher = pid_t(String(cString: value)) else { return }
        unsetenv(launcherVariable)  // not for whatever this process starts
        #if os(Linux)
        if sqz_set_parent_death_signal(SIGKILL) != 0 {
            FileHandle.standardError.write(Data("warning: PR_SET_PDEATHSIG failed (errno \(errno)): this process may outlive its launcher\n".utf8))
        }
        #endif
        if getppid() != launcher { kill(getpid(), SIGKILL) }  // the launcher ended before the line above
    }

    /// The process id of the process named `name`, once started.
    public func pid(of name: String) -> pid_t? {
        specs.firstIndex { $0.name == name }.flatMap { processes.indices.contains($0) ? processes[$0].processIdentifier : nil }
    }

    /// Forwards `signal` to every live process; `wait` then ends with `.interrupted`.
    /// A second call (a second Ctrl-C) kills them at once.
    public func terminate(signal: Int32 = SIGTERM) {
        let again = stopLock.withLock {
            defer { if stopSignal == nil { stopSignal = signal } }
            return stopSignal != nil
        }
        for p in processes where p.isRunning { signalGroup(p, again ? SIGKILL : signal) }
    }

    /// Foundation starts each child as the leader of its own process group (so a terminal's Ctrl-C
    /// reaches only the launcher); signalling the group also reaches anything the child started.
    private func signalGroup(_ p: Process, _ signal: Int32) {
        if kill(-p.processIdentifier, signal) != 0 { kill(p.processIdentifier, signal) }
    }

    /// Waits until the group is finished and every line it printed has been written. When `primary`
    /// (a name) exits 0 the others get `gracePeriod` to finish on their own before they are stopped.
    public func wait(primary: String? = nil, gracePeriod: Duration = .seconds(10)) -> Outcome {
        let outcome = waitForExit(primary: primary, gracePeriod: gracePeriod)
        // Every process is reaped and its process group killed, so the pipes reach end of file
        // unless something escaped the group and holds one open; do not hang on that.
        if outputOpen.wait(timeout: .now() + 5) == .timedOut {
            emitLine("launch", "output of a finished process is still open after 5 s; not waiting for it")
        }
        return outcome
    }

    private func waitForExit(primary: String?, gracePeriod: Duration) -> Outcome {
        while true {
            if let s = stopLock.withLock({ stopSignal }) {
                terminateAll(gracePeriod: gracePeriod)
                return .interrupted(s)
            }
            for (i, p) in processes.enumerated() where !p.isRunning {
                let name = specs[i].name
                let failed = p.terminationReason == .uncaughtSignal || p.terminationStatus != 0
                if failed && p.terminationReason == .uncaughtSignal && p.terminationStatus == SIGINT {
                    // Ctrl-C on a terminal reaches the whole foreground group: an interruption, not a failure.
                    terminateAll(gracePeriod: gracePeriod)
                    return .interrupted(SIGINT)
                }
                if failed && survivable.contains(name) {
                    if survived.insert(i).inserted {
                        emitLine("launch", "\(describeExit(i)); the run goes on without it")
                        if replacements > 0 { replace(i) }
                    }
                    continue
                }
                if failed {
                    // A coordinator usually fails because a worker did: give the others a moment, and
                    // blame a process that failed on its own before blaming the primary.
                    usleep(500_000)
                    let failures = processes.indices.filter { !processes[$0].isRunning && isFailure(processes[$0]) && !survived.contains($0) }
                    let culprit = failures.first { specs[$0].name != primary } ?? i
                    let description = describeExit(culprit)
                    terminateAll(gracePeriod: gracePeriod)
                    return .failed(culprit: specs[culprit].name, description: description)
                }
                if name == primary {
                    let deadline = ContinuousClock.now + gracePeriod
                    while processes.contains(where: \.isRunning) && ContinuousClock.now < deadline { usleep(50_000) }
                    let late = zip(specs, processes).filter { $0.1.isRunning }.map(\.0.name)
                    if !late.isEmpty { emitLine("launch", "stopping \(late.joined(separator: ", ")) after \(name) finished") }
                    terminateAll(gracePeriod: gracePeriod)
                    // A secondary that failed on its own (not by our signal) still fails the group.
                    if let bad = processes.indices.first(where: { !late.contains(specs[$0].name) && isFailure(processes[$0]) && !survived.contains($0) }) {
                        return .failed(culprit: specs[bad].name, description: describeExit(bad))
                    }
                    return .success
                }
            }
            if processes.allSatisfy({ !$0.isRunning }) { return .success }
            usleep(50_000)
        }
    }

    private func isFailure(_ p: Process) -> Bool { p.terminationReason == .uncaughtSignal || p.terminationStatus != 0 }

    private func describeExit(_ i: Int) -> String {
        let p = processes[i]
        let how = p.terminationReason == .uncaughtSignal
            ? "was killed by signal \(p.terminationStatus)\(signalName(p.terminationStatus))"
            : "exited with status \(p.terminationStatus)"
        return "\(specs[i].name) (pid \(p.processIdentifier)) \(how)"
    }

    /// SIGTERM to the live processes, SIGKILL to those still alive after `gracePeriod`; reaps all.
    private func terminateAll(gracePeriod: Duration) {
        for p in processes where p.isRunning { signalGroup(p, SIGTERM) }
        let deadline = ContinuousClock.now + gracePeriod
        while processes.contains(where: \.isRunning) && ContinuousClock.now < deadline { usleep(50_000) }
        for p in processes { signalGroup(p, SIGKILL) }  // also whatever a finished child left behind
        for p in processes { p.waitUntilExit() }
    }

    /// Reads the child's output on a thread of its own until end of file (blocking reads: Foundation's
    /// `readabilityHandler` can miss the end of file on Linux), writing it line by line.
    private func forwardOutput(_ pipe: Pipe, name: String) {
        pipes.append(pipe)  // keeps the descriptor open while the thread reads it
        let fd = pipe.fileHandleForReading.fileDescriptor
        outputOpen.enter()
        Thread.detachNewThread { [self] in
            let pending = LineBuffer()
            var chunk = [UInt8](repeating: 0, count: 1 << 16)
            while true {
                let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                for line in pending.append(Data(chunk[..<n])) { emitLine(name, line) }
            }
            if let rest = pending.flush() { emitLine(name, rest) }  // a last line without newline
            outputOpen.leave()
        }
    }

    private func emitLine(_ name: String, _ line: String) {
        if let event = ClusterEvent(line: line) { return onEvent(name, event) }
        outputLock.withLock { write("[\(name)] \(line)\n") }
    }
}

/// Splits a byte stream into lines (a carriage-return progress bar counts as a line end too).
final class LineBuffer: @unchecked Sendable {
    // @unchecked Sendable: used by one pipe's reader thread.
    private var buffer = Data()

    func append(_ data: Data) -> [String] {
        buffer.append(data)
        var lines = [String]()
        while let end = buffer.firstIndex(where: { $0 == 10 || $0 == 13 }) {
            let line = buffer[buffer.startIndex..<end]
            buffer = Data(buffer[(end + 1)...])
            let text = String(decoding: line, as: UTF8.self).replacingOccurrences(of: "\u{1B}[2K", with: "")
            if !text.isEmpty { lines.append(text) }
        }
        return lines
    }

    func flush() -> String? {
        defer { buffer = Data() }
        return buffer.isEmpty ? nil : String(decoding: buffer, as: UTF8.self)
    }
}

func signalName(_ s: Int32) -> String {
    switch s {
    case SIGKILL: " (SIGKILL)"
    case SIGTERM: " (SIGTERM)"
    case SIGINT: " (SIGINT)"
    case SIGSEGV: " (SIGSEGV)"
    case SIGABRT: " (SIGABRT)"
    case SIGBUS: " (SIGBUS)"
    case SIGILL: " (SIGILL)"
    default: ""
    }
}
