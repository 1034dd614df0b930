import ArgumentParser
import Foundation
import SqueezeComm
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

    /// The sockets' security. Over tcp a key is required unless `--insecure` says otherwise; a local
    /// ipc:// control endpoint may go without (its file lives in a private directory).
    func security(endpoint: String) throws -> PeerSecurity {
        if insecure { return .insecure }
        if let path = keyPath { return .curve(try RunKey.read(from: path)) }
        if endpoint.hasPrefix("ipc://") { return .insecure }
        throw ValidationError("\(endpoint) is a network endpoint, and this run has no key: give every process the same --key-file FILE "
                              + "(make one with squeezetrain keygen --output FILE), or --insecure to let anyone who reaches the port join the run")
    }

    /// The flags for a child process.
    var arguments: [String] { insecure ? ["--insecure"] : keyPath.map { ["--key-file", absolutePath($0)] } ?? [] }
}

/// Starts the context's ZAP handler for `security`; refused connections are logged at a bounded rate.
func authenticate(_ context: ZMQContext, _ security: PeerSecurity) throws {
    try context.authenticate(security) { emit("\($0)\n") }
    if !security.isEncrypted { emit("warning: --insecure: no authentication, no encryption; anyone who reaches these ports can join this run\n") }
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
        directory = NSTemporaryDirectory() + "squeezetrain-key-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        guard mkdir(directory, 0o700) == 0 else {
            throw ValidationError("cannot create \(directory) for the run key: \(String(cString: strerror(errno)))")
        }
        path = directory + "/run.key"
        try RunKey.generate().write(to: path)
    }

    func remove() {
        unlink(path)
        rmdir(directory)
    }
}
