/* The kernels' vectorized exp over an array, exported so its accuracy is tested against torch. */
#include <math.h>
#include <stdint.h>

#include "vexp.h"

void loom_exp_f32(const float *x, float *out, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, loom_exp512(_mm512_loadu_ps(x + i)));
#elif defined(__AVX2__) && defined(__FMA__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, loom_exp256(_mm256_loadu_ps(x + i)));
#endif
    for (; i < n; i++) out[i] = expf(x[i]);
}
