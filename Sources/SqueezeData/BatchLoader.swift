import Dispatch
import Foundation
import SqueezeEngine

/// A position in training: batch `batch` (0 ..< batchesPerEpoch) of epoch `epoch`.
public struct BatchPosition: Equatable, Comparable, Sendable, CustomStringConvertible {
    public var epoch: Int
    public var batch: Int

    public init(epoch: Int, batch: Int) {
        self.epoch = epoch
        self.batch = batch
    }

    public static func < (a: Self, b: Self) -> Bool { (a.epoch, a.batch) < (b.epoch, b.batch) }
    public var description: String { "epoch \(epoch) batch \(batch)" }
}

/// Assembles this rank's training batches on a background thread, one step ahead of training.
///
/// `next()` returns batches in order — (start.epoch, start.batch), then the following batches of that
/// epoch, then epoch + 1 from batch 0, and so on — until `end` (exclusive) if given, forever
/// otherwise. Starting anywhere gives exactly the batches a loader started earlier would give from
/// that point (mid-epoch resume), because the sampler order depends only on (seed, epoch) and the
/// augmentation only on (augmentSeed, epoch, record index).
///
/// Double buffering (with the default two buffers): while the caller trains on one batch, the
/// thread fills the other. A returned batch's `images` stay valid until the next call to `next()`
/// or `stop()`; they hold `3 × localBatchSize × imageSize²` Floats, channel-major (C, N, H, W).
///
/// Use from one thread. `stop()` (also run at deinit) ends and joins the background thread.
public final class BatchLoader {
    /// One batch, lent to the caller until the next `next()` / `stop()`.
    public struct Batch {
        public let position: BatchPosition
        /// Data set record of each slot.
        public let indices: [Int]
        /// Class of each slot.
        public let labels: [Int32]
        /// (C, N, H, W) = (3, indices.count, imageSize, imageSize), channel-major.
        public let images: UnsafePointer<Float>
        public let imageSize: Int
        public var count: Int { indices.count }
    }

    public let sampler: ShardedSampler
    public let imageSize: Int
    private let state: LoaderState
    private var held: Int?  // buffer slot lent to the caller
    private var stopped = false
    /// Seconds `next()` spent blocked waiting for the background thread.
    public private(set) var waitSeconds: Double = 0

    /// - Parameters:
    ///   - dataset: the records (shared, not copied).
    ///   - sampler: this rank's sampler (order, shard, batch size).
    ///   - augmentSeed: nil for no augmentation; else crop-and-flip seeded per (seed, epoch, record).
    ///   - cutout: with augmentation, the side of a Cutout square (0: none; see `CropFlip`).
    ///   - translate, flip: with augmentation, the crop's largest shift and the flips (`CropFlip.random`).
    ///   - start: the first batch to produce.
    ///   - end: the position to stop before (nil: never stop).
    ///   - imageSize: 32, or a larger side to upsample to (bilinear, see `upsampleBilinear`).
    ///   - buffers: batches in memory at once, including the one lent out (≥ 2).
    public init(dataset: CIFAR10, sampler: ShardedSampler, augmentSeed: UInt64?, cutout: Int = 0, translate: Int = 4,
                flip: FlipMode = .random, start: BatchPosition = BatchPosition(epoch: 0, batch: 0), end: BatchPosition? = nil,
                imageSize: Int = CIFAR10.imageSide, buffers: Int = 2) {
        precondition(buffers >= 2, "a loader needs at least two buffers")
        precondition(imageSize >= CIFAR10.imageSide, "imageSize must be at least 32")
        precondition(start.epoch >= 0 && (0..<sampler.batchesPerEpoch).contains(start.batch),
                     "start \(start) is outside 0..<\(sampler.batchesPerEpoch) batches per epoch")
        precondition(sampler.count == dataset.count, "sampler is for \(sampler.count) records, data set has \(dataset.count)")
        self.sampler = sampler
        self.imageSize = imageSize
        state = LoaderState(dataset: dataset, sampler: sampler, augmentSeed: augmentSeed, cutout: cutout,
                            translate: translate, flip: flip, start: start, end: end, imageSize: imageSize, buffers: buffers)
        let state = self.state
        let thread = Thread { state.produce() }
        thread.name = "BatchLoader"
        thread.start()
    }

    deinit { stop() }

    /// The next batch, or nil once `end` is reached or after `stop()`. Returns the previous batch's
    /// buffer to the background thread.
    public func next() -> Batch? {
        guard !stopped else { return nil }
        if let slot = held {
            held = nil
            state.release(slot)
        }
        let t0 = DispatchTime.now().uptimeNanoseconds
        let taken = state.take()
        waitSeconds += Double(DispatchTime.now().uptimeNanoseconds - t0) * 1e-9
        guard let (slot, meta) = taken else { return nil }
        held = slot
        return Batch(position: meta.position, indices: meta.indices, labels: meta.labels,
                     images: UnsafePointer(state.buffers[slot].pointer), imageSize: imageSize)
    }

    /// Seconds the background thread spent assembling batches.
    public var loadSeconds: Double { state.loadSeconds }

    /// Zeroes `waitSeconds` and `loadSeconds` (e.g. at the start of a timing window).
    public func resetTimers() {
        waitSeconds = 0
        state.resetLoadSeconds()
    }

