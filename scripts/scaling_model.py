"""The α–β–γ cost model of one training step of squeezetrain (docs/communication-study.md, "Scaling").

Times are seconds, sizes bytes. A link is (α, β, γ): α seconds per message, β seconds per byte on
the wire, γ seconds per byte reduced. For an all-reduce of n bytes among p workers:

  ring   2(p−1)α + 2(p−1)/p·nβ + (p−1)/p·nγ           reduce-scatter + all-gather (RingAllReduce)
  star   2pα + p·(n + φc)β + (p−1)·nγ                  the hub handles 2p messages a chunk, and its
                                                       link carries p·n each way; it
                                                       receives chunk k while it sends chunk k−1,
                                                       so in and out overlap but for one chunk
                                                       c = min(n, 1 MiB) (StarAllReduceHub)
  tree   2Dα + (d·n + φ(2D−1)·c)β + min(2, p−1)·nγ         binary tree (rank r's parent (r−1)/2, as
                                                       branch `tree`'s TreeAllReduce): partial sums
                                                       up, the average down, chunk by chunk; the
                                                       busiest rank's link carries d·n each way
                                                       (d = its children + its parent: 1 for p = 2,
                                                       2 for p = 3, 4, else 3), plus a chunk per
                                                       level up and down to fill the pipe, D = ⌊log2 p⌋

φ ("fill" in a link, default 1) is the share of that pipeline fill a machine actually pays: 1 if every
hop stores and forwards whole chunks in turn, less where sends overlap (fitted by `fit_link`).

A codec sends w bytes per float (none 4, fp16/bf16 2, int8 1) and costs `codec_s` seconds per float
it encodes or decodes; top-k:f all-gathers k = f·P (index, value) pairs of 8 bytes instead
(ring: p−1 steps of 8k bytes; star: the hub returns the union, ≤ min(p·k, P) pairs, to each worker).

A step: forward, then backward hands buckets (≥ 1 MB of whole layers, last layer first, as
BucketedReducer.bucketPlan does) to one communication thread as their layers finish; the thread
reduces them one after another. Bucket k is ready when backward has done the layers from the end
down to its lowest one (backward time shared among layers in proportion to their multiply-adds),
and finishes at max(ready_k, finish_{k−1}) + T(bucket_k). Only what is left after backward is
exposed:

  step = compute + max(0, finish_last − (forward + backward)) + overhead

so a model whose big layers are last (AlexNet's classifier) hides most of its traffic under the
backward of its convolutions, while its link is slow enough that most of the traffic is exposed.
"""
import math
import statistics

LINK_RATES = {"100mbit": 100e6, "1gbit": 1e9, "10gbit": 10e9, "100gbit": 100e9}
WIRE_BYTES = {"none": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0}
CHUNK_BYTES = 1 << 20   # CollectiveOptions().chunkBytes: the unit of pipelining and of int8 scales
BUCKET_BYTES = 1 << 20  # the cluster's bucket size (BucketedReducer)


def ring(p, n, link):
    a, b, g = link["alpha"], link["beta"], link["gamma"]
    return 0.0 if p < 2 else 2 * (p - 1) * a + 2 * (p - 1) / p * n * b + (p - 1) / p * n * g


def star(p, n, link):
    a, b, g, f = link["alpha"], link["beta"], link["gamma"], link.get("fill", 1.0)
    return 0.0 if p < 2 else 2 * p * a + p * (n + f * min(n, CHUNK_BYTES)) * b + (p - 1) * n * g


def tree_degree(p):
    """Most tree edges at one rank: children (2r+1, 2r+2 below p) plus a parent (r > 0)."""
    return max(len([c for c in (2 * r + 1, 2 * r + 2) if c < p]) + (r > 0) for r in range(min(p, 2)))


def tree(p, n, link):
    a, b, g, f = link["alpha"], link["beta"], link["gamma"], link.get("fill", 1.0)
    if p < 2:
        return 0.0
    depth = int(math.log2(p))
    return 2 * depth * a + (tree_degree(p) * n + f * (2 * depth - 1) * min(n, CHUNK_BYTES)) * b + min(2, p - 1) * n * g


