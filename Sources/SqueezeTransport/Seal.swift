// The sealed data plane: every gradient frame sent over tcp is encrypted and authenticated with
// AES-256-GCM (OpenSSL's libcrypto, EVP calls only), instead of running the whole socket through CURVE.
//
// Keys. HKDF-SHA256 from the run key's 32 secret bytes and a 32-byte random salt that the coordinator
// draws at every rendezvous (so also at every restart) and hands each worker in its welcome, over the
// CURVE control plane. One key per ordered pair of ranks: the info string names the sender, the
// receiver and the direction, so the frames from rank a to rank b and those from b to a never share
// a key.
//
// Nonces. 96 bits, little-endian: bits 0–63 a counter that the sender increments for every frame it
// sends to that receiver (starting at 1), bits 64–79 the sender's rank, bits 80–95 the receiver's.
// Neither wraps within a run: a key lives for one rendezvous and one transport, and 2^64 frames at
// one per microsecond would take 584,000 years; ranks are below 65,536 (ZMQTransport refuses larger
// groups). So a key and nonce are never used twice, also when a step is redone after a resume (a
// new rendezvous draws a new salt, hence new keys, and its counters start again under those).
//
// Why (step, bucket, chunk) are not packed into the nonce: GCM asks of a nonce only that it never
// repeat under a key, and the counter gives that. What binds a frame to its place in the schedule
// is the tag: it covers the message's control part, the collective's WireHeader (kind, sender, ring
// step, training step, bucket, offset, count), as additional authenticated data, and the collective
// accepts a message only if that header is exactly the one its schedule expects next from that
// peer. The frames from one rank to another follow that schedule in a fixed order (step by step,
// bucket by bucket, chunk by chunk; ZMTP over one connection keeps it), so within a rendezvous the
// counter and (step, bucket, chunk) determine each other: packing them would give the same nonces
// under other names, and make the transport parse its client's header.
//
// On the wire a sealed frame is the message's control part (the WireHeader), then the nonce (12
// bytes) and the tag (16 bytes); the payload part is the ciphertext, exactly as long as the
// plaintext. The receiver accepts a frame only if the nonce names it as the receiver and a rank it
// receives from, the counter exceeds the last one it accepted from that rank, and the tag verifies
// under that rank's key. So a frame replayed (from this step or an earlier one), or older than one
// accepted, fails the counter; one reflected to its sender or sent to another receiver fails the
// receiver check, and with the nonce rewritten the tag (another pair's key); an altered one, or one
// of another rendezvous, fails the tag. Each is dropped and counted like a stranger's. A newer frame
// delivered ahead of an older one held back (which takes control of the tcp stream) verifies, but
// its header is not the one expected: the collective fails naming the peer, as on a lost connection,
// and never sums the wrong chunk; the held-back frame then fails the counter.

import CCrypto
import Foundation

/// The run key and rendezvous salt a data-plane transport derives its per-pair keys from.
public struct DataPlaneSeal: Sendable, Equatable {
    public static let saltBytes = 32
    public static let nonceBytes = 12
    public static let tagBytes = 16
    /// Bytes a sealed frame carries beyond its message (in its control part): the nonce and the tag.
    public static let overheadBytes = nonceBytes + tagBytes

    let secret: [UInt8]
    public let salt: [UInt8]

    public init(key: RunKey, salt: [UInt8]) throws {
        guard salt.count == Self.saltBytes else {
            throw CommError.invalidArgument("a data-plane salt of \(salt.count) bytes; it must be \(Self.saltBytes)")
        }
        guard let secret = z85Decode(key.secretKey), secret.count == 32 else { throw CommError.invalidArgument("the run key does not decode") }
        self.secret = secret
        self.salt = salt
    }

    /// A fresh salt from OpenSSL's CSPRNG (`RAND_bytes`), drawn by the coordinator at every rendezvous.
    public static func randomSalt() throws -> [UInt8] {
        var salt = [UInt8](repeating: 0, count: saltBytes)
        guard RAND_bytes(&salt, Int32(saltBytes)) == 1 else { throw CryptoError("RAND_bytes") }
        return salt
    }

