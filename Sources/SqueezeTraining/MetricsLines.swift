import Foundation

/// One kind of metrics line. Its coding keys are the JSON field names, in the order written;
/// optional fields that are nil are left out.
public protocol MetricsLine: Encodable {}

/// Where metrics lines go: a JSON-lines file (`MetricsWriter`), or memory in tests.
public protocol MetricsSink: AnyObject {
    func record<Line: MetricsLine>(_ line: Line)
}

/// `train`: one line per step.
public struct TrainStepMetrics: MetricsLine {
    public var step: Int, epoch: Int
    public var rank = 0, worldSize = 1
    public var loss: Float
    public var accuracy: Double
    public var learningRate: Float
    public var images: Int
    public var imagesPerSecond: Double
    public var computeSeconds: Double, stepSeconds: Double

    enum CodingKeys: String, CodingKey {
        case step, epoch, rank, worldSize = "world_size", loss, accuracy, learningRate = "learning_rate", images
        case imagesPerSecond = "images_per_second", computeSeconds = "compute_seconds", stepSeconds = "step_seconds"
    }
}

/// `train`: one line per epoch (test accuracy and loss when evaluated). `elapsed_seconds` counts
/// from this process's first step (a resumed run starts again from 0); `train_macs` is the training
/// compute so far, resumed steps included: images trained × 3 × forward MACs per image.
public struct TrainEpochMetrics: MetricsLine {
    public var step: Int, epoch: Int
    public var trainLoss: Double, trainAccuracy: Double
    public var epochSeconds: Double, dataWaitSeconds: Double, dataLoadSeconds: Double, computeSeconds: Double
    public var elapsedSeconds: Double, trainMacs: Int
    public var testAccuracy: Double?, testLoss: Double?

    enum CodingKeys: String, CodingKey {
        case step, epoch, trainLoss = "train_loss", trainAccuracy = "train_accuracy", epochSeconds = "epoch_seconds"
        case dataWaitSeconds = "data_wait_seconds", dataLoadSeconds = "data_load_seconds", computeSeconds = "compute_seconds"
        case elapsedSeconds = "elapsed_seconds", trainMacs = "train_macs"
        case testAccuracy = "test_accuracy", testLoss = "test_loss"
    }
}

/// Training compute after `steps` steps of `batchSize` images: forward, backward-data and
/// backward-weights each cost about one forward's multiply-accumulates.
public func trainingMACs(steps: Int, batchSize: Int, forwardMACs: Int) -> Int { steps * batchSize * 3 * forwardMACs }

/// A cluster run: one line per worker per step (written by the coordinator).
public struct WorkerStepMetrics: MetricsLine {
    public var step: Int, epoch: Int, rank: Int, worldSize: Int
    public var loss: Float
    public var accuracy: Double
    public var images: Int
    public var learningRate: Float
    public var allreduceBytesSent: Int, allreduceBytesReceived: Int
    public var theoryBytesSent: Double
    public var denseBytesSent: Int
    public var compressionRatio: Double
    public var controlBytes: Int
    public var allreduceSeconds: Double, computeSeconds: Double, stepSeconds: Double, dataWaitSeconds: Double

    public init(step: Int, epoch: Int, rank: Int, worldSize: Int, loss: Float, accuracy: Double, images: Int, learningRate: Float,
                allreduceBytesSent: Int, allreduceBytesReceived: Int, theoryBytesSent: Double, denseBytesSent: Int,
                compressionRatio: Double, controlBytes: Int, allreduceSeconds: Double, computeSeconds: Double,
                stepSeconds: Double, dataWaitSeconds: Double) {
        self.step = step; self.epoch = epoch; self.rank = rank; self.worldSize = worldSize; self.loss = loss
        self.accuracy = accuracy; self.images = images; self.learningRate = learningRate
        self.allreduceBytesSent = allreduceBytesSent; self.allreduceBytesReceived = allreduceBytesReceived
        self.theoryBytesSent = theoryBytesSent; self.denseBytesSent = denseBytesSent; self.compressionRatio = compressionRatio
        self.controlBytes = controlBytes; self.allreduceSeconds = allreduceSeconds; self.computeSeconds = computeSeconds
        self.stepSeconds = stepSeconds; self.dataWaitSeconds = dataWaitSeconds
    }

