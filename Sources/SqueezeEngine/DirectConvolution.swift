import CDNNL

/// oneDNN's convolution primitives (forward, backward data, backward weights) for one convolution
/// shape. Source and destination are either the engine's channel-major (C, N, H, W) layout, reordered
/// to and from the blocked formats oneDNN picks (nChw8c on AVX2), or already blocked (a training step
/// in the blocked layout, Blocked.swift), then used as they are. No bias (the engine adds it with
/// ReLU/BatchNorm).
///
/// `Conv2d` picks it or im2col + sgemm per layer shape (`ConvolutionAlgorithm`, docs/engine.md).
/// The source in oneDNN's format is kept from forward for the weight gradient (instead of the
/// 9× larger im2col columns). Blocked tensors that live only inside one call (the destination, the
/// destination gradient, the input gradient) are bound per call to two scratch buffers that all
/// convolutions of a network share.
final class DirectConvolution {
    let n: Int
    /// oneDNN's implementation names (`dnnl_query_impl_info_str`), e.g. `jit:avx2`: one name when forward,
    /// backward-data and backward-weights agree, else the three separated by slashes.
    let implementation: String
    private let forwardPrimitive: dnnl_primitive_t, dataPrimitive: dnnl_primitive_t, weightsPrimitive: dnnl_primitive_t
    // oneDNN-format memories (owned)
    private let src: dnnl_memory_t, weightsForward: dnnl_memory_t, dst: dnnl_memory_t
    /// oneDNN's blocked source (destination) format's block, 0 when the engine's is channel-major.
    let sourceBlock: Int, destinationBlock: Int
    private let srcForWeights: dnnl_memory_t?, diffDstData: dnnl_memory_t, diffDstWeights: dnnl_memory_t
    private let weightsData: dnnl_memory_t, diffSrc: dnnl_memory_t, diffWeights: dnnl_memory_t
    // the engine's buffers (handles set per call)
    private let xUser: dnnl_memory_t, yUser: dnnl_memory_t, wUser: dnnl_memory_t
    private let dyUser: dnnl_memory_t, dxUser: dnnl_memory_t, dwUser: dnnl_memory_t
    // nil where the engine's tensor is already in oneDNN's format (blocked source or destination)
    private let toSrc: dnnl_primitive_t?, toWeightsForward: dnnl_primitive_t, fromDst: dnnl_primitive_t?
    private let toSrcForWeights: dnnl_primitive_t?, toDiffDstData: dnnl_primitive_t?, toDiffDstWeights: dnnl_primitive_t?
    /// nil when backward-data takes the weights in the forward's format (reordered once per step).
    private let toWeightsData: dnnl_primitive_t?
    private let fromDiffSrc: dnnl_primitive_t?, addFromDiffSrc: dnnl_primitive_t?
    private let fromDiffWeights: dnnl_primitive_t
    private var descriptors = [dnnl_primitive_desc_t]()
    private var memories = [dnnl_memory_t]()
    private var primitives = [dnnl_primitive_t]()
    private let scratch: (FloatBuffer, FloatBuffer)

    nonisolated(unsafe) static let engine: dnnl_engine_t = {
        var e: dnnl_engine_t?
        check(dnnl_engine_create(&e, dnnl_cpu, 0), "dnnl_engine_create")
        return e!
    }()
    nonisolated(unsafe) static let stream: dnnl_stream_t = {
        var s: dnnl_stream_t?
        check(dnnl_stream_create(&s, engine, dnnl_stream_default_flags.rawValue), "dnnl_stream_create")
        return s!
    }()

    static func check(_ status: dnnl_status_t, _ what: String) {
        precondition(status == dnnl_success, "oneDNN \(what) failed with status \(status.rawValue)")
    }

