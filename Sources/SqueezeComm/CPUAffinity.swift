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

    /// Restricts the calling thread, and every thread it starts afterwards, to `cpus`.
    public static func bindCurrentThread(to cpus: [Int]) throws {
        let bits = UInt.bitWidth
        guard !cpus.isEmpty, cpus.allSatisfy({ (0..<(words * bits)).contains($0) }) else {
            throw CommError.invalidArgument("CPU list \(cpus) is empty or names a CPU outside 0..<\(words * bits)")
        }
        var mask = [UInt](repeating: 0, count: words)
        for c in cpus { mask[c / bits] |= 1 << UInt(c % bits) }
        let r = mask.withUnsafeBufferPointer { sqz_sched_setaffinity(UInt(words * MemoryLayout<UInt>.size), $0.baseAddress) }
        guard r == 0 else {
            throw CommError.invalidArgument("cannot bind to CPU(s) \(cpus): \(String(cString: strerror(errno)))")
        }
    }

    /// The CPU of local rank `rank` when ranks are spread round-robin over the allowed CPUs.
    public static func cpu(forLocalRank rank: Int) -> Int? {
        let cpus = allowedCPUs()
        return cpus.isEmpty ? nil : cpus[rank % cpus.count]
    }
}
#endif