    enum CodingKeys: String, CodingKey {
        case step, epoch, rank, worldSize = "world_size", loss, accuracy, images, learningRate = "learning_rate"
        case allreduceBytesSent = "allreduce_bytes_sent", allreduceBytesReceived = "allreduce_bytes_received"
        case theoryBytesSent = "theory_bytes_sent", denseBytesSent = "dense_bytes_sent", compressionRatio = "compression_ratio"
        case controlBytes = "control_bytes", allreduceSeconds = "allreduce_seconds", computeSeconds = "compute_seconds"
        case stepSeconds = "step_seconds", dataWaitSeconds = "data_wait_seconds"
    }
}

/// A cluster run: the test accuracy at an epoch end, over every rank's share, with the seconds
/// since the coordinator's first step of this run and the training compute so far (as `TrainEpochMetrics`).
public struct ClusterTestMetrics: MetricsLine {
    public var step: Int, epoch: Int
    public var testAccuracy: Double
    public var testImages: Int
    public var elapsedSeconds: Double, trainMacs: Int
    public init(step: Int, epoch: Int, testAccuracy: Double, testImages: Int, elapsedSeconds: Double, trainMacs: Int) {
        self.step = step; self.epoch = epoch; self.testAccuracy = testAccuracy; self.testImages = testImages
        self.elapsedSeconds = elapsedSeconds; self.trainMacs = trainMacs
    }
    enum CodingKeys: String, CodingKey {
        case step, epoch, testAccuracy = "test_accuracy", testImages = "test_images"
        case elapsedSeconds = "elapsed_seconds", trainMacs = "train_macs"
    }
}

/// `launch --max-restarts`: a restart, recorded when the restarted cluster is training again.
public struct RestartEvent: MetricsLine {
    public var event = "restart"
    public var restart: Int
    public var process: String, reason: String
    public var failedStep: Int, resumeStep: Int
    public var recoverySeconds: Double
    public init(restart: Int, process: String, reason: String, failedStep: Int, resumeStep: Int, recoverySeconds: Double) {
        self.restart = restart; self.process = process; self.reason = reason
        self.failedStep = failedStep; self.resumeStep = resumeStep; self.recoverySeconds = recoverySeconds
    }
    enum CodingKeys: String, CodingKey {
        case event, restart, process, reason, failedStep = "failed_step", resumeStep = "resume_step", recoverySeconds = "recovery_seconds"
    }
}

/// An elastic run's new membership epoch (issue 29): from `from_step` on, `world_size` workers train;
/// `lost_ranks` left (the ranks they held), `lost` says who and why; `lost_seconds` is when the
/// coordinator learnt of the loss and `resumed_seconds` when it told the survivors to go on (seconds
/// since training began).
public struct MembershipEvent: MetricsLine {
    public var event = "membership"
    public var epoch: Int, fromStep: Int, worldSize: Int
    public var lostRanks: [Int], lost: String
    /// When the change began (a loss learnt, or a joiner ready) and when the members were told to go on.
    public var lostSeconds: Double, resumedSeconds: Double
    /// The ranks joiners took (absent when none joined).
    public var joinedRanks: [Int]?
    public init(epoch: Int, fromStep: Int, worldSize: Int, lostRanks: [Int], lost: String, lostSeconds: Double, resumedSeconds: Double,
                joinedRanks: [Int] = []) {
        self.epoch = epoch; self.fromStep = fromStep; self.worldSize = worldSize; self.lostRanks = lostRanks; self.lost = lost
        self.lostSeconds = lostSeconds; self.resumedSeconds = resumedSeconds
        self.joinedRanks = joinedRanks.isEmpty ? nil : joinedRanks
    }
    enum CodingKeys: String, CodingKey {
        case event, epoch, fromStep = "from_step", worldSize = "world_size", lostRanks = "lost_ranks", lost
        case lostSeconds = "lost_seconds", resumedSeconds = "resumed_seconds", joinedRanks = "joined_ranks"
    }
}

