/* Per-layer convolution timing for the recipe's model (SqueezeNet 1.1, CIFAR stem, late downsampling):
   the engine's algorithm (im2col + dnnl_sgemm on the channel-major (C, N·H·W) layout, col2im for
   dx) against oneDNN's convolution primitives (forward, backward data, backward weights) in the
   layout oneDNN prefers (format "any": blocked nChw8c/nChw16c), with the reorders between the
   engine's channel-major layout and that format timed separately.
   Build: cc -O2 scripts/bench-conv-layers.c -o /tmp/bench-conv -ldnnl
   Run:   OMP_NUM_THREADS=1 /tmp/bench-conv [BATCH]   (milliseconds per call, median of 5) */
#include <oneapi/dnnl/dnnl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define CHECK(x) do { dnnl_status_t s_ = (x); if (s_) { printf("error %d in %s\n", s_, #x); exit(1); } } while (0)

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static int cmp(const void *a, const void *b) { double x = *(double *)a, y = *(double *)b; return x < y ? -1 : x > y; }
#define REPS 5
#define TIME(var, stmt) do { double t_[REPS]; for (int r_ = 0; r_ < REPS; r_++) { double s_ = now(); stmt; t_[r_] = now() - s_; } \
    qsort(t_, REPS, sizeof(double), cmp); var = t_[REPS / 2] * 1e3; } while (0)

static dnnl_engine_t engine; static dnnl_stream_t stream;

static void im2col(const float *x, int cin, int n, int h, int w, int k, int p, float *col) {
    int cols = n * h * w;
    for (int c = 0; c < cin; c++) for (int i = 0; i < k; i++) for (int j = 0; j < k; j++) {
        float *dst = col + (size_t)((c * k + i) * k + j) * cols;
        for (int b = 0; b < n; b++) { const float *pl = x + (size_t)(c * n + b) * h * w;
            for (int oh = 0; oh < h; oh++) { int ih = oh + i - p;
                for (int ow = 0; ow < w; ow++) { int iw = ow + j - p;
                    *dst++ = (ih < 0 || ih >= h || iw < 0 || iw >= w) ? 0 : pl[ih * w + iw]; } } } }
}
static void col2im(const float *col, int cin, int n, int h, int w, int k, int p, float *dx) {
    int cols = n * h * w;
    memset(dx, 0, sizeof(float) * (size_t)cin * cols);
    for (int c = 0; c < cin; c++) for (int i = 0; i < k; i++) for (int j = 0; j < k; j++) {
        const float *src = col + (size_t)((c * k + i) * k + j) * cols;
        for (int b = 0; b < n; b++) { float *pl = dx + (size_t)(c * n + b) * h * w;
            for (int oh = 0; oh < h; oh++) { int ih = oh + i - p;
                for (int ow = 0; ow < w; ow++) { int iw = ow + j - p;
                    if (ih >= 0 && ih < h && iw >= 0 && iw < w) pl[ih * w + iw] += *src; src++; } } } }
}

static dnnl_memory_t mem(const dnnl_memory_desc_t *md) { dnnl_memory_t m; CHECK(dnnl_memory_create(&m, md, engine, DNNL_MEMORY_ALLOCATE)); return m; }
static void run(dnnl_primitive_t p, int n, dnnl_exec_arg_t *args) { CHECK(dnnl_primitive_execute(p, stream, n, args)); CHECK(dnnl_stream_wait(stream)); }
static double reorder_ms(const dnnl_memory_desc_t *from, const dnnl_memory_desc_t *to) {
    if (dnnl_memory_desc_equal(from, to)) return 0;
    dnnl_primitive_desc_t pd; CHECK(dnnl_reorder_primitive_desc_create(&pd, from, engine, to, engine, NULL));
    dnnl_primitive_t p; CHECK(dnnl_primitive_create(&p, pd));
    dnnl_memory_t a = mem(from), b = mem(to);
    dnnl_exec_arg_t args[] = {{DNNL_ARG_FROM, a}, {DNNL_ARG_TO, b}};
    double ms; run(p, 2, args); TIME(ms, run(p, 2, args));
    dnnl_memory_destroy(a); dnnl_memory_destroy(b); dnnl_primitive_destroy(p); dnnl_primitive_desc_destroy(pd);
    return ms;
}

