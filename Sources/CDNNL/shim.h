// oneDNN (libdnnl-dev, 2.x): GEMM and the CPU runtime controls used by SqueezeEngine.
#include <oneapi/dnnl/dnnl.h>

// libdnnl is built on OpenMP (libgomp); its thread count is OpenMP's.
// Declared here rather than through <omp.h>, which is not on clang's include path.
extern void omp_set_num_threads(int num_threads);
extern int omp_get_max_threads(void);