    /// Stops and joins the background thread. Idempotent; afterwards `next()` returns nil.
    public func stop() {
        guard !stopped else { return }
        stopped = true
        held = nil
        state.stopAndJoin()
    }
}

/// What the background thread and `BatchLoader` share. Mutable fields are guarded by `lock`;
/// buffer contents are handed over through the `free` / `ready` semaphores: the thread writes a slot
/// only between taking a `free` permit and signalling `ready`, the caller reads it only between
/// taking a `ready` permit and the `release` that signals `free`.
private final class LoaderState: @unchecked Sendable {
    struct Meta {
        var position: BatchPosition
        var indices: [Int]
        var labels: [Int32]
    }

    let dataset: CIFAR10
    let sampler: ShardedSampler
    let augmentSeed: UInt64?
    let cutout: Int
    let translate: Int
    let flip: FlipMode
    let start: BatchPosition
    let end: BatchPosition?
    let imageSize: Int
    let buffers: [FloatBuffer]

    private let lock = NSLock()
    private var meta: [Meta?]
    private var readyQueue: [Int] = []  // filled slots in order
    private var finished = false        // thread produced its last batch (reached `end`)
    private var stopRequested = false
    private var joined = false
    private var _loadSeconds: Double = 0

    // libdispatch traps if a semaphore is destroyed with a value below its initial one, so all
    // start at 0 and `free` is raised to `buffers` by signalling.
    private let free = DispatchSemaphore(value: 0)
    private let ready = DispatchSemaphore(value: 0)
    private let exited = DispatchSemaphore(value: 0)

    init(dataset: CIFAR10, sampler: ShardedSampler, augmentSeed: UInt64?, cutout: Int, translate: Int, flip: FlipMode, start: BatchPosition,
         end: BatchPosition?, imageSize: Int, buffers: Int) {
        self.dataset = dataset
        self.sampler = sampler
        self.augmentSeed = augmentSeed
        self.cutout = cutout
        self.translate = translate
        self.flip = flip
        self.start = start
        self.end = end
        self.imageSize = imageSize
        let capacity = 3 * sampler.localBatchSize * imageSize * imageSize
        self.buffers = (0..<buffers).map { _ in FloatBuffer(count: capacity) }
        meta = Array(repeating: nil, count: buffers)
        for _ in 0..<buffers { free.signal() }
    }


    var loadSeconds: Double { lock.withLock { _loadSeconds } }
    func resetLoadSeconds() { lock.withLock { _loadSeconds = 0 } }

    /// The background thread's loop: fill slots round-robin (the caller returns them in the same order).
    func produce() {
        defer { exited.signal() }
        let side = CIFAR10.imageSide
        let scratch: UnsafeMutablePointer<Float>? =
            imageSize == side ? nil : .allocate(capacity: 3 * sampler.localBatchSize * side * side)
        defer { scratch?.deallocate() }
        var position = start
        var order = sampler.order(epoch: position.epoch)
        var slot = 0
        while true {
            free.wait()
            if lock.withLock({ stopRequested }) { return }
            if let end, position >= end {
                lock.withLock { finished = true }
                ready.signal()
                return
            }
            let t0 = DispatchTime.now().uptimeNanoseconds
            let indices = sampler.localBatch(position.batch, of: order)
            let target = buffers[slot].pointer
            // The sampler covers exactly the data set's records (checked in init).
            let labels = try! dataset.fillBatch(indices: indices, epoch: position.epoch, augmentSeed: augmentSeed,
                                           cutout: cutout, translate: translate, flip: flip, into: scratch ?? target)
            if let scratch {
                upsampleBilinear(scratch, planes: 3 * indices.count, from: side, to: imageSize, into: target)
            }
            let m = Meta(position: position, indices: indices, labels: labels)
            // Advance (and compute the next epoch's order) before publishing, so it counts as loading.
            position.batch += 1
            if position.batch == sampler.batchesPerEpoch {
                position = BatchPosition(epoch: position.epoch + 1, batch: 0)
                if end.map({ position < $0 }) ?? true { order = sampler.order(epoch: position.epoch) }
            }
            let dt = Double(DispatchTime.now().uptimeNanoseconds - t0) * 1e-9
            lock.withLock {
                meta[slot] = m
                readyQueue.append(slot)
                _loadSeconds += dt
            }
            ready.signal()
            slot = (slot + 1) % buffers.count
        }
    }

    /// Blocks until a batch is ready; nil when the thread has finished and nothing is left.
    func take() -> (Int, Meta)? {
        ready.wait()
        return lock.withLock {
            if !readyQueue.isEmpty {
                let slot = readyQueue.removeFirst()
                return (slot, meta[slot]!)
            }
            // Finished (or stopped): leave a permit so later calls return nil at once too.
            ready.signal()
            return nil
        }
    }

    func release(_ slot: Int) {
        lock.withLock { meta[slot] = nil }
        free.signal()
    }

    func stopAndJoin() {
        let alreadyJoined: Bool = lock.withLock {
            defer { joined = true }
            stopRequested = true
            return joined
        }
        guard !alreadyJoined else { return }
        // Wake the thread if it is waiting for a free buffer; if it is filling one, this permit is
        // there when it next waits. Either way it then sees `stopRequested` (or `finished`) and exits.
        free.signal()
        exited.wait()
        ready.signal()  // in case anything still waits in take()
    }
}
