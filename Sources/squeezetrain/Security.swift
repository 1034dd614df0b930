import ArgumentParser
import Foundation
import SqueezeCluster
import SqueezeCollectives
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

    /// Who may connect (the key file made absolute, for processes in other directories).
    var access: PeerAccess { PeerAccess(keyFile: keyPath.map(absolutePath), insecure: insecure) }
}

struct Keygen: ReportingCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a new run key: every process of a run needs it (--key-file) and nobody else may read it.",
        discussion: "The file is created with mode 0600 and never overwrites an existing file. Put it on the filesystem every process reads (or in a Kubernetes Secret).")

    @Option(help: "Where to write the key.") var output: String

    func execute() throws {
        try RunKey.generate().write(to: output)
        emit("wrote a new run key to \(output) (mode 0600)\n")
    }
}

/// A private directory (mode 0700) for one `launch` or benchmark run, removed at the end: its
/// processes' configuration files and, when the user gave no key, a fresh run key.
final class RunDirectory {
    let path: String

    init(prefix: String) throws {
        do { path = try makePrivateDirectory(prefix: prefix) } catch {
            throw ValidationError("cannot create a private directory for the run: \(error)")
        }
    }

    /// A fresh run key in this directory; its path.
    func makeKey() throws -> String {
        try RunKey.generate().write(to: path + "/run.key")
        return path + "/run.key"
    }

    /// A process of the run, its configuration `value` written here: `arguments` and `--config FILE`.
    func spec<T: Encodable>(_ name: String, _ value: T, _ arguments: [String]) throws -> ProcessSpec {
        let file = path + "/" + name.replacingOccurrences(of: " ", with: "-") + ".json"
        try ProcessConfigFile.write(value, to: file)
        return ProcessSpec(name: name, executable: selfExecutable(), arguments: arguments + ["--config", file])
    }

    func remove() { try? FileManager.default.removeItem(atPath: path) }
}