    /// The AES-256 key of the frames from `sender` to `receiver` (HKDF-SHA256, RFC 5869).
    func key(sender: Int, receiver: Int) throws -> [UInt8] {
        let info = Array("squeezetrain data plane v1: AES-256-GCM key of the frames from rank \(sender) to rank \(receiver) (\(sender)->\(receiver))".utf8)
        guard let ctx = EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, nil) else { throw CryptoError("EVP_PKEY_CTX_new_id(HKDF)") }
        defer { EVP_PKEY_CTX_free(ctx) }
        var out = [UInt8](repeating: 0, count: 32)
        var length = out.count
        guard EVP_PKEY_derive_init(ctx) == 1, EVP_PKEY_CTX_set_hkdf_md(ctx, EVP_sha256()) == 1,
              EVP_PKEY_CTX_set1_hkdf_salt(ctx, salt, Int32(salt.count)) == 1,
              EVP_PKEY_CTX_set1_hkdf_key(ctx, secret, Int32(secret.count)) == 1,
              EVP_PKEY_CTX_add1_hkdf_info(ctx, info, Int32(info.count)) == 1,
              EVP_PKEY_derive(ctx, &out, &length) == 1, length == 32 else { throw CryptoError("HKDF") }
        return out
    }

    /// The salt as the welcome carries it (hex), and back.
    public static func hex(_ salt: [UInt8]) -> String { salt.map { String(format: "%02x", $0) }.joined() }
    public static func salt(hex: String) -> [UInt8]? {
        let digits = Array(hex.utf8)
        guard digits.count == 2 * saltBytes else { return nil }
        var salt = [UInt8]()
        for i in stride(from: 0, to: digits.count, by: 2) {
            guard let byte = UInt8(String(decoding: digits[i..<i + 2], as: UTF8.self), radix: 16) else { return nil }
            salt.append(byte)
        }
        return salt
    }
}

public struct CryptoError: Error, CustomStringConvertible, Sendable {
    public let description: String
    init(_ function: String) { description = "OpenSSL \(function) failed" }
}

/// The frame nonce: a 64-bit counter, the sender's and the receiver's 16-bit ranks (see the file's head).
struct FrameNonce: Equatable {
    var counter: UInt64, sender: UInt16, receiver: UInt16

    func write(to p: UnsafeMutableRawPointer) {
        p.storeBytes(of: counter.littleEndian, toByteOffset: 0, as: UInt64.self)
        p.storeBytes(of: sender.littleEndian, toByteOffset: 8, as: UInt16.self)
        p.storeBytes(of: receiver.littleEndian, toByteOffset: 10, as: UInt16.self)
    }

    init(counter: UInt64, sender: UInt16, receiver: UInt16) { self.counter = counter; self.sender = sender; self.receiver = receiver }

    init(_ p: UnsafeRawPointer) {
        counter = UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        sender = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt16.self))
        receiver = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 10, as: UInt16.self))
    }
}

/// AES-256-GCM under one key, for one direction of one pair of ranks. The key schedule is set up
/// once; each frame only sets its nonce. Used by one thread at a time (its transport's).
final class FrameCipher {
    private let ctx: OpaquePointer
    private let encrypting: Bool
    /// Frames longer than this are fed to EVP in pieces (its lengths are Int32).
    private static let piece = 1 << 30

    init(key: [UInt8], encrypting: Bool) throws {
        guard let ctx = EVP_CIPHER_CTX_new() else { throw CryptoError("EVP_CIPHER_CTX_new") }
        self.ctx = ctx
        self.encrypting = encrypting
        let ok = encrypting ? EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), nil, key, nil) : EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), nil, key, nil)
        guard ok == 1 else { EVP_CIPHER_CTX_free(ctx); throw CryptoError("EVP_CipherInit_ex(aes-256-gcm)") }
    }

    deinit { EVP_CIPHER_CTX_free(ctx) }

    /// Encrypts `plaintext` into `ciphertext` (same length; may be the same memory) and writes the tag.
    func seal(aad: UnsafeRawBufferPointer, plaintext: UnsafeRawBufferPointer, into ciphertext: UnsafeMutableRawBufferPointer,
              nonce: UnsafeRawPointer, tag: UnsafeMutableRawPointer) throws {
        precondition(encrypting && ciphertext.count == plaintext.count)
        guard EVP_EncryptInit_ex(ctx, nil, nil, nil, nonce.assumingMemoryBound(to: UInt8.self)) == 1 else { throw CryptoError("EVP_EncryptInit_ex") }
        try update(aad: aad, input: plaintext.baseAddress, output: ciphertext.baseAddress, count: plaintext.count)
        var n: Int32 = 0
        guard EVP_EncryptFinal_ex(ctx, nil, &n) == 1, EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, Int32(DataPlaneSeal.tagBytes), tag) == 1
        else { throw CryptoError("EVP_EncryptFinal_ex") }
    }

    /// Decrypts `bytes` in place; false (and the bytes are garbage) if the tag does not verify.
    func open(aad: UnsafeRawBufferPointer, bytes: UnsafeMutableRawBufferPointer, nonce: UnsafeRawPointer, tag: UnsafeRawPointer) -> Bool {
        precondition(!encrypting)
        guard EVP_DecryptInit_ex(ctx, nil, nil, nil, nonce.assumingMemoryBound(to: UInt8.self)) == 1,
              (try? update(aad: aad, input: UnsafeRawPointer(bytes.baseAddress), output: bytes.baseAddress, count: bytes.count)) != nil,
              EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, Int32(DataPlaneSeal.tagBytes), UnsafeMutableRawPointer(mutating: tag)) == 1
        else { return false }
        var n: Int32 = 0
        return EVP_DecryptFinal_ex(ctx, nil, &n) == 1
    }

    private func update(aad: UnsafeRawBufferPointer, input: UnsafeRawPointer?, output: UnsafeMutableRawPointer?, count: Int) throws {
        var n: Int32 = 0
        if let a = aad.baseAddress, aad.count > 0 {
            guard EVP_CipherUpdate(ctx, nil, &n, a.assumingMemoryBound(to: UInt8.self), Int32(aad.count)) == 1 else { throw CryptoError("EVP_CipherUpdate(aad)") }
        }
        var done = 0
        while done < count {
            let k = min(Self.piece, count - done)
            guard EVP_CipherUpdate(ctx, (output! + done).assumingMemoryBound(to: UInt8.self), &n,
                                   (input! + done).assumingMemoryBound(to: UInt8.self), Int32(k)) == 1 else { throw CryptoError("EVP_CipherUpdate") }
            done += k
        }
    }
}

