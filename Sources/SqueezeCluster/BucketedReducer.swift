import Foundation
import SqueezeCollectives
import SqueezeTransport
import SqueezeSystem
import SqueezeTraining

/// Gradient buckets: contiguous slices of the flat gradient buffer, built from whole layers in
/// reverse layer order (the order backward finishes them) until each holds at least `bucketBytes`.
/// The plan depends only on the model and the bucket size, so every rank (and the star hub) agrees.
public func bucketPlan(layerRanges: [Range<Int>], bucketBytes: Int) -> [Range<Int>] {
    var buckets = [Range<Int>]()
    var current: Range<Int>?
    for r in layerRanges.reversed() where !r.isEmpty {
        current = current.map { r.lowerBound..<$0.upperBound } ?? r
        if current!.count * MemoryLayout<Float>.size >= bucketBytes {
            buckets.append(current!)
            current = nil
        }
    }
    if let current { buckets.append(current) }
    return buckets
}

/// Averages gradients bucket by bucket on a communication thread while backward goes on: a bucket
/// is handed over as soon as its lowest layer's gradients are ready, and `finish` waits for all.
/// Bucket k of step s travels with the tag (s, k), so buckets can never be confused.
public final class BucketedReducer: GradientReducer, @unchecked Sendable {
    // @unchecked Sendable: the job queue and results are guarded by `lock`; the gradient buffer is
    // written by the communication thread only for buckets backward has finished with.
    public let plan: [Range<Int>]
    private let reducer: any AllReducer
    private let lock = NSCondition()
    private var queue = [(bucket: Int, step: Int, weight: Float?, buffer: UnsafeMutableBufferPointer<Float>)]()
    private var done = 0, submitted = 0
    private var failure: Error?
    private var closing = false
    private var thread: Thread?
    /// The step whose gradients are being reduced (set by the worker before each step).
    public var step = 0
    /// This rank's `shareWeight` (set with the members, before a step): each bucket is scaled by it
    /// before its all-reduce. nil (equal shares): nothing is scaled.
    public var shareWeight: Float?
    /// Seconds the communication thread spent in all-reduces during the last step.
    public private(set) var busySeconds = 0.0
    /// Records each bucket's all-reduce on the communication thread (nil: not traced); set before the first step.
    public var tracer: Tracer?
    /// Told when backward has finished bucket 0 and when bucket 0's all-reduce has completed (`InjectedFault`).
    public var faultHook: (@Sendable (InjectedFault.Phase, Int) -> Void)?

    public init(reducer: any AllReducer, plan: [Range<Int>]) {
        self.reducer = reducer
        self.plan = plan
        let t = Thread { self.serve() }  // holds the reducer until `close()` ends the thread
        t.name = "allreduce"
        thread = t
        t.start()
    }

    public func gradientsReady(_ range: Range<Int>, of gradients: UnsafeMutableBufferPointer<Float>) {
        guard let k = plan.firstIndex(where: { $0.lowerBound == range.lowerBound }) else { return }
        if k == 0 { faultHook?(.backward, step) }
        lock.lock()
        if submitted == 0 { busySeconds = 0 }
        queue.append((k, step, shareWeight, gradients))
        submitted += 1
        lock.signal()
        lock.unlock()
    }

    public func finish(_ gradients: UnsafeMutableBufferPointer<Float>) throws {
        lock.lock()
        defer { lock.unlock() }
        while done < submitted && failure == nil { lock.wait() }
        let allSubmitted = submitted == plan.count
        done = 0; submitted = 0
        if let failure { throw failure }
        precondition(allSubmitted, "backward did not finish every gradient bucket")
    }

    /// Stops the communication thread (after the bucket in flight, if any).
    public func close() {
        lock.lock()
        closing = true
        lock.broadcast()
        lock.unlock()
    }

    private func serve() {
        while true {
            lock.lock()
            while queue.isEmpty && !closing { lock.wait() }
            if queue.isEmpty { lock.unlock(); return }
            let job = queue.removeFirst()
            let failed = failure != nil
            lock.unlock()
            var error: Error?
            let t0 = DispatchTime.now().uptimeNanoseconds
            if !failed {
                do {
                    let range = plan[job.bucket]
                    if let weight = job.weight { scaleByShare(job.buffer, range: range, weight: weight) }
                    try traced(tracer, .allReduce, "allreduce", "all-reduce bucket \(job.bucket)",
                               ["step": job.step, "bucket": job.bucket, "bytes": range.count * MemoryLayout<Float>.size]) {
                        try reducer.allReduceAverage(job.buffer, range: range,
                                                     tag: CollectiveTag(step: UInt32(truncatingIfNeeded: job.step), bucket: UInt32(job.bucket)))
                    }
                } catch let e { error = e }
                if error == nil && job.bucket == 0 { faultHook?(.allreduce, job.step) }
            }
            lock.lock()
            busySeconds += Double(DispatchTime.now().uptimeNanoseconds - t0) * 1e-9
            if let error, failure == nil { failure = error }
            done += 1
            lock.broadcast()
            lock.unlock()
        }
    }
}