static void layer(const char *name, int n, int cin, int cout, int k, int hw) {
    int p = k / 2, cols = n * hw * hw, depth = cin * k * k;
    float *x = calloc((size_t)cin * cols, 4), *col = calloc((size_t)depth * cols, 4), *wt = calloc((size_t)cout * depth, 4);
    float *y = calloc((size_t)cout * cols, 4), *dy = calloc((size_t)cout * cols, 4), *dw = calloc((size_t)cout * depth, 4);
    float *dcol = calloc((size_t)depth * cols, 4), *dx = calloc((size_t)cin * cols, 4);
    for (size_t i = 0; i < (size_t)cin * cols; i++) x[i] = (float)(i % 13) * 0.1f;
    for (size_t i = 0; i < (size_t)cout * depth; i++) wt[i] = (float)(i % 7) * 0.1f;
    for (size_t i = 0; i < (size_t)cout * cols; i++) dy[i] = (float)(i % 5) * 0.1f;
    double g_f, g_d, g_w;
    const float *src = x;
    if (k > 1) { TIME(g_f, (im2col(x, cin, n, hw, hw, k, p, col), dnnl_sgemm('N', 'N', cout, cols, depth, 1, wt, depth, col, cols, 0, y, cols))); src = col; }
    else TIME(g_f, dnnl_sgemm('N', 'N', cout, cols, depth, 1, wt, depth, x, cols, 0, y, cols));
    TIME(g_w, dnnl_sgemm('N', 'T', cout, depth, cols, 1, dy, cols, src, cols, 0, dw, depth));
    if (k > 1) TIME(g_d, (dnnl_sgemm('T', 'N', depth, cols, cout, 1, wt, depth, dy, cols, 0, dcol, cols), col2im(dcol, cin, n, hw, hw, k, p, dx)));
    else TIME(g_d, dnnl_sgemm('T', 'N', cin, cols, cout, 1, wt, depth, dy, cols, 0, dx, cols));

    /* oneDNN convolutions in their preferred layouts */
    dnnl_dims_t sd = {n, cin, hw, hw}, dd = {n, cout, hw, hw}, wd = {cout, cin, k, k}, bd = {cout};
    dnnl_dims_t strides = {1, 1}, pad = {p, p};
    dnnl_memory_desc_t s_any, d_any, w_any, b_md, s_cm, d_cm;
    CHECK(dnnl_memory_desc_init_by_tag(&s_any, 4, sd, dnnl_f32, dnnl_format_tag_any));
    CHECK(dnnl_memory_desc_init_by_tag(&d_any, 4, dd, dnnl_f32, dnnl_format_tag_any));
    CHECK(dnnl_memory_desc_init_by_tag(&w_any, 4, wd, dnnl_f32, dnnl_format_tag_any));
    CHECK(dnnl_memory_desc_init_by_tag(&b_md, 1, bd, dnnl_f32, dnnl_a));
    /* the engine's channel-major layout as strides: (N, C, H, W) with C outermost */
    dnnl_dims_t s_str = {hw * hw, (dnnl_dim_t)n * hw * hw, hw, 1}, d_str = {hw * hw, (dnnl_dim_t)n * hw * hw, hw, 1};
    CHECK(dnnl_memory_desc_init_by_strides(&s_cm, 4, sd, dnnl_f32, s_str));
    CHECK(dnnl_memory_desc_init_by_strides(&d_cm, 4, dd, dnnl_f32, d_str));
    dnnl_convolution_desc_t fd, bdd, bwd;
    CHECK(dnnl_convolution_forward_desc_init(&fd, dnnl_forward_training, dnnl_convolution_direct, &s_any, &w_any, &b_md, &d_any, strides, pad, pad));
    dnnl_primitive_desc_t fpd; CHECK(dnnl_primitive_desc_create(&fpd, &fd, NULL, engine, NULL));
    CHECK(dnnl_convolution_backward_data_desc_init(&bdd, dnnl_convolution_direct, &s_any, &w_any, &d_any, strides, pad, pad));
    dnnl_primitive_desc_t dpd; CHECK(dnnl_primitive_desc_create(&dpd, &bdd, NULL, engine, fpd));
    CHECK(dnnl_convolution_backward_weights_desc_init(&bwd, dnnl_convolution_direct, &s_any, &w_any, &b_md, &d_any, strides, pad, pad));
    dnnl_primitive_desc_t wpd; CHECK(dnnl_primitive_desc_create(&wpd, &bwd, NULL, engine, fpd));
    const char *impl = "?"; dnnl_primitive_desc_query(fpd, dnnl_query_impl_info_str, 0, &impl);
    const char *impl_d = "?"; dnnl_primitive_desc_query(dpd, dnnl_query_impl_info_str, 0, &impl_d);
    const char *impl_w = "?"; dnnl_primitive_desc_query(wpd, dnnl_query_impl_info_str, 0, &impl_w);
#define MD(pd, what) dnnl_primitive_desc_query_md(pd, what, 0)
    const dnnl_memory_desc_t *src_md = MD(fpd, dnnl_query_src_md), *dst_md = MD(fpd, dnnl_query_dst_md);
    /* each primitive gets memory in its own chosen formats (backward may choose other layouts) */
    dnnl_memory_t ms = mem(src_md), mw = mem(MD(fpd, dnnl_query_weights_md)), mb = mem(&b_md), md = mem(dst_md);
    dnnl_memory_t mdd = mem(MD(dpd, dnnl_query_diff_dst_md)), mdw2 = mem(MD(dpd, dnnl_query_weights_md)), mds = mem(MD(dpd, dnnl_query_diff_src_md));
    dnnl_memory_t ms3 = mem(MD(wpd, dnnl_query_src_md)), mdd3 = mem(MD(wpd, dnnl_query_diff_dst_md));
    dnnl_memory_t mdw = mem(MD(wpd, dnnl_query_diff_weights_md)), mdb = mem(&b_md);
    dnnl_primitive_t pf, pdd, pw; CHECK(dnnl_primitive_create(&pf, fpd)); CHECK(dnnl_primitive_create(&pdd, dpd)); CHECK(dnnl_primitive_create(&pw, wpd));
    dnnl_exec_arg_t fa[] = {{DNNL_ARG_SRC, ms}, {DNNL_ARG_WEIGHTS, mw}, {DNNL_ARG_BIAS, mb}, {DNNL_ARG_DST, md}};
    dnnl_exec_arg_t da[] = {{DNNL_ARG_DIFF_DST, mdd}, {DNNL_ARG_WEIGHTS, mdw2}, {DNNL_ARG_DIFF_SRC, mds}};
    dnnl_exec_arg_t wa[] = {{DNNL_ARG_SRC, ms3}, {DNNL_ARG_DIFF_DST, mdd3}, {DNNL_ARG_DIFF_WEIGHTS, mdw}, {DNNL_ARG_DIFF_BIAS, mdb}};
    double c_f, c_d, c_w;
    run(pf, 4, fa); TIME(c_f, run(pf, 4, fa));
    run(pdd, 3, da); TIME(c_d, run(pdd, 3, da));
    run(pw, 4, wa); TIME(c_w, run(pw, 4, wa));
    /* reorders a channel-major engine would pay: x in, y out, dy in (to both backward formats), dx out */
    double r_in = reorder_ms(&s_cm, src_md), r_out = reorder_ms(dst_md, &d_cm);
    double r_dy = reorder_ms(&d_cm, MD(dpd, dnnl_query_diff_dst_md)) + reorder_ms(&d_cm, MD(wpd, dnnl_query_diff_dst_md));
    double r_dx = reorder_ms(MD(dpd, dnnl_query_diff_src_md), &s_cm);
    double gemm_total = g_f + g_d + g_w, conv_total = c_f + c_d + c_w, reorders = r_in + r_out + r_dy + r_dx;
    double gflop = 2.0 * cout * depth * cols * 1e-9;
    printf("%-22s %4d %4d %dx%d %2d | %7.2f %7.2f %7.2f = %7.2f | %7.2f %7.2f %7.2f = %7.2f + reorders %6.2f | %5.1f GF/s | %s / %s / %s\n",
           name, cin, cout, k, k, hw, g_f, g_d, g_w, gemm_total, c_f, c_d, c_w, conv_total, reorders,
           gflop * 3 / (gemm_total * 1e-3), impl, impl_d, impl_w);
    fflush(stdout);
    free(x); free(col); free(wt); free(y); free(dy); free(dw); free(dcol); free(dx);
    dnnl_memory_t all[] = {ms, mw, mb, md, mdd, mdw2, mds, ms3, mdd3, mdw, mdb};
    for (int i = 0; i < 11; i++) dnnl_memory_destroy(all[i]);
    dnnl_primitive_destroy(pf); dnnl_primitive_destroy(pdd); dnnl_primitive_destroy(pw);
    dnnl_primitive_desc_destroy(fpd); dnnl_primitive_desc_destroy(dpd); dnnl_primitive_desc_destroy(wpd);
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 128;
    CHECK(dnnl_engine_create(&engine, dnnl_cpu, 0));
    CHECK(dnnl_stream_create(&stream, engine, dnnl_stream_default_flags));
    printf("batch %d; ms per call (median of %d): im2col+sgemm fwd, dx, dW = total | oneDNN conv fwd, dx, dW = total + reorders from/to channel-major\n", n, REPS);
    layer("features.0", n, 3, 64, 3, 32);
    layer("fire3.squeeze", n, 64, 16, 1, 32);
    layer("fire3/4.expand1x1", n, 16, 64, 1, 32);
    layer("fire3/4.expand3x3", n, 16, 64, 3, 32);
    layer("fire4.squeeze", n, 128, 16, 1, 32);
    layer("fire6.squeeze", n, 128, 32, 1, 16);
    layer("fire6/7.expand1x1", n, 32, 128, 1, 16);
    layer("fire6/7.expand3x3", n, 32, 128, 3, 16);
    layer("fire7.squeeze", n, 256, 32, 1, 16);
    layer("fire9.squeeze", n, 256, 48, 1, 8);
    layer("fire9/10.expand1x1", n, 48, 192, 1, 8);
    layer("fire9/10.expand3x3", n, 48, 192, 3, 8);
    layer("fire10.squeeze", n, 384, 48, 1, 8);
    layer("fire11.squeeze", n, 384, 64, 1, 8);
    layer("fire11/12.expand1x1", n, 64, 256, 1, 8);
    layer("fire11/12.expand3x3", n, 64, 256, 3, 8);
    layer("fire12.squeeze", n, 512, 64, 1, 8);
    layer("classifier.1", n, 512, 10, 1, 8);
    return 0;
}
