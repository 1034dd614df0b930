import ArgumentParser
import Foundation
import SqueezeTransport
import SqueezeSystem
import SqueezeTraining

/// `--key-file` and `--insecure`, for every process that opens cluster sockets.
struct SecurityOptions: ParsableArguments {
    @Option(help: ArgumentHelp("The run's key (from squeezetrain keygen): every socket is authenticated and encrypted with it (ZeroMQ CURVE); "
                               + "processes without it cannot connect. Default: $SQUEEZETRAIN_KEY_FILE.", valueName: "file"))
    var keyFile: String?
    @Flag(help: "No authentication, no encryption: anyone who can reach a port can join the run, read and forge its gradients and stop it. Only on a network nobody else can reach.")
    var insecure = false

    func validate() throws {
        if insecure && keyFile != nil { throw ValidationError("--insecure and --key-file contradict each other: choose one") }
    }

    /// The key file: the flag, else $SQUEEZETRAIN_KEY_FILE.
    var keyPath: String? { keyFile ?? ProcessInfo.processInfo.environment["SQUEEZETRAIN_KEY_FILE"].flatMap { $0.isEmpty ? nil : $0 } }

    /// The sockets' security: the key's, or plain with `--insecure`. Without either, only a run whose every
    /// socket is an ipc socket in this user's private directory (`privateSocketDirectory()`) may go on:
    /// `endpoint` (the control socket) must be one, and so must the data plane, `transport` (the
    /// coordinator's `--transport`; a worker's data plane refuses tcp when it learns it). Anything else
    /// is refused, naming the socket.
    func security(endpoint: String, transport: String? = nil) throws -> PeerSecurity {
        if insecure { return .insecure }
        if let path = keyPath { return .curve(try RunKey.read(from: path)) }
        if !endpoint.hasPrefix("ipc://") {
            throw ValidationError("\(endpoint) is a network endpoint, and this run has no key: give every process the same --key-file FILE "
                                  + "(make one with squeezetrain keygen --output FILE), or --insecure to let anyone who reaches the port join the run")
        }
        if let problem = privateIPCProblem(endpoint) { throw ValidationError(privateIPCRefusal("the control socket \(endpoint) \(problem)")) }
        if let transport, transport != "ipc" {
            throw ValidationError(privateIPCRefusal("the data plane (--transport \(transport)) would listen in plain text on \(transport)"))
        }
        return .privateIPC
    }

    /// The flags for a child process.
    var arguments: [String] { insecure ? ["--insecure"] : keyPath.map { ["--key-file", absolutePath($0)] } ?? [] }
}

/// Starts the context's ZAP handler for `security`; refused connections are logged at a bounded rate.
func authenticate(_ context: ZMQContext, _ security: PeerSecurity) throws {
    // A ZAP handler that stops leaves the process unable to admit its own peers: stop, saying why.
    try context.authenticate(security, log: { emit("\($0)\n") }, onFailure: {
        FileHandleOutput.standardError("squeezetrain: error: \($0)\n")
        exit(1)
    })
    if security == .insecure { emit("warning: --insecure: no authentication, no encryption; anyone who reaches these ports can join this run\n") }
}

struct Keygen: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a new run key: every process of a run needs it (--key-file) and nobody else may read it.",
        discussion: "The file is created with mode 0600 and never overwrites an existing file. Put it on the filesystem every process reads (or in a Kubernetes Secret).")

    @Option(help: "Where to write the key.") var output: String

    func run() throws {
        do {
            try RunKey.generate().write(to: output)
            emit("wrote a new run key to \(output) (mode 0600)\n")
        } catch {
            throw fail(String(describing: error))
        }
    }
}

/// A fresh key for one `launch` or benchmark run, in a private temporary directory removed at the end.
final class EphemeralKey {
    let directory: String, path: String

    init() throws {
        do { directory = try makePrivateDirectory(prefix: "squeezetrain-key-") } catch {
            throw ValidationError("cannot create a private directory for the run key: \(error)")
        }
        path = directory + "/run.key"
        try RunKey.generate().write(to: path)
    }

    func remove() {
        unlink(path)
        rmdir(directory)
    }
}