    /// The channel block of the layout oneDNN's convolutions choose on this CPU (16 with AVX-512,
    /// 8 with AVX2), 0 if it is neither nChw8c nor nChw16c (then nothing runs blocked).
    static let preferredBlock: Int = {
        let probe = DirectConvolution(cin: 32, cout: 64, kernel: 3, stride: 1, padding: 1, n: 1, h: 8, w: 8, ho: 8, wo: 8,
                                      scratch: (FloatBuffer(), FloatBuffer()))
        return probe.chosenBlock
    }()
    private var chosenBlock = 0

    /// x (cin, n, h, w) → y (cout, n, ho, wo), weights (cout, cin, k, k); `scratch` holds the blocked
    /// tensors that live only inside one call. With `sourceBlock` (`destinationBlock`) nonzero, x and
    /// dx (y and dy) are blocked with that block (Blocked.swift), else channel-major.
    init(cin: Int, cout: Int, kernel k: Int, stride: Int, padding p: Int, n: Int, h: Int, w: Int, ho: Int, wo: Int,
         sourceBlock: Int = 0, destinationBlock: Int = 0, scratch: (FloatBuffer, FloatBuffer)) {
        self.n = n
        self.scratch = scratch
        (self.sourceBlock, self.destinationBlock) = (sourceBlock, destinationBlock)
        typealias MD = dnnl_memory_desc_t
        func md(_ dims: [Int], tag: dnnl_format_tag_t) -> MD {
            var d = MD()
            DirectConvolution.check(dnnl_memory_desc_init_by_tag(&d, Int32(dims.count), dims.map(Int64.init), dnnl_f32, tag), "memory_desc_init_by_tag")
            return d
        }
        // channel-major (C, N, H, W) described as NCHW with the channel stride outermost
        func channelMajor(c: Int, h: Int, w: Int) -> MD {
            var d = MD()
            DirectConvolution.check(dnnl_memory_desc_init_by_strides(&d, 4, [n, c, h, w].map(Int64.init),
                                                                      dnnl_f32, [h * w, n * h * w, w, 1].map(Int64.init)),
                                    "memory_desc_init_by_strides")
            return d
        }
        func blocked(_ block: Int) -> dnnl_format_tag_t {
            switch block {
            case 0: return dnnl_format_tag_any
            case 8: return dnnl_nChw8c
            case 16: return dnnl_nChw16c
            default: preconditionFailure("no oneDNN format for a channel block of \(block)")
            }
        }
        var srcAny = md([n, cin, h, w], tag: blocked(sourceBlock)), dstAny = md([n, cout, ho, wo], tag: blocked(destinationBlock))
        var wAny = md([cout, cin, k, k], tag: dnnl_format_tag_any)
        var xCM = channelMajor(c: cin, h: h, w: w), yCM = channelMajor(c: cout, h: ho, w: wo)
        var wPlain = md([cout, cin, k, k], tag: dnnl_oihw)
        let strides: [Int64] = [Int64(stride), Int64(stride)], pad: [Int64] = [Int64(p), Int64(p)]
        // PyTorch's right padding for this output size
        let padR: [Int64] = [Int64((ho - 1) * stride + k - h - p), Int64((wo - 1) * stride + k - w - p)]

        var descriptors = [dnnl_primitive_desc_t]()
        func create(_ desc: UnsafeRawPointer, hint: dnnl_primitive_desc_t?, attr: dnnl_primitive_attr_t? = nil) -> dnnl_primitive_desc_t {
            var pd: dnnl_primitive_desc_t?
            DirectConvolution.check(dnnl_primitive_desc_create(&pd, desc, attr, DirectConvolution.engine, hint), "primitive_desc_create")
            descriptors.append(pd!)
            return pd!
        }
        var fd = dnnl_convolution_desc_t(), dd = dnnl_convolution_desc_t(), wd = dnnl_convolution_desc_t()
        DirectConvolution.check(dnnl_convolution_forward_desc_init(&fd, dnnl_forward_training, dnnl_convolution_direct,
                                                                   &srcAny, &wAny, nil, &dstAny, strides, pad, padR), "conv fwd desc")
        let fpd = create(&fd, hint: nil)
        DirectConvolution.check(dnnl_convolution_backward_data_desc_init(&dd, dnnl_convolution_direct, &srcAny, &wAny, &dstAny,
                                                                         strides, pad, padR), "conv bwd data desc")
        let dpd = create(&dd, hint: fpd)
        DirectConvolution.check(dnnl_convolution_backward_weights_desc_init(&wd, dnnl_convolution_direct, &srcAny, &wAny, nil,
                                                                            &dstAny, strides, pad, padR), "conv bwd weights desc")
        let wpd = create(&wd, hint: fpd)
        let names = [fpd, dpd, wpd].map(DirectConvolution.implementationName)
        implementation = Set(names).count == 1 ? names[0] : names.joined(separator: " / ")
        func query(_ pd: dnnl_primitive_desc_t, _ what: dnnl_query_t) -> UnsafePointer<MD> { dnnl_primitive_desc_query_md(pd, what, 0)! }

        var memories = [dnnl_memory_t]()
        func memory(_ d: UnsafePointer<MD>, owned: Bool = true) -> dnnl_memory_t {
            var m: dnnl_memory_t?
            DirectConvolution.check(dnnl_memory_create(&m, d, DirectConvolution.engine,
                                                       owned ? UnsafeMutableRawPointer(bitPattern: -1) : nil), "memory_create")
            memories.append(m!)
            return m!
        }
        var primitives = [dnnl_primitive_t]()
        func primitive(_ pd: dnnl_primitive_desc_t) -> dnnl_primitive_t {
            var pr: dnnl_primitive_t?
            DirectConvolution.check(dnnl_primitive_create(&pr, pd), "primitive_create")
            primitives.append(pr!)
            return pr!
        }
        func reorder(_ from: UnsafePointer<MD>, _ to: UnsafePointer<MD>, accumulate: Bool = false) -> dnnl_primitive_t {
            var attr: dnnl_primitive_attr_t?
            if accumulate {
                var ops: dnnl_post_ops_t?
                DirectConvolution.check(dnnl_post_ops_create(&ops), "post_ops_create")
                DirectConvolution.check(dnnl_post_ops_append_sum(ops, 1), "post_ops_append_sum")
                DirectConvolution.check(dnnl_primitive_attr_create(&attr), "attr_create")
                DirectConvolution.check(dnnl_primitive_attr_set_post_ops(attr, ops), "attr_set_post_ops")
                dnnl_post_ops_destroy(ops)
            }
            defer { if let attr { dnnl_primitive_attr_destroy(attr) } }
            var pd: dnnl_primitive_desc_t?
            DirectConvolution.check(dnnl_reorder_primitive_desc_create(&pd, from, DirectConvolution.engine, to, DirectConvolution.engine, attr),
                                    "reorder_primitive_desc_create")
            descriptors.append(pd!)
            return primitive(pd!)
        }

        var dstDesc = query(fpd, dnnl_query_dst_md).pointee
        for (block, tag) in [(8, dnnl_nChw8c), (16, dnnl_nChw16c)] {
            var d = md([n, cout, ho, wo], tag: tag)
            if dnnl_memory_desc_equal(&d, &dstDesc) != 0 { chosenBlock = block }
        }
        let blockedSource = sourceBlock > 0, blockedDestination = destinationBlock > 0
        forwardPrimitive = primitive(fpd); dataPrimitive = primitive(dpd); weightsPrimitive = primitive(wpd)
        src = memory(query(fpd, dnnl_query_src_md), owned: !blockedSource)
        let forwardWeights = memory(query(fpd, dnnl_query_weights_md))
        weightsForward = forwardWeights
        dst = memory(query(fpd, dnnl_query_dst_md), owned: false)
        diffDstData = memory(query(dpd, dnnl_query_diff_dst_md), owned: false)
        let sameWeights = dnnl_memory_desc_equal(query(fpd, dnnl_query_weights_md), query(dpd, dnnl_query_weights_md)) != 0
        weightsData = sameWeights ? forwardWeights : memory(query(dpd, dnnl_query_weights_md))
        diffSrc = memory(query(dpd, dnnl_query_diff_src_md), owned: false)
        diffDstWeights = memory(query(wpd, dnnl_query_diff_dst_md), owned: false)
        diffWeights = memory(query(wpd, dnnl_query_diff_weights_md))
        let sameSource = dnnl_memory_desc_equal(query(fpd, dnnl_query_src_md), query(wpd, dnnl_query_src_md)) != 0
        srcForWeights = sameSource ? nil : memory(query(wpd, dnnl_query_src_md), owned: false)
        xUser = memory(&xCM, owned: false); yUser = memory(&yCM, owned: false)
        wUser = memory(&wPlain, owned: false); dwUser = memory(&wPlain, owned: false)
        dyUser = memory(&yCM, owned: false); dxUser = memory(&xCM, owned: false)
        toSrc = blockedSource ? nil : reorder(&xCM, query(fpd, dnnl_query_src_md))
        toWeightsForward = reorder(&wPlain, query(fpd, dnnl_query_weights_md))
        fromDst = blockedDestination ? nil : reorder(query(fpd, dnnl_query_dst_md), &yCM)
        toSrcForWeights = sameSource ? nil : reorder(query(fpd, dnnl_query_src_md), query(wpd, dnnl_query_src_md))
        toDiffDstData = blockedDestination ? nil : reorder(&yCM, query(dpd, dnnl_query_diff_dst_md))
        toDiffDstWeights = blockedDestination ? nil : reorder(&yCM, query(wpd, dnnl_query_diff_dst_md))
        toWeightsData = sameWeights ? nil : reorder(&wPlain, query(dpd, dnnl_query_weights_md))
        fromDiffSrc = blockedSource ? nil : reorder(query(dpd, dnnl_query_diff_src_md), &xCM)
        addFromDiffSrc = blockedSource ? nil : reorder(query(dpd, dnnl_query_diff_src_md), &xCM, accumulate: true)
        fromDiffWeights = reorder(query(wpd, dnnl_query_diff_weights_md), &wPlain)
        self.descriptors = descriptors
        self.memories = memories
        self.primitives = primitives
    }

