// Binding processes to cores, as MPI launchers do (`mpirun --bind-to core`): when several
// ranks share a few cores, keeping each rank's threads (its own and libzmq's I/O thread) on one
// core saves migrations and keeps the message it just received in that core's cache.

#if os(Linux)
import CLinux
import Glibc

public enum CPUAffinity {
    private static let words = 16  // 1,024 CPUs

    /// The CPUs the calling thread may run on, ascending (respects taskset and cgroup cpusets).
    public static func allowedCPUs() -> [Int] {
        var mask = [UInt](repeating: 0, count: words)
        let n = mask.withUnsafeMutableBufferPointer { sqz_sched_getaffinity(UInt(words * MemoryLayout<UInt>.size), $0.baseAddress) }
        guard n > 0 else { return [] }
        let bits = UInt.bitWidth
        return (0..<(words * bits)).filter { mask[$0 / bits] & (1 << UInt($0 % bits)) != 0 }
    }

    /// Restricts the calling thread, and every thread it starts afterwards, to `cpus`. Throws
    /// `CPUListError` for an empty list or an impossible CPU number, `SystemError` when the system refuses.
    public static func bindCurrentThread(to cpus: [Int]) throws {
        let bits = UInt.bitWidth
        guard !cpus.isEmpty, cpus.allSatisfy({ (0..<(words * bits)).contains($0) }) else {
            throw CPUListError("CPU list \(cpus) is empty or names a CPU outside 0..<\(words * bits)")
        }
        var mask = [UInt](repeating: 0, count: words)
        for c in cpus { mask[c / bits] |= 1 << UInt(c % bits) }
        // An argument error is a `CPUListError` (above); the kernel refusing (EINVAL
        // for CPUs outside the cpuset, EPERM) is a `SystemError` with its errno.
        _ = try mask.withUnsafeBufferPointer { m throws(SystemError) in
            try systemCallRequired("sched_setaffinity", operation: "bind to CPU(s) \(cpus)") {
                sqz_sched_setaffinity(UInt(words * MemoryLayout<UInt>.size), m.baseAddress)
            }
        }
    }

    /// The `count` CPUs of local rank `rank` when ranks take consecutive CPUs, round-robin over
    /// the allowed ones (rank r of T threads each gets allowed[(r·T + i) mod n], i < T).
    public static func cpus(forLocalRank rank: Int, count: Int = 1) -> [Int] {
        let allowed = allowedCPUs(), t = max(count, 1)
        guard !allowed.isEmpty else { return [] }
        return Set((0..<t).map { allowed[(rank * t + $0) % allowed.count] }).sorted()
    }

    /// Parses a CPU list as taskset writes it: "0-3,6" is [0, 1, 2, 3, 6].
    public static func parseList(_ text: String) throws -> [Int] {
        var cpus = Set<Int>()
        for part in text.split(separator: ",", omittingEmptySubsequences: false) {
            let ends = part.split(separator: "-", omittingEmptySubsequences: false).map { Int($0) }
            guard let first = ends.first ?? nil, first >= 0, ends.count <= 2, let last = ends.last ?? nil, last >= first else {
                throw CPUListError("CPU list \"\(text)\": \"\(part)\" is not a CPU number or a range like 0-3")
            }
            cpus.formUnion(first...last)
        }
        return cpus.sorted()
    }
}

/// A CPU list that names no CPU, or one that cannot exist, or that does not parse.
public struct CPUListError: Error, CustomStringConvertible, Sendable {
    public let description: String
    init(_ description: String) { self.description = description }
}
#endif
