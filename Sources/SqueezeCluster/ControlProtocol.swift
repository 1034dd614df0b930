import Foundation
import SqueezeCollectives
import SqueezeTransport
import SqueezeEngine
import SqueezeTraining

/// The control plane between the coordinator (a ROUTER socket) and the workers (one DEALER each).
///
/// Every message is one ZeroMQ frame: a 12-byte header, then a JSON body.
///
///     offset size field
///          0    4 magic     "SQZC"
///          4    2 version   ControlMessage.version (little-endian)
///          6    2 kind      ControlKind (little-endian)
///          8    4 length    body bytes that follow (little-endian); must equal the frame's rest
///         12    … body      JSON of the kind's payload type
///
/// A wrong magic or version, an unknown kind, a length that disagrees with the frame (truncated or
/// padded), or a body that does not decode is rejected with `ControlError`, naming the peer.
/// Gradients never travel here: they go over the data plane (SqueezeTransport's data plane).
public enum ControlKind: UInt16, Sendable, CaseIterable {
    case hello = 1, welcome, ready, start, stepReport, heartbeat, stop, abort, reject, failure
    case halt, position, reform, save
}

public enum ControlMessage: Sendable {
    case hello(Hello)
    case welcome(Welcome)
    case ready(Ready)
    case start(Start)
    case stepReport(StepReport)
    case heartbeat(Heartbeat)
    case stop(Stop)
    case abort(Abort)
    case reject(Reject)
    case failure(Failure)
    case halt(Halt)
    case position(Position)
    case reform(Reform)
    case save(Save)

    /// A field a build of the previous version would ignore, and so misbehave, bumps the version; a
    /// value it would refuse by name (a new algorithm) does not.
    /// 3: the welcome carries the data-plane salt (a build of version 2 would not seal its frames).
    /// 4: the welcome carries the chunk size (a build of version 3 would cut messages at its own default).
    /// 5: elastic membership (the welcome's `elastic`; halt, position, reform and save).
    /// 6: joiners (the welcome's `joining`; the reform's `receivers`, `stateChecksum` and `dataPlaneSalt`).
    public static let version: UInt16 = 6
    static let magic: [UInt8] = Array("SQZC".utf8)
    static let headerSize = 12

    public var kind: ControlKind {
        switch self {
        case .hello: .hello
        case .welcome: .welcome
        case .ready: .ready
        case .start: .start
        case .stepReport: .stepReport
        case .heartbeat: .heartbeat
        case .stop: .stop
        case .abort: .abort
        case .reject: .reject
        case .failure: .failure
        case .halt: .halt
        case .position: .position
        case .reform: .reform
        case .save: .save
        }
    }

    public func encoded() -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        let body: Data
        do {
            switch self {
            case .hello(let m): body = try encoder.encode(m)
            case .welcome(let m): body = try encoder.encode(m)
            case .ready(let m): body = try encoder.encode(m)
            case .start(let m): body = try encoder.encode(m)
            case .stepReport(let m): body = try encoder.encode(m)
            case .heartbeat(let m): body = try encoder.encode(m)
            case .stop(let m): body = try encoder.encode(m)
            case .abort(let m): body = try encoder.encode(m)
            case .reject(let m): body = try encoder.encode(m)
            case .failure(let m): body = try encoder.encode(m)
            case .halt(let m): body = try encoder.encode(m)
            case .position(let m): body = try encoder.encode(m)
            case .reform(let m): body = try encoder.encode(m)
            case .save(let m): body = try encoder.encode(m)
            }
        } catch {
            preconditionFailure("control message \(kind) does not encode: \(error)")
        }
        var out = ControlMessage.magic
        withUnsafeBytes(of: ControlMessage.version.littleEndian) { out += $0 }
        withUnsafeBytes(of: kind.rawValue.littleEndian) { out += $0 }
        withUnsafeBytes(of: UInt32(body.count).littleEndian) { out += $0 }
        return out + body
    }

    /// Parses and validates one frame from `peer` (used in error messages).
    public static func decode(_ frame: UnsafeRawBufferPointer, from peer: String) throws -> ControlMessage {
        guard frame.count >= headerSize else {
            throw ControlError(peer: peer, problem: "truncated message: \(frame.count) bytes, shorter than the \(headerSize)-byte header")
        }
        guard Array(frame[0..<4]) == magic else { throw ControlError(peer: peer, problem: "not a squeezetrain control message (bad magic)") }
        let version = UInt16(frame[4]) | UInt16(frame[5]) << 8
        guard version == ControlMessage.version else {
            throw ControlError(peer: peer, problem: "protocol version \(version), this build speaks version \(ControlMessage.version)")
        }
        let rawKind = UInt16(frame[6]) | UInt16(frame[7]) << 8
        guard let kind = ControlKind(rawValue: rawKind) else { throw ControlError(peer: peer, problem: "unknown message kind \(rawKind)") }
        let length = Int(UInt32(frame[8]) | UInt32(frame[9]) << 8 | UInt32(frame[10]) << 16 | UInt32(frame[11]) << 24)
        guard length == frame.count - headerSize else {
            throw ControlError(peer: peer, problem: "\(kind) message says \(length) body bytes but carries \(frame.count - headerSize) (truncated or corrupt)")
        }
        let body = Data(frame[headerSize...])
        let d = JSONDecoder()
        do {
            switch kind {
            case .hello: return .hello(try d.decode(Hello.self, from: body))
            case .welcome: return .welcome(try d.decode(Welcome.self, from: body))
            case .ready: return .ready(try d.decode(Ready.self, from: body))
            case .start: return .start(try d.decode(Start.self, from: body))
            case .stepReport: return .stepReport(try d.decode(StepReport.self, from: body))
            case .heartbeat: return .heartbeat(try d.decode(Heartbeat.self, from: body))
            case .stop: return .stop(try d.decode(Stop.self, from: body))
            case .abort: return .abort(try d.decode(Abort.self, from: body))
            case .reject: return .reject(try d.decode(Reject.self, from: body))
            case .failure: return .failure(try d.decode(Failure.self, from: body))
            case .halt: return .halt(try d.decode(Halt.self, from: body))
            case .position: return .position(try d.decode(Position.self, from: body))
            case .reform: return .reform(try d.decode(Reform.self, from: body))
            case .save: return .save(try d.decode(Save.self, from: body))
            }
        } catch {
            throw ControlError(peer: peer, problem: "\(kind) message body does not decode: \(error)")
        }
    }
}

