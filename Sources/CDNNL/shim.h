// oneDNN (libdnnl-dev, 2.x): GEMM and the CPU runtime controls used by SqueezeEngine.
#include <oneapi/dnnl/dnnl.h>

// libdnnl is built on OpenMP (libgomp); its thread count is OpenMP's.
// Declared here rather than through <omp.h>, which is not on clang's include path.
extern void omp_set_num_threads(int num_threads);
extern int omp_get_max_threads(void);

// libgomp's entry point for a parallel region (what gcc emits for `#pragma omp parallel`): runs
// fn(data) on a team of threads — the same pool oneDNN's GEMM uses, so the element-wise kernels
// and the GEMMs never compete for cores.
extern void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned int flags);
extern int omp_get_thread_num(void);
extern int omp_get_num_threads(void);
