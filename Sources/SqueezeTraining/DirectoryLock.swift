// One run per checkpoint directory: an exclusive flock on `<directory>/lock`, held for the whole run.

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import SqueezeSystem

/// The lock that makes a run the only writer of its checkpoint directory (`train`, the coordinator;
/// rank 0's process under `join`). Taken before any checkpoint file is read, written or deleted, held
/// until the object goes away (`deinit`) or the process ends, however it ends: the kernel drops a
/// `flock` with the last descriptor, so a killed run never leaves a stale lock behind.
///
/// The lock file, `lock`, holds its holder (host, pid, start time) as one JSON line, written after
/// locking, so that a second run can say who holds the directory. Its name is no checkpoint's, so the
/// resume, prune and "directory holds checkpoints" rules never see it. See docs/checkpoint-format.md.
public final class DirectoryLock {
    public static let fileName = "lock"

    /// Who holds a directory's lock.
    public struct Holder: Codable, Equatable, Sendable, CustomStringConvertible {
        public var host: String
        public var pid: Int32
        public var since: String
        public var description: String { "pid \(pid) on \(host) (since \(since))" }
    }

    public let directory: String
    public let holder: Holder
    private let fd: Int32

    /// Creates `directory` if needed (`CheckpointDirectory.check`: private, ours) and locks it, or throws at once (never waits) naming the run that
    /// holds it. Also throws when the filesystem accepts a lock without honouring it (a second open of
    /// the file can lock it too), since such a lock would protect nothing.
    public init(directory: String) throws {
        self.directory = directory
        let path = DirectoryLock.path(in: directory)
        try CheckpointDirectory.check(directory)  // created 0700 if missing; refused if others may write it
        let fd: Int32
        do { fd = try DirectoryLock.openFile(path, O_RDWR | O_CREAT) } catch {
            throw TrainingError.checkpoint("--checkpoint-dir \(directory): cannot open its lock file: \(error)"
                + (DirectoryLock.holder(in: directory).map { " (it names \($0))" } ?? ""))
        }
        do {
            guard try DirectoryLock.tryLock(fd, LOCK_EX) else {
                throw TrainingError.checkpoint(DirectoryLock.inUse(directory, by: DirectoryLock.holder(in: directory)))
            }
            try DirectoryLock.requireHonoured(path)
            let clock = ISO8601DateFormatter()
            clock.formatOptions.insert(.withFractionalSeconds)  // tells runs apart that reuse a pid
            holder = Holder(host: DirectoryLock.hostName(), pid: getpid(), since: clock.string(from: Date()))
            let line = Array(try JSONEncoder().encode(holder)) + [10]
            try systemCallRequired("ftruncate", operation: "truncate '\(path)'") { ftruncate(fd, 0) }
            guard line.withUnsafeBytes({ pwrite(fd, $0.baseAddress, $0.count, 0) }) == line.count else {
                throw SystemError.last("pwrite", operation: "write the holder into '\(path)'")
            }
            fsync(fd)  // so that a reader on another machine of a network filesystem sees the holder
        } catch let e as SystemError {
            close(fd)
            throw TrainingError.checkpoint("--checkpoint-dir \(directory): cannot lock it (\(e)); "
                + "its filesystem may not support locks (e.g. NFSv3 without lockd): choose a directory on one that does")
        } catch {
            close(fd)
            throw error
        }
        self.fd = fd
    }

    deinit { close(fd) }  // releases the lock

    /// Locks `directory` when there is one, logging a warning where locks may be local to this machine.
    public static func acquire(_ directory: String?, log: (String) -> Void) throws -> DirectoryLock? {
        guard let directory else { return nil }
        let lock = try DirectoryLock(directory: directory)
        if let warning = localOnlyLocks(directory) { log("warning: --checkpoint-dir \(directory): \(warning)") }
        return lock
    }

    /// Throws, naming the holder, if a run holds `directory`'s lock now; creates nothing (a missing
    /// directory or lock file is free). For a launcher that refuses before starting its processes.
    public static func requireFree(_ directory: String) throws {
        let path = path(in: directory)
        guard let fd = try? openFile(path, O_RDONLY) else { return }
        defer { close(fd) }
        if (try? tryLock(fd, LOCK_SH)) == false {
            throw TrainingError.checkpoint(inUse(directory, by: holder(in: directory)))
        }
    }

    /// For the other processes of a run before they write into `directory`: throws unless `expected`
    /// (read when the run started) still holds its lock. Another holder in the file means another run
    /// has taken the directory; on the holder's own host an unlocked file means it has ended. (On
    /// another host only the file is compared: there the lock itself may not be visible.)
    public static func requireHeld(_ directory: String, by expected: Holder) throws {
        let current = holder(in: directory)
        guard current == expected else {
            throw TrainingError.checkpoint("\(directory) is no longer this run's: its lock names \(current.map(\.description) ?? "no holder"), "
                + "this run's coordinator was \(expected)")
        }
        guard expected.host == hostName(), let fd = try? openFile(path(in: directory), O_RDONLY) else { return }
        defer { close(fd) }
        if (try? tryLock(fd, LOCK_SH)) == true {
            throw TrainingError.checkpoint("this run's coordinator (\(expected)) no longer holds \(directory): the run is over")
        }
    }