/// What another process needs from a metrics line it reads back (the launcher: the furthest step).
public struct MetricsLineHeader: Decodable {
    public var step: Int?
    public var rank: Int?
}

/// Encodes one line's fields in declaration order, each value as `MetricsWriter.encode` writes it.
struct MetricsLineEncoder: Encoder {
    final class Fields { var parts = [String]() }
    let fields = Fields()
    var codingPath: [CodingKey] = []
    var userInfo: [CodingUserInfoKey: Any] = [:]

    static func line<Line: Encodable>(_ value: Line) -> String {
        let encoder = MetricsLineEncoder()
        do { try value.encode(to: encoder) } catch { preconditionFailure("metrics line \(Line.self) does not encode: \(error)") }
        return "{" + encoder.fields.parts.joined(separator: ",") + "}"
    }

    func container<Key: CodingKey>(keyedBy type: Key.Type) -> KeyedEncodingContainer<Key> {
        KeyedEncodingContainer(Container<Key>(fields: fields))
    }
    func unkeyedContainer() -> UnkeyedEncodingContainer { preconditionFailure("metrics lines are flat objects") }
    func singleValueContainer() -> SingleValueEncodingContainer { preconditionFailure("metrics lines are flat objects") }

    struct Container<Key: CodingKey>: KeyedEncodingContainerProtocol {
        let fields: Fields
        var codingPath: [CodingKey] = []
        func add(_ key: Key, _ value: Any) { fields.parts.append("\"\(key.stringValue)\":\(MetricsWriter.encode(value))") }
        mutating func encodeNil(forKey key: Key) throws { fields.parts.append("\"\(key.stringValue)\":null") }
        mutating func encode(_ value: Bool, forKey key: Key) throws { add(key, value) }
        mutating func encode(_ value: String, forKey key: Key) throws { add(key, value) }
        mutating func encode(_ value: Double, forKey key: Key) throws { add(key, value) }
        mutating func encode(_ value: Float, forKey key: Key) throws { add(key, value) }
        mutating func encode(_ value: Int, forKey key: Key) throws { add(key, value) }
        mutating func encode<T: Encodable>(_ value: T, forKey key: Key) throws {
            switch value {
            case let v as [Int]: add(key, v)
            case let v as [Double]: add(key, v)
            case let v as [[Int]]: add(key, v)
            case let v as Int32: add(key, Int(v))
            case let v as Int64: add(key, Int(v))
            default: throw EncodingError.invalidValue(value, .init(codingPath: codingPath + [key], debugDescription: "not a metrics value"))
            }
        }
        mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type, forKey key: Key) -> KeyedEncodingContainer<NestedKey> {
            preconditionFailure("metrics lines are flat objects")
        }
        mutating func nestedUnkeyedContainer(forKey key: Key) -> UnkeyedEncodingContainer { preconditionFailure("metrics lines are flat objects") }
        mutating func superEncoder() -> Encoder { preconditionFailure("metrics lines are flat objects") }
        mutating func superEncoder(forKey key: Key) -> Encoder { preconditionFailure("metrics lines are flat objects") }
    }
}

/// Metrics kept in memory (tests): each line as written to a file.
public final class MemoryMetrics: MetricsSink, @unchecked Sendable {
    // @unchecked Sendable: `lines` is guarded by `lock`.
    private let lock = NSLock()
    private var stored = [String]()
    public init() {}
    public func record<Line: MetricsLine>(_ line: Line) { lock.withLock { stored.append(MetricsLineEncoder.line(line)) } }
    public var lines: [String] { lock.withLock { stored } }
}