ALGORITHMS = {"ring": ring, "star": star, "tree": tree}


def allreduce_seconds(algorithm, p, floats, link, compress="none", codec_s=None):
    """One all-reduce of `floats` Float32 values among p workers, with a codec."""
    if p < 2:
        return 0.0
    codec_s = codec_s or {}
    if compress.startswith("topk"):
        k = max(1, round(float(compress.split(":")[1]) * floats))
        select = codec_s.get("topk", 0.0) * floats             # choosing k of P, adding the pairs back
        if algorithm == "ring":                                # all-gather of every worker's pairs
            return select + (p - 1) * (link["alpha"] + 8 * k * link["beta"]) + (p - 1) * 8 * k * link["gamma"]
        if algorithm == "star":
            union = min(p * k, floats)
            return select + 2 * p * link["alpha"] + p * 8 * max(k, union) * link["beta"] + p * 8 * k * link["gamma"]
        return None                                            # the tree refuses top-k
    w = WIRE_BYTES[compress]
    n = floats * w + (4 * math.ceil(floats * w / CHUNK_BYTES) if compress == "int8" else 0)
    coded = {"ring": 2 * (p - 1) / p, "star": 2, "tree": 2 * tree_degree(p)}[algorithm] * floats
    return ALGORITHMS[algorithm](p, n, link) + codec_s.get(compress, 0.0) * coded


def bucket_plan(layers, bucket_bytes=BUCKET_BYTES):
    """BucketedReducer.bucketPlan: whole layers from the last, until a bucket holds ≥ bucket_bytes.
    `layers` are dicts with "parameters" and "macs", first layer first; returns (floats, macs from
    the end through the bucket's lowest layer) per bucket, in the order they are reduced."""
    buckets, floats, done = [], 0, 0
    for layer in reversed(layers):
        if layer["parameters"] == 0:
            done += layer["macs"]
            continue
        floats += layer["parameters"]
        done += layer["macs"]
        if floats * 4 >= bucket_bytes:
            buckets.append((floats, done))
            floats = 0
    if floats:
        buckets.append((floats, done))
    return buckets


def step_seconds(model, p, link, algorithm="ring", compress="none", compute=None, codec_s=None, sharing=1.0):
    """Predicted step time of one worker, and its parts. `model` holds the layer table ("layers"),
    the compute split ("forward_share", "backward_share": shares of compute) and "overhead_seconds";
    `compute` is the worker's forward + backward + optimizer time. `sharing` ≥ 1: how much slower
    the all-reduce runs while backward runs beside it, when both want the same CPU (processor
    sharing: 2 when the all-reduce is bound by the CPU, not the wire, and a compute thread joins
    each communication thread; 1 when the wire bounds it)."""
    total_macs = sum(layer["macs"] for layer in model["layers"])
    forward = compute * model["forward_share"]
    backward = compute * model["backward_share"]
    end = forward + backward
    finish, busy = forward, 0.0
    for floats, macs_done in bucket_plan(model["layers"]):
        ready = forward + backward * macs_done / total_macs
        t = allreduce_seconds(algorithm, p, floats, link, compress, codec_s)
        start = max(ready, finish)
        shared = max(0.0, min(end - start, t * sharing))   # time spent beside backward, at 1/sharing speed
        finish = start + shared + (t - shared / sharing)
        busy += finish - start
    exposed = max(0.0, finish - (forward + backward))
    return {"step_seconds": compute + exposed + model["overhead_seconds"], "compute_seconds": compute,
            "allreduce_seconds": busy, "exposed_seconds": exposed}


def link_from_rate(rate_bits, alpha, gamma, efficiency=1.0):
    """A link known only by its rate: β = 8 / (rate × efficiency), with a measured α and γ."""
    return {"alpha": alpha, "beta": 8 / (rate_bits * efficiency), "gamma": gamma}


