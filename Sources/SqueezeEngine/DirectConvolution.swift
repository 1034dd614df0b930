import CDNNL

/// oneDNN's convolution primitives (forward, backward data, backward weights) for one k×k
/// convolution shape, with reorders between the engine's channel-major (C, N, H, W) layout and the
/// blocked formats oneDNN picks (nChw8c on AVX2). No bias (the engine adds it with ReLU/BatchNorm).
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
    private let srcForWeights: dnnl_memory_t?, diffDstData: dnnl_memory_t, diffDstWeights: dnnl_memory_t
    private let weightsData: dnnl_memory_t, diffSrc: dnnl_memory_t, diffWeights: dnnl_memory_t
    // the engine's buffers (handles set per call)
    private let xUser: dnnl_memory_t, yUser: dnnl_memory_t, wUser: dnnl_memory_t
    private let dyUser: dnnl_memory_t, dxUser: dnnl_memory_t, dwUser: dnnl_memory_t
    private let toSrc: dnnl_primitive_t, toWeightsForward: dnnl_primitive_t, fromDst: dnnl_primitive_t
    private let toSrcForWeights: dnnl_primitive_t?, toDiffDstData: dnnl_primitive_t, toDiffDstWeights: dnnl_primitive_t
    private let toWeightsData: dnnl_primitive_t, fromDiffSrc: dnnl_primitive_t, addFromDiffSrc: dnnl_primitive_t
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

    /// x (cin, n, h, w) → y (cout, n, ho, wo), weights (cout, cin, k, k); `scratch` holds the blocked
    /// tensors that live only inside one call.
    init(cin: Int, cout: Int, kernel k: Int, stride: Int, padding p: Int, n: Int, h: Int, w: Int, ho: Int, wo: Int,
         scratch: (FloatBuffer, FloatBuffer)) {
        self.n = n
        self.scratch = scratch
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
        var srcAny = md([n, cin, h, w], tag: dnnl_format_tag_any), dstAny = md([n, cout, ho, wo], tag: dnnl_format_tag_any)
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

        forwardPrimitive = primitive(fpd); dataPrimitive = primitive(dpd); weightsPrimitive = primitive(wpd)
        src = memory(query(fpd, dnnl_query_src_md)); weightsForward = memory(query(fpd, dnnl_query_weights_md))
        dst = memory(query(fpd, dnnl_query_dst_md), owned: false)
        diffDstData = memory(query(dpd, dnnl_query_diff_dst_md), owned: false); weightsData = memory(query(dpd, dnnl_query_weights_md))
        diffSrc = memory(query(dpd, dnnl_query_diff_src_md), owned: false)
        diffDstWeights = memory(query(wpd, dnnl_query_diff_dst_md), owned: false)
        diffWeights = memory(query(wpd, dnnl_query_diff_weights_md))
        let sameSource = dnnl_memory_desc_equal(query(fpd, dnnl_query_src_md), query(wpd, dnnl_query_src_md)) != 0
        srcForWeights = sameSource ? nil : memory(query(wpd, dnnl_query_src_md), owned: false)
        xUser = memory(&xCM, owned: false); yUser = memory(&yCM, owned: false)
        wUser = memory(&wPlain, owned: false); dwUser = memory(&wPlain, owned: false)
        dyUser = memory(&yCM, owned: false); dxUser = memory(&xCM, owned: false)
        toSrc = reorder(&xCM, query(fpd, dnnl_query_src_md))
        toWeightsForward = reorder(&wPlain, query(fpd, dnnl_query_weights_md))
        fromDst = reorder(query(fpd, dnnl_query_dst_md), &yCM)
        toSrcForWeights = sameSource ? nil : reorder(query(fpd, dnnl_query_src_md), query(wpd, dnnl_query_src_md))
        toDiffDstData = reorder(&yCM, query(dpd, dnnl_query_diff_dst_md))
        toDiffDstWeights = reorder(&yCM, query(wpd, dnnl_query_diff_dst_md))
        toWeightsData = reorder(&wPlain, query(dpd, dnnl_query_weights_md))
        fromDiffSrc = reorder(query(dpd, dnnl_query_diff_src_md), &xCM)
        addFromDiffSrc = reorder(query(dpd, dnnl_query_diff_src_md), &xCM, accumulate: true)
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

    /// y = W ∗ x (no bias), both channel-major; keeps x in oneDNN's format for `backward`.
    func forward(x: UnsafePointer<Float>, weight: UnsafePointer<Float>, into y: UnsafeMutablePointer<Float>) {
        typealias D = DirectConvolution
        bind(xUser, x); bind(wUser, weight); bind(yUser, y); bind(dst, scratch: scratch.0)
        run(toSrc, [(D.from, xUser), (D.to, src)])
        run(toWeightsForward, [(D.from, wUser), (D.to, weightsForward)])
        run(forwardPrimitive, [(D.argSrc, src), (D.argWeights, weightsForward), (D.argDst, dst)])
        run(fromDst, [(D.from, dst), (D.to, yUser)])
        DirectConvolution.check(dnnl_stream_wait(DirectConvolution.stream), "stream_wait")
    }

    /// dW = dy ⋆ x (overwriting `dw`); dx = Wᵀ ∗ dy written into (or, with `accumulate`, added to) `dx`.
    func backward(dy: UnsafePointer<Float>, weight: UnsafePointer<Float>, dw: UnsafeMutablePointer<Float>,
                  dx: UnsafeMutablePointer<Float>?, accumulate: Bool) {
        typealias D = DirectConvolution
        bind(dyUser, dy); bind(wUser, weight); bind(dwUser, dw); bind(diffDstWeights, scratch: scratch.0)
        run(toDiffDstWeights, [(D.from, dyUser), (D.to, diffDstWeights)])
        var source = src
        if let toSrcForWeights, let srcForWeights {
            bind(srcForWeights, scratch: scratch.1)
            run(toSrcForWeights, [(D.from, src), (D.to, srcForWeights)])
            source = srcForWeights
        }
        run(weightsPrimitive, [(D.argSrc, source), (D.argDiffDst, diffDstWeights), (D.argDiffWeights, diffWeights)])
        run(fromDiffWeights, [(D.from, diffWeights), (D.to, dwUser)])
        if let dx {
            bind(dxUser, dx); bind(diffDstData, scratch: scratch.0); bind(diffSrc, scratch: scratch.1)
            run(toDiffDstData, [(D.from, dyUser), (D.to, diffDstData)])
            run(toWeightsData, [(D.from, wUser), (D.to, weightsData)])
            run(dataPrimitive, [(D.argDiffDst, diffDstData), (D.argWeights, weightsData), (D.argDiffSrc, diffSrc)])
            run(accumulate ? addFromDiffSrc : fromDiffSrc, [(D.from, diffSrc), (D.to, dxUser)])
        }
        DirectConvolution.check(dnnl_stream_wait(DirectConvolution.stream), "stream_wait")
    }
}