/// The sealing state of one rank's transport: a cipher and a counter per peer it sends to, a cipher
/// and the last accepted counter per peer it receives from.
final class FrameSealer {
    let rank: Int
    private let seal: DataPlaneSeal
    private var senders = [Int: FrameCipher](), sent = [Int: UInt64]()
    private var openers = [Int: FrameCipher](), accepted = [Int: UInt64]()

    init(seal: DataPlaneSeal, rank: Int) { self.seal = seal; self.rank = rank }

    /// Seals one frame to `peer`: writes the ciphertext and the control part's trailer (nonce, tag).
    func seal(to peer: Int, aad: UnsafeRawBufferPointer, plaintext: UnsafeRawBufferPointer,
              into ciphertext: UnsafeMutableRawBufferPointer, trailer: UnsafeMutableRawBufferPointer) throws {
        precondition(trailer.count == DataPlaneSeal.overheadBytes)
        let cipher = try senders[peer] ?? { let c = try FrameCipher(key: seal.key(sender: rank, receiver: peer), encrypting: true); senders[peer] = c; return c }()
        let counter = (sent[peer] ?? 0) + 1
        sent[peer] = counter
        let p = trailer.baseAddress!
        FrameNonce(counter: counter, sender: UInt16(rank), receiver: UInt16(peer)).write(to: p)
        try cipher.seal(aad: aad, plaintext: plaintext, into: ciphertext, nonce: p, tag: p + DataPlaneSeal.nonceBytes)
    }

    /// Opens a frame in place: the sender's rank if the frame is addressed to this rank, comes from one
    /// of `allowed`, carries a counter above the last accepted one and verifies; else nil.
    func open(aad: UnsafeRawBufferPointer, trailer: UnsafeRawBufferPointer, bytes: UnsafeMutableRawBufferPointer,
              allowed: (Int) -> Bool) -> Int? {
        guard trailer.count == DataPlaneSeal.overheadBytes else { return nil }
        let nonce = FrameNonce(trailer.baseAddress!)
        let sender = Int(nonce.sender)
        guard Int(nonce.receiver) == rank, sender != rank, allowed(sender), nonce.counter > accepted[sender] ?? 0 else { return nil }
        guard let cipher = try? openers[sender] ?? FrameCipher(key: seal.key(sender: sender, receiver: rank), encrypting: false) else { return nil }
        openers[sender] = cipher
        guard cipher.open(aad: aad, bytes: bytes, nonce: trailer.baseAddress!, tag: trailer.baseAddress! + DataPlaneSeal.nonceBytes) else { return nil }
        accepted[sender] = nonce.counter
        return sender
    }
}

/// AES-256-GCM's speed on this machine: bytes sealed per second over `bytes`-byte frames (bench allreduce prints it).
public func sealThroughput(bytes: Int = 1 << 20, seconds: Double = 0.3) throws -> Double {
    let seal = try DataPlaneSeal(key: try RunKey.generate(), salt: try DataPlaneSeal.randomSalt())
    let sealer = FrameSealer(seal: seal, rank: 0)
    var plain = [UInt8](repeating: 7, count: bytes), out = [UInt8](repeating: 0, count: bytes)
    var trailer = [UInt8](repeating: 0, count: DataPlaneSeal.overheadBytes)
    let header = [UInt8](repeating: 1, count: 32)  // as long as a collective's header
    let start = ContinuousClock.now
    var frames = 0
    repeat {
        try header.withUnsafeBytes { h in
            try plain.withUnsafeBytes { p in
                try out.withUnsafeMutableBytes { o in try trailer.withUnsafeMutableBytes { try sealer.seal(to: 1, aad: h, plaintext: p, into: o, trailer: $0) } }
            }
        }
        frames += 1
        plain[0] &+= 1
    } while (ContinuousClock.now - start) < .milliseconds(Int(seconds * 1000))
    let elapsed = ContinuousClock.now - start
    return Double(frames * bytes) / (Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) * 1e-18)
}