public struct ControlError: Error, CustomStringConvertible, Sendable {
    public var peer: String
    public var problem: String
    public var description: String { "message from \(peer) rejected: \(problem)" }
}

extension AllReduceAlgorithm {
    /// Why this algorithm cannot run with `compression`, in the command line's words, or nil.
    public func refusal(_ compression: GradientCompression) -> String? {
        guard let problem = unsupported(compression) else { return nil }
        return "--allreduce \(self) does not take --compress \(compression) (\(problem.reason)): "
            + "use --allreduce \(problem.alternatives.map(\.rawValue).joined(separator: " or ")) with \(problem.compressionKind)"
    }
}

/// Worker → coordinator, first message.
public struct Hello: Codable, Sendable {
    public var protocolVersion: UInt16
    public var host: String
    public var pid: Int32
    /// The rank this worker asks for (e.g. from a launcher), or nil for any.
    public var requestedRank: Int?
    public var threads: Int
}

/// Coordinator → worker: the rank and everything needed to train.
public struct Welcome: Codable, Sendable {
    public var rank: Int
    public var worldSize: Int
    public var config: TrainingConfig
    public var algorithm: AllReduceAlgorithm
    public var compression: GradientCompression
    public var bucketBytes: Int
    /// Payload bytes per data-plane message (`CollectiveOptions.chunkBytes`): every rank must cut the same chunks.
    public var chunkBytes: Int
    /// Data-plane transport; on the wire its raw value, "tcp" or "ipc" (as in version 2 when it was a string).
    public var transport: DataTransportKind
    public var timeoutSeconds: Double
    /// Checksum (FNV-1a-64 of the initial parameters) every rank must reproduce, from the seed or
    /// from `initWeights`.
    public var parametersChecksum: String
    /// Initial weights (safetensors) every worker loads instead of initialising from the seed.
    public var initWeights: String?
    /// Where rank 0 writes the final weights.
    public var saveWeights: String?
    /// Evaluate the test set (sharded over the ranks) at every epoch end and at the end of the run.
    public var evaluate: Bool
    /// Checkpoints (rank 0 writes them): directory, every K steps (0: epoch ends and the end only), how many to keep.
    public var checkpointDirectory: String?
    public var checkpointEvery: Int
    public var keepCheckpoints: Int
    /// Continue from this checkpoint file instead of step 0.
    public var resumeFrom: String?
    /// The rendezvous's data-plane salt (64 hex digits; `DataPlaneSeal`), fresh at every rendezvous:
    /// a sealed (tcp) data plane derives its keys from it and the run key.
    public var dataPlaneSalt: String? = nil
    /// An elastic run (`--elastic`): a lost member is removed and the others go on (halt, position, reform).
    public var elastic: Bool? = nil
    /// A worker that joins a running elastic run: it builds its model (`rank` 0 of the `worldSize` the
    /// run started with, whose layout its sampler keeps), answers `ready`, and waits for the `reform`
    /// that admits it; then it receives the training state from a member.
    public var joining: Bool? = nil
}

