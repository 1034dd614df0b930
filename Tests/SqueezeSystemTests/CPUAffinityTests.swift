#if os(Linux)
import Foundation
import Testing
@testable import SqueezeSystem

@Suite("CPU affinity")
struct CPUAffinityTests {
    @Test("the allowed CPUs are distinct and ascending, and no more than the machine has")
    func allowed() {
        let cpus = CPUAffinity.allowedCPUs()
        #expect(!cpus.isEmpty)
        #expect(cpus == Array(Set(cpus)).sorted())
        #expect(cpus.count <= ProcessInfo.processInfo.processorCount)
    }

    @Test("binding a thread restricts it (and threads it starts) and leaves other threads alone")
    func bindsOneThread() throws {
        let before = CPUAffinity.allowedCPUs()
        let target = try #require(before.last)
        let seen = ThreadResult()
        let thread = Thread {
            do {
                try CPUAffinity.bindCurrentThread(to: [target])
                let child = Thread { seen.child = CPUAffinity.allowedCPUs(); seen.done.signal() }
                seen.own = CPUAffinity.allowedCPUs()
                child.start()
            } catch { seen.own = []; seen.done.signal() }
        }
        thread.start()
        #expect(seen.done.wait(timeout: .now() + 10) == .success)
        #expect(seen.own == [target])
        #expect(seen.child == [target])
        #expect(CPUAffinity.allowedCPUs() == before)
        #expect(CPUAffinity.cpus(forLocalRank: before.count) == [before[0]])
    }

    @Test("CPU lists parse as taskset writes them; ranks take consecutive CPUs round-robin")
    func lists() throws {
        #expect(try CPUAffinity.parseList("0-3,6") == [0, 1, 2, 3, 6])
        #expect(try CPUAffinity.parseList("2,1,2") == [1, 2])
        for bad in ["", "a", "3-1", "-1", "1-2-3", "0,,1"] {
            let e = #expect(throws: CPUListError.self, "\(bad)") { try CPUAffinity.parseList(bad) }
            #expect(e.map { "\($0)" }?.contains("CPU list \"\(bad)\"") == true)
        }
        let allowed = CPUAffinity.allowedCPUs()
        #expect(CPUAffinity.cpus(forLocalRank: 0) == [allowed[0]])
        #expect(CPUAffinity.cpus(forLocalRank: allowed.count + 1) == [allowed[1 % allowed.count]])
        #expect(CPUAffinity.cpus(forLocalRank: 1, count: allowed.count) == allowed)
    }

    @Test("a CPU that does not exist is refused with its number")
    func refusesBadCPU() {
        let tooHigh = #expect(throws: CPUListError.self) { try CPUAffinity.bindCurrentThread(to: [5_000]) }
        #expect(tooHigh.map { "\($0)" }?.contains("CPU list [5000]") == true)
        let none = #expect(throws: CPUListError.self) { try CPUAffinity.bindCurrentThread(to: []) }
        #expect(none.map { "\($0)" }?.contains("CPU list []") == true)
    }
}

private final class ThreadResult: @unchecked Sendable {
    // Written by the spawned threads before `done` is signalled, read after the wait.
    var own: [Int]? = nil
    var child: [Int]? = nil
    let done = DispatchSemaphore(value: 0)
}
#endif