def scaling(model, link, algorithm, compress, workers, batch, per_image, step_overhead, codec_s=None, weak=False):
    """Speedup and efficiency against 1 worker for p in `workers`, one core per worker.
    Strong scaling: `batch` is the global batch, split over p. Weak: `batch` images per worker."""
    def one(p):
        b = batch if weak else batch / p
        compute = step_overhead + per_image * b
        s = step_seconds(model, p, link, algorithm, compress, compute, codec_s)["step_seconds"]
        return s, (b * p) / s
    t1, rate1 = one(1)
    rows = []
    for p in workers:
        s, rate = one(p)
        speedup = rate / rate1
        rows.append({"workers": p, "step_seconds": s, "images_per_second": rate, "speedup": speedup,
                     "efficiency": speedup / p})
    return rows


def stops_scaling(rows, threshold=0.5):
    """The smallest N whose efficiency is below `threshold`, or None."""
    return next((r["workers"] for r in rows if r["efficiency"] < threshold), None)


def fit_link(runs, small_bytes=4096, fill=None):
    """α, β and the fill φ from timed all-reduces. α from the small messages (≤ small_bytes); β by least
    squares through the larger ones, in absolute seconds, so that the largest messages, which carry
    the bytes that matter, set it; each with the other's term subtracted (three rounds settle it).
    The star's and the tree's pipeline fill (φ times the textbook chunks, "fill" in a link) is fitted
    together with β when the runs have three or more sizes above small_bytes, both by least squares in
    relative error, so that one chunk's worth counts as much as 64 MiB; otherwise φ is `fill` (None: 1,
    the textbook store-and-forward of whole chunks). `runs` are (algorithm, p, n bytes, seconds)."""
    rows = [(n <= small_bytes, t, coefficients(a, p, n, fill=0.0), fill_coefficient(a, p, n)) for a, p, n, t in runs]
    large = [(t, c, f) for is_small, t, c, f in rows if not is_small]
    free = len({c[1] for _, c, _ in large}) >= 3 and any(f for _, _, f in large)
    alpha, beta, phi = 0.0, 0.0, 1.0 if fill is None else fill
    for _ in range(3):
        small = [(t - beta * (c[1] + phi * f)) / c[0] for is_small, t, c, f in rows if is_small]
        alpha = max(0.0, statistics.median(small)) if small else 0.0
        if free:  # t − α·cα = β·cβ + (βφ)·c_fill, each row divided by t: two normal equations
            y = [((t - alpha * c[0]) / t, c[1] / t, f / t) for t, c, f in large]
            saa, sff, saf = (sum(a * a for _, a, _ in y), sum(f * f for _, _, f in y), sum(a * f for _, a, f in y))
            sya, syf = sum(v * a for v, a, _ in y), sum(v * f for v, _, f in y)
            det = saa * sff - saf * saf
            beta, psi = (sya * sff - syf * saf) / det, (saa * syf - saf * sya) / det
            phi = max(0.0, psi / beta) if beta > 0 else 1.0
        if not free or beta <= 0 or psi < 0:
            cols = [(t - alpha * c[0], c[1] + phi * f) for t, c, f in large]
            beta = sum(t * cb for t, cb in cols) / sum(cb * cb for _, cb in cols) if cols else 0.0
    return alpha, max(0.0, beta), phi


def fill_coefficient(algorithm, p, n):
    """β's coefficient in the pipeline fill alone (φ = 1): the star's and the tree's chunks of fill, 0 for the ring."""
    unit = {"alpha": 0.0, "beta": 1.0, "gamma": 0.0}
    return ALGORITHMS[algorithm](p, n, {**unit, "fill": 1.0}) - ALGORITHMS[algorithm](p, n, {**unit, "fill": 0.0})


def coefficients(algorithm, p, n, fill=1.0):
    """(α, β, γ) coefficients of one all-reduce of n bytes among p: T = cα·α + cβ·β + cγ·γ."""
    zero = {"alpha": 0.0, "beta": 0.0, "gamma": 0.0, "fill": fill}
    return [ALGORITHMS[algorithm](p, n, {**zero, k: 1.0}) for k in ("alpha", "beta", "gamma")]