/// Worker → coordinator: model built and verified, data plane bound.
public struct Ready: Codable, Sendable {
    public var rank: Int
    public var model: ModelConfig
    public var parameterCount: Int
    public var parametersChecksum: String
    /// Where this worker's data-plane socket listens (reachable by the other workers).
    public var dataEndpoint: String
}

/// Coordinator → every worker once all are ready.
public struct Start: Codable, Sendable {
    public var step: Int
    /// Data-plane endpoints of every rank (index = rank); for star, the coordinator's hub last.
    public var endpoints: [String]
}

/// Worker → coordinator after every step: the metrics of the step.
public struct StepReport: Codable, Sendable {
    public var step: Int
    public var epoch: Int
    public var rank: Int
    public var loss: Float
    public var correct: Int
    public var images: Int
    public var learningRate: Float
    public var allreduceBytesSent: Int
    public var allreduceBytesReceived: Int
    public var controlBytes: Int
    public var allreduceSeconds: Double
    public var computeSeconds: Double
    public var stepSeconds: Double
    public var dataWaitSeconds: Double
    /// At the end of an epoch: this rank's share of the test set (every N-th image), evaluated.
    public var testCorrect: Int?
    public var testImages: Int?
}

/// Worker → coordinator (its rank), and coordinator → workers (rank −1), four times per timeout.
public struct Heartbeat: Codable, Sendable {
    public var rank: Int
    public var step: Int
}

/// Coordinator → workers: the run is over; or, with `afterStep`, finish training when that many
/// steps are done (rank 0 writes a checkpoint there) and wait for the final stop.
public struct Stop: Codable, Sendable {
    public var reason: String
    public var afterStep: Int?
    public init(reason: String, afterStep: Int? = nil) { self.reason = reason; self.afterStep = afterStep }
}
public struct Abort: Codable, Sendable { public var reason: String }
/// Coordinator → a peer whose message it refused (it keeps running).
public struct Reject: Codable, Sendable { public var reason: String }
/// Worker → coordinator: this worker cannot go on.
public struct Failure: Codable, Sendable {
    public var rank: Int
    public var step: Int
    public var message: String
}

/// Coordinator → every survivor of an elastic run, on its heartbeat connection (read while a step
/// blocks) and its main one: a member was lost; abandon the step in flight and send a `position`.
public struct Halt: Codable, Sendable {
    /// The membership epoch halted (a worker passes over a halt of another: a late copy).
    public var epoch: Int
    public var reason: String
}

/// Worker → coordinator after a halt: the steps it completed (nothing of the abandoned step applied)
/// and the checksum of its parameters and momentum (`stateChecksum`), which survivors at the same
/// step must agree on. Also the answer to `save`, once the checkpoint is written.
public struct Position: Codable, Sendable {
    public var rank: Int
    public var completedSteps: Int
    public var checksum: String
}

/// Coordinator → each member of a new membership epoch (survivors and joiners): epoch `epoch` trains
/// from `step` with `worldSize` workers, this one holding `rank`. The worker binds a new data plane
/// (keys from `dataPlaneSalt`) and answers `ready`; `start` follows. Then, before the first step, the
/// ranks in `receivers` (joiners, survivors one step behind) get the training state of `step` from a
/// member that holds it (`StateTransfer`), and check it against `stateChecksum`, the checksum of
/// parameters and momentum every holder reported in its `position`.
public struct Reform: Codable, Sendable {
    public var epoch: Int
    public var step: Int
    public var rank: Int
    public var worldSize: Int
    public var receivers: [Int]? = nil
    public var stateChecksum: String? = nil
    /// A fresh salt per membership epoch (64 hex digits): a new data plane's counters start again, so its keys must be new.
    public var dataPlaneSalt: String? = nil
}

/// Coordinator → the furthest survivor when too few remain (`--min-workers`): write the checkpoint
/// of your step (`reason` says why), answer `position`, and wait for the abort that ends the run.
public struct Save: Codable, Sendable { public var reason: String }

/// FNV-1a-64 over the bit patterns of `values`, as hex.
public func parametersChecksum(_ values: UnsafeBufferPointer<Float>) -> String {
    var h: UInt64 = 0xCBF2_9CE4_8422_2325
    for v in values { h = (h ^ UInt64(v.bitPattern)) &* 0x100_0000_01B3 }
    return String(h, radix: 16)
}

extension ControlServerChannel {
    func send(_ message: ControlMessage, to peer: [UInt8]) { send(message.encoded(), to: peer) }
}

extension ControlClientChannel {
    func send(_ message: ControlMessage) throws { try send(message.encoded()) }

    /// The next message from the coordinator, or nil after `timeout` (zero: don't wait).
    func receiveMessage(timeout: Duration, from coordinator: String) throws -> ControlMessage? {
        guard let frame = try receive(timeout: timeout) else { return nil }
        return try frame.withUnsafeBytes { try ControlMessage.decode($0, from: "the coordinator at \(coordinator)") }
    }
}
