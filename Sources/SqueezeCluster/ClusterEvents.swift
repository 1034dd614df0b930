import Foundation

/// A machine-readable event from a cluster process to whoever started it (`launch`, tests): one
/// line on standard output, `squeezetrain-event ` followed by a JSON object, printed only when the
/// process was asked for events (`--events`). Nothing reads the human log lines.
public struct ClusterEvent: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable {
        /// The coordinator's control socket is bound at `endpoint`.
        case listening
        /// A worker takes SIGINT and SIGTERM and is asking the coordinator at `endpoint` for a rank.
        case joining
        /// Every worker joined; training starts at `step` with `workers` workers.
        case ready
        /// Rank 0 wrote the checkpoint of `step` at `path`.
        case checkpoint
        /// An elastic run lost a member: from `step` on, `workers` workers train (a new membership epoch).
        case membership
    }
    public var event: Kind
    public var endpoint: String?
    public var step: Int?
    public var workers: Int?
    public var path: String?

    public init(_ event: Kind, endpoint: String? = nil, step: Int? = nil, workers: Int? = nil, path: String? = nil) {
        self.event = event; self.endpoint = endpoint; self.step = step; self.workers = workers; self.path = path
    }

    public static let linePrefix = "squeezetrain-event "

    /// The event as one line (without the newline).
    public var line: String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let json = (try? encoder.encode(self)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
        return ClusterEvent.linePrefix + json
    }

    /// The event a line carries, or nil for any other line.
    public init?(line: String) {
        guard line.hasPrefix(ClusterEvent.linePrefix),
              let event = try? JSONDecoder().decode(ClusterEvent.self, from: Data(line.dropFirst(ClusterEvent.linePrefix.count).utf8))
        else { return nil }
        self = event
    }
}
