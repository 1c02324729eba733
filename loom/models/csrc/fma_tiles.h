/* What the float32 FMA kernels over 16-output-row tiles share (int4_matmul.c, q8_matmul.c): the
   switch that turns a run-time row count into a constant one (so accumulators stay in registers),
   and, for two tiles whose weights are already floats in L1, one block of 32 inputs against up to
   8 activation rows. */
#ifndef LOOM_FMA_TILES_H
#define LOOM_FMA_TILES_H
#include <stdint.h>

#define TILES_UP_TO_4(CALL, TILE)                                                                          \
    switch (TILE) {                                                                                        \
    case 1: CALL(1); break;                                                                                \
    case 2: CALL(2); break;                                                                                \
    case 3: CALL(3); break;                                                                                \
    default: CALL(4); break;                                                                               \
    }
#define TILES_UP_TO_8(CALL, TILE)                                                                          \
    switch (TILE) {                                                                                        \
    case 1: CALL(1); break;                                                                                \
    case 2: CALL(2); break;                                                                                \
    case 3: CALL(3); break;                                                                                \
    case 4: CALL(4); break;                                                                                \
    case 5: CALL(5); break;                                                                                \
    case 6: CALL(6); break;                                                                                \
    case 7: CALL(7); break;                                                                                \
    default: CALL(8); break;                                                                               \
    }

#ifdef __AVX512F__
#include <immintrin.h>
#define PAIR_ROWS 8 /* activation rows a pass: 16 accumulators of 32 registers */

/* part[r][h] = sum over the block's 32 inputs j of wf[h][j] * x[r][32 * b + j], j in order (rows
   of x `k` apart): FMA-bound, two weight loads and `tile` broadcasts for 2 x `tile` FMAs. */
static inline __attribute__((always_inline)) void pair_block(const float wf[2][32][16], const float *xf, int64_t k,
                                                             int64_t b, int64_t tile, __m512 part[][2]) {
    for (int64_t r = 0; r < tile; r++) part[r][0] = part[r][1] = _mm512_setzero_ps();
    for (int64_t j = 0; j < 32; j++) {
        const __m512 w0 = _mm512_load_ps(wf[0][j]), w1 = _mm512_load_ps(wf[1][j]);
        for (int64_t r = 0; r < tile; r++) {
            const __m512 x = _mm512_set1_ps(xf[r * k + 32 * b + j]);
            part[r][0] = _mm512_fmadd_ps(w0, x, part[r][0]);
            part[r][1] = _mm512_fmadd_ps(w1, x, part[r][1]);
        }
    }
}
#endif
#endif
