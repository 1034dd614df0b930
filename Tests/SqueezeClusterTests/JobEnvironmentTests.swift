import Foundation
@testable import SqueezeCluster
import SqueezeCollectives
import SqueezeTransport
import Testing

@Suite struct JobEnvironmentTests {
    func error(_ env: [String: String], _ overrides: JobEnvironment.Overrides = .init()) -> String {
        do {
            let found = try JobEnvironment.detect(env, overrides: overrides)
            return "no error: \(found)"
        } catch {
            return String(describing: error)
        }
    }

    @Test func torchrunAndPyTorchJob() throws {
        let env = ["RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "trainer-0.svc", "MASTER_PORT": "23456"]
        let found = try JobEnvironment.detect(env)
        #expect(found == JobEnvironment(source: .torchrun, rank: 2, worldSize: 4, localRank: 0, localWorldSize: 1,
                                        coordinatorHost: "trainer-0.svc", coordinatorPort: 23456))
        // No MASTER_PORT: torchrun's default.
        #expect(try JobEnvironment.detect(env.filter { $0.key != "MASTER_PORT" }).coordinatorPort == 29500)
        // Flags override.
        let o = try JobEnvironment.detect(env, overrides: .init(rank: 3, masterAddr: "10.0.0.1", masterPort: 1234))
        #expect(o.rank == 3 && o.coordinatorHost == "10.0.0.1" && o.coordinatorPort == 1234 && o.worldSize == 4)
    }

    /// Under torchrun itself its agent's store holds MASTER_PORT: join takes MASTER_PORT + 2, says so,
    /// and reads the restart count; --master-port still overrides. By hand (no TORCHELASTIC_*), MASTER_PORT.
    @Test func underTorchrunTheCoordinatorTakesMasterPortPlusTwo() throws {
        let env = ["RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
                   "TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_RUN_ID": "none"]
        let found = try JobEnvironment.detect(env)
        #expect(found.coordinatorPort == 29502 && found.storePort == 29500)
        #expect(found.elastic == .init(restartCount: 2, maxRestarts: 3, runID: "none"))
        #expect(found.description == "torchrun: rank 1 of 2 (local rank 1 of 2), coordinator 127.0.0.1:29502 (MASTER_PORT + 2: torchrun's own store is on 29500)")
        // Any TORCHELASTIC_* variable says torchrun; the count defaults to a first start.
        let first = try JobEnvironment.detect(env.filter { !$0.key.hasPrefix("TORCHELASTIC_") }.merging(["TORCHELASTIC_RUN_ID": "job7"]) { $1 })
        #expect(first.coordinatorPort == 29502 && first.elastic == .init(restartCount: 0, runID: "job7"))
        // The flag overrides the rule, and the start line no longer mentions it.
        let flag = try JobEnvironment.detect(env, overrides: .init(masterPort: 6000))
        #expect(flag.coordinatorPort == 6000 && flag.storePort == nil && !flag.description.contains("MASTER_PORT + 2"))
        // By hand, and under SLURM or Open MPI, TORCHELASTIC_* is not set: MASTER_PORT itself.
        #expect(try JobEnvironment.detect(env.filter { !$0.key.hasPrefix("TORCHELASTIC_") }).coordinatorPort == 29500)
        #expect(try JobEnvironment.detect(env.merging(["TORCHELASTIC_RESTART_COUNT": ""]) { $1 }).elastic?.restartCount == 0)
        #expect(error(env.merging(["MASTER_PORT": "65534"]) { $1 }).contains("MASTER_PORT=65534: under torchrun join listens on MASTER_PORT + 2"))
        #expect(try JobEnvironment.detect(env.merging(["MASTER_PORT": "65533"]) { $1 }).coordinatorPort == 65535)
        #expect(try JobEnvironment.detect(env.merging(["MASTER_PORT": "65535"]) { $1 }, overrides: .init(masterPort: 5000)).coordinatorPort == 5000)
        #expect(error(env.merging(["TORCHELASTIC_RESTART_COUNT": "x"]) { $1 }).contains("TORCHELASTIC_RESTART_COUNT=x is not a non-negative integer"))
    }

    /// The port check rank 0 makes before binding: a listener is named with its process (this one).
    @Test func aTakenPortIsRefusedNamingItsOwner() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        try #require(fd >= 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = INADDR_ANY
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let listening = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && listen(fd, 1) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        try #require(listening)
        let port = Int(UInt16(bigEndian: address.sin_port))
        let refusal = try #require(tcpPortRefusal(port))
        #expect(refusal.contains("port \(port) is already taken") && refusal.contains("pid \(getpid()) (") && refusal.contains(") listens on it"), "\(refusal)")
        #expect(tcpListener(port: port)?.hasPrefix("pid \(getpid()) ") == true)
        // The coordinator's own bind (`squeezetrain coordinator --bind`, or a port taken after join's check) says it too.
        let context = try ZMQContext()
        defer { context.terminate() }
        do {
            let server = try ZMQControlServer(context: context, bind: "tcp://0.0.0.0:\(port)", security: .insecure)
            server.close()
            Issue.record("bound a taken port")
        } catch {
            #expect("\(error)".contains("cannot bind the coordinator to tcp://0.0.0.0:\(port)") && "\(error)".contains("; port \(port) is held by pid \(getpid()) ("),
                    "\(error)")
        }
        close(fd)
        #expect(tcpPortRefusal(port) == nil, "free again once closed")
        #expect(tcpListener(port: port) == nil)
    }

    @Test func slurmTakesTheFirstHostOfTheNodeList() throws {
        let env = ["SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "2(x4)",
                   "SLURM_JOB_NODELIST": "node[07-10],gpu1"]
        let found = try JobEnvironment.detect(env)
        #expect(found == JobEnvironment(source: .slurm, rank: 5, worldSize: 8, localRank: 1, localWorldSize: 2,
                                        coordinatorHost: "node07", coordinatorPort: 29500))
        // MASTER_ADDR, when set, names the host instead.
        #expect(try JobEnvironment.detect(env.merging(["MASTER_ADDR": "login1", "MASTER_PORT": "6000"]) { $1 }).coordinatorHost == "login1")
    }

    @Test func openMPIWithPMIx() throws {
        let env = ["OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                   "OMPI_COMM_WORLD_LOCAL_SIZE": "3", "PMIX_RANK": "1", "MASTER_ADDR": "127.0.0.1"]
        #expect(try JobEnvironment.detect(env) == JobEnvironment(source: .openMPI, rank: 1, worldSize: 3, localRank: 1, localWorldSize: 3,
                                                                  coordinatorHost: "127.0.0.1", coordinatorPort: 29500))
        // mpirun inside a SLURM allocation: every rank inherits the batch step's SLURM_PROCID; Open MPI's rank wins.
        let inAllocation = env.merging(["SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"]) { $1 }
        #expect(try JobEnvironment.detect(inAllocation).source == .openMPI)
        #expect(error(env.merging(["PMIX_RANK": "2"]) { $1 }).contains("OMPI_COMM_WORLD_RANK=1 and PMIX_RANK=2 contradict"))
        #expect(error(env.filter { $0.key != "MASTER_ADDR" }).contains("MASTER_ADDR"))
        // The host can come from the flag instead.
        #expect(try JobEnvironment.detect(env.filter { $0.key != "MASTER_ADDR" }, overrides: .init(masterAddr: "h0")).coordinatorHost == "h0")
    }

    @Test func incompleteOrContradictoryEnvironmentsNameTheVariables() {
        #expect(error([:]).contains("no launcher environment found"))
        #expect(error(["RANK": "0"]).contains("RANK is set but WORLD_SIZE is not"))
        #expect(error(["RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h"]).contains("RANK=x is not a non-negative integer"))
        #expect(error(["RANK": "-1", "WORLD_SIZE": "2", "MASTER_ADDR": "h"]).contains("RANK=-1"))
        #expect(error(["RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h"]).contains("rank 2, not in 0..<2"))
        #expect(error(["RANK": "0", "WORLD_SIZE": "0", "MASTER_ADDR": "h"]).contains("world size of 0"))
        #expect(error(["RANK": "0", "WORLD_SIZE": "99999999999999999999", "MASTER_ADDR": "h"]).contains("WORLD_SIZE=99999999999999999999"))
        #expect(error(["RANK": "0", "WORLD_SIZE": "2000", "MASTER_ADDR": "h"]).contains("1...1024"))
        #expect(error(["RANK": "0", "WORLD_SIZE": "2"]).contains("no usable coordinator host"))
        #expect(error(["RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"]).contains("MASTER_PORT=70000"))
        #expect(error(["RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"]).contains("local rank 3"))
        #expect(error(["SLURM_PROCID": "0"]).contains("SLURM_PROCID is set but SLURM_NTASKS is not"))
        #expect(error(["SLURM_PROCID": "0", "SLURM_NTASKS": "2"]).contains("neither SLURM_JOB_NODELIST nor MASTER_ADDR"))
        #expect(error(["SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[3-1]"]).contains("SLURM_JOB_NODELIST"))
        #expect(error(["OMPI_COMM_WORLD_RANK": "0", "MASTER_ADDR": "h"]).contains("OMPI_COMM_WORLD_SIZE is not"))
        #expect(error(["RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"], .init(worldSize: 5000)).contains("with the flags applied"))
    }

    @Test func flagsAloneDescribeAJob() throws {
        let found = try JobEnvironment.detect([:], overrides: .init(rank: 1, worldSize: 2, masterAddr: "h", masterPort: 5000))
        #expect(found.source == .flags && found.rank == 1 && found.worldSize == 2 && found.coordinatorHost == "h")
    }

    @Test func slurmHostLists() throws {
        #expect(try expandHostList("node[01-04,07]") == ["node01", "node02", "node03", "node04", "node07"])
        #expect(try expandHostList("a,b[8-10],c") == ["a", "b8", "b9", "b10", "c"])
        #expect(try expandHostList("rack[1-2]-n[1-2]") == ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"])
        #expect(try expandHostList("n[098-101]") == ["n098", "n099", "n100", "n101"])
        #expect(try expandHostList("single") == ["single"])
        #expect(try expandHostList("huge[0-999999999]", limit: 1) == ["huge0"])
        #expect(try expandHostList("n[1-5]", limit: 3) == ["n1", "n2", "n3"])
        for bad in ["n[1-2", "n1-2]", "n[[1]]", "n[]", "n[a-b]", "n[5-3]", "a,,b", "", "n[1-]", "n[-1]", "n[1-2-3]"] {
            #expect(throws: (any Error).self, "\(bad)") { try expandHostList(bad) }
        }
    }

    @Test func launchersNestedInOneAnother() throws {
        // torchrun (or a PyTorchJob) inside a SLURM allocation: torchrun's own ranks win.
        let torchrun = ["RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"]
        #expect(try JobEnvironment.detect(torchrun).source == .torchrun)
        // PMIx alone (Open MPI 5's mpirun, or srun --mpi=pmix without Open MPI's variables).
        let pmix = try JobEnvironment.detect(["PMIX_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "MASTER_ADDR": "h"])
        #expect(pmix.source == .openMPI && pmix.rank == 2 && pmix.worldSize == 4 && pmix.localRank == 0)
        // srun --mpi=pmix sets PMIX_RANK beside SLURM's variables: SLURM describes the job then.
        let srun = try JobEnvironment.detect(["PMIX_RANK": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]"])
        #expect(srun.source == .slurm && srun.rank == 1 && srun.coordinatorHost == "n1")
    }

    @Test func slurmFallbacks() throws {
        // Older SLURMs: SLURM_NPROCS and SLURM_NODELIST; uneven tasks per node: the first node's count.
        let found = try JobEnvironment.detect(["SLURM_PROCID": "0", "SLURM_NPROCS": "7", "SLURM_NODELIST": "a[3-4],b",
                                               "SLURM_TASKS_PER_NODE": "2(x3),1"])
        #expect(found == JobEnvironment(source: .slurm, rank: 0, worldSize: 7, localRank: 0, localWorldSize: 2,
                                        coordinatorHost: "a3", coordinatorPort: 29500))
        #expect(error(["SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1", "SLURM_LOCALID": "x"]).contains("SLURM_LOCALID=x"))
        #expect(error(["SLURM_PROCID": "3", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"]).contains("rank 3, not in 0..<2"))
    }

    @Test func flagsWithoutAHostNameTheMissingPiece() {
        #expect(error([:], .init(rank: 0, worldSize: 2)).contains("MASTER_ADDR is not, and no --master-addr was given"))
        #expect(error([:], .init(rank: 0)).contains("no launcher environment found"))
    }

    @Test func threadsDefaultToThisProcesssShareOfTheCPUs() throws {
        func job(local: Int?) -> JobEnvironment {
            JobEnvironment(source: .slurm, rank: 0, worldSize: 8, localRank: 0, localWorldSize: local, coordinatorHost: "h", coordinatorPort: 1)
        }
        #expect(job(local: 4).threadShare(allowedCPUs: 16).threads == 4)
        #expect(job(local: 3).threadShare(allowedCPUs: 8).threads == 2)
        #expect(job(local: 3).threadShare(allowedCPUs: 2).threads == 1, "never below one thread")
        #expect(job(local: nil).threadShare(allowedCPUs: 6).threads == 6, "unknown: one process per host")
        // SLURM with --cpus-per-task: what it reserved (its task/affinity plugin may already have
        // narrowed the allowed CPUs to exactly those), never more than the allowed CPUs.
        var slurm = job(local: 4)
        slurm.cpusPerProcess = 8
        #expect(slurm.threadShare(allowedCPUs: 8).threads == 8)
        #expect(slurm.threadShare(allowedCPUs: 32).threads == 8)
        #expect(slurm.threadShare(allowedCPUs: 2).threads == 2)
        let env = ["SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1", "SLURM_CPUS_PER_TASK": "6"]
        #expect(try JobEnvironment.detect(env).cpusPerProcess == 6)
    }

    @Test func whetherAHostIsThisMachine() {
        #expect(isThisHost("127.0.0.1") == true)
        #expect(isThisHost("localhost") == true)
        #expect(isThisHost(ProcessInfo.processInfo.hostName) == true)
        #expect(isThisHost("192.0.2.1") == false, "TEST-NET-1 is nobody's address")
        #expect(isThisHost("no-such-host.invalid") == nil)
    }
}