    static func implementationName(_ pd: dnnl_primitive_desc_t) -> String {
        var name: UnsafePointer<CChar>?
        guard dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &name) == dnnl_success, let name else { return "unknown" }
        return String(cString: name)
    }

    deinit {
        for p in primitives { dnnl_primitive_destroy(p) }
        for m in memories { dnnl_memory_destroy(m) }
        for d in descriptors { dnnl_primitive_desc_destroy(d) }
    }

    private func run(_ p: dnnl_primitive_t, _ args: [(Int32, dnnl_memory_t)]) {
        var a = args.map { dnnl_exec_arg_t(arg: $0.0, memory: $0.1) }
        DirectConvolution.check(dnnl_primitive_execute(p, DirectConvolution.stream, Int32(a.count), &a), "primitive_execute")
    }
    private func bind(_ m: dnnl_memory_t, _ p: UnsafeRawPointer) {
        DirectConvolution.check(dnnl_memory_set_data_handle(m, UnsafeMutableRawPointer(mutating: p)), "memory_set_data_handle")
    }
    /// Binds `m` to `buffer`, grown to `m`'s size.
    private func bind(_ m: dnnl_memory_t, scratch buffer: FloatBuffer) {
        var md: UnsafePointer<dnnl_memory_desc_t>?
        DirectConvolution.check(dnnl_memory_get_memory_desc(m, &md), "memory_get_memory_desc")
        bind(m, buffer.reserve((dnnl_memory_desc_get_size(md) + 3) / 4))
    }
    private static let from: Int32 = 1, to: Int32 = 17  // DNNL_ARG_FROM, DNNL_ARG_TO
    private static let argSrc: Int32 = 1, argDst: Int32 = 17, argWeights: Int32 = 33
    private static let argDiffSrc: Int32 = 129, argDiffDst: Int32 = 145, argDiffWeights: Int32 = 161

    /// y = W ∗ x (no bias); keeps x (in oneDNN's format) for `backward`. A blocked x must stay
    /// unchanged until then.
    func forward(x: UnsafePointer<Float>, weight: UnsafePointer<Float>, into y: UnsafeMutablePointer<Float>) {
        typealias D = DirectConvolution
        bind(wUser, weight)
        run(toWeightsForward, [(D.from, wUser), (D.to, weightsForward)])
        if let toSrc {
            bind(xUser, x)
            run(toSrc, [(D.from, xUser), (D.to, src)])
        } else {
            bind(src, x)
        }
        if let fromDst {
            bind(yUser, y); bind(dst, scratch: scratch.0)
            run(forwardPrimitive, [(D.argSrc, src), (D.argWeights, weightsForward), (D.argDst, dst)])
            run(fromDst, [(D.from, dst), (D.to, yUser)])
        } else {
            bind(dst, y)
            run(forwardPrimitive, [(D.argSrc, src), (D.argWeights, weightsForward), (D.argDst, dst)])
        }
        DirectConvolution.check(dnnl_stream_wait(DirectConvolution.stream), "stream_wait")
    }

    /// dW = dy ⋆ x (overwriting `dw`); dx = Wᵀ ∗ dy written into (or, with `accumulate`, added to) `dx`.
    /// The weights are those of the last `forward` (reordered then).
    func backward(dy: UnsafePointer<Float>, weight: UnsafePointer<Float>, dw: UnsafeMutablePointer<Float>,
                  dx: UnsafeMutablePointer<Float>?, accumulate: Bool) {
        typealias D = DirectConvolution
        bind(dyUser, dy); bind(wUser, weight); bind(dwUser, dw)
        if let toDiffDstWeights {
            bind(diffDstWeights, scratch: scratch.0)
            run(toDiffDstWeights, [(D.from, dyUser), (D.to, diffDstWeights)])
        } else {
            bind(diffDstWeights, dy)
        }
        var source = src
        if let toSrcForWeights, let srcForWeights {
            bind(srcForWeights, scratch: scratch.1)
            run(toSrcForWeights, [(D.from, src), (D.to, srcForWeights)])
            source = srcForWeights
        }
        run(weightsPrimitive, [(D.argSrc, source), (D.argDiffDst, diffDstWeights), (D.argDiffWeights, diffWeights)])
        run(fromDiffWeights, [(D.from, diffWeights), (D.to, dwUser)])
        if let dx {
            if let toDiffDstData {
                bind(diffDstData, scratch: scratch.0)
                run(toDiffDstData, [(D.from, dyUser), (D.to, diffDstData)])
            } else {
                bind(diffDstData, dy)
            }
            if let toWeightsData { run(toWeightsData, [(D.from, wUser), (D.to, weightsData)]) }
            bind(dxUser, dx)
            let direct = fromDiffSrc == nil && !accumulate  // blocked dx written in place
            if direct { bind(diffSrc, dx) } else { bind(diffSrc, scratch: scratch.1) }
            run(dataPrimitive, [(D.argDiffDst, diffDstData), (D.argWeights, weightsData), (D.argDiffSrc, diffSrc)])
            if let reorder = accumulate ? addFromDiffSrc : fromDiffSrc { run(reorder, [(D.from, diffSrc), (D.to, dxUser)]) }
            DirectConvolution.check(dnnl_stream_wait(DirectConvolution.stream), "stream_wait")
            if fromDiffSrc == nil && accumulate { addBlocked(dx) }
        }
        DirectConvolution.check(dnnl_stream_wait(DirectConvolution.stream), "stream_wait")
    }

    /// dx += the blocked input gradient left in scratch.1.
    private func addBlocked(_ dx: UnsafeMutablePointer<Float>) {
        var md: UnsafePointer<dnnl_memory_desc_t>?
        DirectConvolution.check(dnnl_memory_get_memory_desc(diffSrc, &md), "memory_get_memory_desc")
        BlockedKernels.add(scratch.1.pointer, into: dx, count: dnnl_memory_desc_get_size(md) / 4)
    }
}