def self_test():
    """The formulas on cases worked by hand (the expected figures are literals, their arithmetic in the
    comments, so a mistake in a formula cannot be copied into its check). Returns the failed checks,
    [] when all agree; plain comparisons, not `assert`, so that `python3 -O` still checks."""
    failures = []

    def check(ok, what):
        if not ok:
            failures.append(what)

    def near(got, want, what):
        check(abs(got - want) <= 1e-12 + 1e-9 * abs(want), f"{what}: {got!r}, worked by hand {want!r}")

    link = {"alpha": 1e-4, "beta": 8e-8, "gamma": 1e-9}
    n = 4e6
    # 2·1α = 0.0002; 2·1/2 · 4e6 · 8e-8 = 0.32; 1/2 · 4e6 · 1e-9 = 0.002
    near(ring(2, n, link), 0.3222, "ring p=2 n=4e6")
    # 2·3α = 0.0006; 2·3/4 · 4e6 · 8e-8 = 0.48; 3/4 · 4e6 · 1e-9 = 0.003
    near(ring(4, n, link), 0.4836, "ring p=4 n=4e6")
    # 2·4α = 0.0008; 4 · (4,000,000 + 1,048,576) · 8e-8 = 20,194,304 · 8e-8 = 1.61554432; 3 · 4e6 · 1e-9 = 0.012
    near(star(4, n, link), 1.62834432, "star p=4 n=4e6")
    # one chunk, in then out: 0.0008; 4 · (1e5 + 1e5) · 8e-8 = 0.064; 3 · 1e5 · 1e-9 = 0.0003
    near(star(4, 1e5, link), 0.0651, "star p=4 n=1e5")
    # p=2: rank 0 has child 1; p=3, 4: rank 0 has 2 children (rank 1 of p=4: parent + child 3);
    # p=5: rank 1 has parent 0 and children 3, 4
    check([tree_degree(p) for p in (2, 3, 4, 5, 1024)] == [1, 2, 2, 3, 3], "tree degrees")
    # D = 3: 6α = 0.0006; (3 · 4e6 + 5 · 1,048,576) · 8e-8 = 17,242,880 · 8e-8 = 1.3794304; 2 · 4e6 · 1e-9 = 0.008
    near(tree(8, n, link), 1.3880304, "tree p=8 n=4e6")
    # one chunk, up then down: 2α = 0.0002; (1e5 + 1e5) · 8e-8 = 0.016; 1 · 1e5 · 1e-9 = 0.0001
    near(tree(2, 1e5, link), 0.0163, "tree p=2 n=1e5")
    check(ring(1, n, link) == star(1, n, link) == tree(1, n, link) == 0, "one worker communicates nothing")
    # The ring's bandwidth term tends to 2nβ: per-worker traffic does not grow with p; the star's does.
    check(ring(1024, n, link) < 0.64 + 0.004 + 0.2048, "ring p=1024 below 2nβ + nγ + 2048α")
    check(star(1024, n, link) > 1000 * 0.32, "star p=1024 above 1000 nβ")
    check(coefficients("ring", 4, n) == [6, 6e6, 3e6], f"ring coefficients {coefficients('ring', 4, n)}")
    # fp16 sends 2 bytes per float: 1e6 floats are 2e6 bytes: 0.0006 + 1.5 · 2e6 · 8e-8 (0.24) + 0.75 · 2e6 · 1e-9 (0.0015)
    near(allreduce_seconds("ring", 4, 1e6, link, "fp16"), 0.2421, "ring fp16 p=4 1e6 floats")
    # top-k: k = 1e4 pairs, 8e4 bytes, gathered in 3 steps: 3 · (1e-4 + 8e4 · 8e-8) = 0.0195; 3 · 8e4 · 1e-9 = 0.00024
    near(allreduce_seconds("ring", 4, 1e6, link, "topk:0.01"), 0.01974, "ring topk:0.01 p=4 1e6 floats")
    # Buckets: whole layers from the end, closed at ≥ 1 MB.
    layers = [{"parameters": 100_000, "macs": 10}, {"parameters": 300_000, "macs": 30}, {"parameters": 0, "macs": 5},
              {"parameters": 10, "macs": 1}]
    check(bucket_plan(layers) == [(300_010, 36), (100_000, 46)], f"bucket plan {bucket_plan(layers)}")
    # Overlap. One bucket of 262,144 floats = 1,048,576 bytes between 2 workers takes
    # 2α (0.0002) + 1,048,576 · 8e-8 (0.08388608) + 1,048,576 / 2 · 1e-9 (0.000524288) = 0.084610368 s.
    near(allreduce_seconds("ring", 2, 262_144, link), 0.084610368, "ring p=2 of one bucket")
    # Ready only at the end of backward (its layer is the first): fully exposed, 1 + 0.084610368.
    model = {"layers": [{"parameters": 262_144, "macs": 1}, {"parameters": 0, "macs": 0}], "forward_share": 0.25,
             "backward_share": 0.75, "overhead_seconds": 0.0}
    near(step_seconds(model, 2, link, compute=1.0)["step_seconds"], 1.084610368, "a bucket ready at the end")
    # Ready when backward starts (its layer is the last), 0.75 s of backward hide it whole.
    model["layers"] = [{"parameters": 0, "macs": 1}, {"parameters": 262_144, "macs": 0}]
    near(step_seconds(model, 2, link, compute=1.0)["step_seconds"], 1.0, "a bucket hidden by backward")
    # compute 0.01: ready at 0.0025, done at 0.087110368, 0.077110368 after backward ends (0.01).
    near(step_seconds(model, 2, link, compute=0.01)["step_seconds"], 0.087110368, "a bucket partly hidden")
    # Sharing the CPU with backward: the 0.0075 s beside it do half the work (0.00375 s of it), so it
    # ends at 0.0025 + 0.0075 + (0.084610368 − 0.00375) = 0.090860368.
    near(step_seconds(model, 2, link, compute=0.01, sharing=2)["step_seconds"], 0.090860368, "sharing the CPU")
    # The fit recovers α and β from exact ring and star times (γ = 0: it is folded into β).
    exact = {**link, "gamma": 0.0}
    runs = [(a, p, m, ALGORITHMS[a](p, m, exact)) for a in ("ring", "star") for p in (2, 4) for m in (1024, 4e6, 64e6)]
    alpha, beta, fill = fit_link(runs)
    check(abs(beta - 8e-8) <= 8e-11 and abs(alpha - 1e-4) <= 1e-6 and abs(fill - 1.0) <= 1e-6,
          f"fit gave alpha {alpha}, beta {beta}, fill {fill}")
    # ... and a fill of 0.3 from a tree's times at three sizes above 4 KiB (at two, φ stays as given).
    part = {**exact, "fill": 0.3}
    runs = [("tree", 4, m, tree(4, m, part)) for m in (1024, 1e6, 4e6, 64e6)]
    alpha, beta, fill = fit_link(runs)
    check(abs(beta - 8e-8) <= 8e-11 and abs(fill - 0.3) <= 1e-6, f"tree fit gave beta {beta}, fill {fill}")
    check(fit_link(runs[:3])[2] == 1.0 and fit_link(runs[:3], fill=0.3)[2] == 0.3, "two sizes keep the given fill")
    # Strong scaling with a perfect link is linear; efficiency falls when communication dominates.
    free = {"alpha": 0.0, "beta": 0.0, "gamma": 0.0}
    rows = scaling(model, free, "ring", "none", [2, 4], 64, 0.01, 0.0)
    check(all(abs(r["efficiency"] - 1.0) <= 1e-9 for r in rows), f"efficiency on a free link {rows}")
    check(stops_scaling(scaling(model, link, "star", "none", [2, 4, 8, 16, 32], 64, 1e-3, 0.0)) is not None,
          "the star never stops scaling")
    return failures