    /// The holder named in `directory`'s lock file, if it names one.
    public static func holder(in directory: String) -> Holder? {
        guard let data = FileManager.default.contents(atPath: path(in: directory)) else { return nil }
        return try? JSONDecoder().decode(Holder.self, from: data)
    }

    static func path(in directory: String) -> String { (directory as NSString).appendingPathComponent(fileName) }

    private static func inUse(_ directory: String, by holder: Holder?) -> String {
        "--checkpoint-dir \(directory) is in use by another run: \(holder.map(\.description) ?? "a process that has not written its name yet") "
            + "holds \(path(in: directory)). Wait for that run to end or stop it (its lock goes with it), or choose another --checkpoint-dir"
    }

    private static func openFile(_ path: String, _ flags: Int32) throws -> Int32 {
        try systemCallRequired("open", operation: "open '\(path)'") { Glibc.open(path, flags | O_CLOEXEC | O_NOFOLLOW, 0o644) }
    }

    /// Locks `fd` (`LOCK_EX` or `LOCK_SH`) if nobody holds a conflicting lock: false when one does.
    private static func tryLock(_ fd: Int32, _ operation: Int32) throws -> Bool {
        try systemCall("flock") { flock(fd, operation | LOCK_NB) } != nil
    }

    /// Throws if a second open file description of the locked `path` can lock it too: the filesystem
    /// accepts locks without honouring them. (Open for writing: NFS turns an exclusive `flock` into a
    /// POSIX write lock, which needs it.)
    private static func requireHonoured(_ path: String) throws {
        let probe = try openFile(path, O_RDWR)
        defer { close(probe) }
        guard try !tryLock(probe, LOCK_EX) else {
            throw TrainingError.checkpoint("--checkpoint-dir \((path as NSString).deletingLastPathComponent): its filesystem does not honour "
                + "locks (a second open of \(path) could lock it while this run held it), so nothing would keep another run out; "
                + "choose a directory on a local filesystem or on NFS with locking (NFSv4, or NFSv3 with lockd)")
        }
    }

    /// Why locks on `directory` may be seen on this machine only (NFS mounted `nolock` or with
    /// `local_lock`, CIFS with `nobrl`, FUSE), from /proc/self/mountinfo; nil when nothing says so.
    static func localOnlyLocks(_ directory: String) -> String? {
        guard let real = realpath(directory, nil) else { return nil }
        defer { free(real) }
        guard let table = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return nil }
        return localOnlyLocks(path: String(cString: real), mountinfo: table)
    }

    /// `localOnlyLocks` for the absolute, resolved `path` and a mount table in /proc/self/mountinfo's
    /// format (id parent dev root mount-point options [optional…] - type source super-options).
    static func localOnlyLocks(path: String, mountinfo table: String) -> String? {
        var best: (point: String, type: String, options: [String])?
        for line in table.split(separator: "\n") {
            let halves = line.components(separatedBy: " - ")
            let mount = halves[0].split(separator: " "), tail = halves.count > 1 ? halves[1].split(separator: " ") : []
            guard mount.count >= 6, tail.count >= 3 else { continue }
            let point = String(mount[4]).replacingOccurrences(of: "\\040", with: " ")
            guard point == "/" || path == point || path.hasPrefix(point + "/"), point.count >= (best?.point.count ?? 0) else { continue }
            best = (point, String(tail[0]), (mount[5].split(separator: ",") + tail[2].split(separator: ",")).map(String.init))
        }
        guard let (point, type, options) = best else { return nil }
        let local = options.filter { $0 == "nolock" || $0 == "local_lock=flock" || $0 == "local_lock=all" || $0 == "nobrl" }
        let on = "it is on \(type) mounted at \(point)"
        let consequence = "a run on another machine would not see this run's lock; start every run on this directory from one machine"
        if (type.hasPrefix("nfs") || type.hasPrefix("cifs") || type.hasPrefix("smb")) && !local.isEmpty {
            return "\(on) with \(local.joined(separator: ",")), so its locks are kept on this machine only: \(consequence)"
        }
        if type.hasPrefix("fuse") { return "\(on) (FUSE), whose locks may be kept on this machine only: \(consequence)" }
        return nil
    }

    static func hostName() -> String {
        var name = [CChar](repeating: 0, count: 256)
        guard gethostname(&name, name.count - 1) == 0 else { return "?" }
        return String(cString: name)
    }
}
