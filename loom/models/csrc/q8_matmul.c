/* y = x @ W.T for a weight in ggml's Q8_0 form (int8 codes, one fp16 scale per 32 values of a row)
   and a few bf16 activation rows, in float32: the output head of a GGUF file read as the file
   stores it, at half the bytes of a bf16 copy (loom/models/native.py says where it pays).

   Each weight value is code * scale in float32 (exact: an 8-bit code times an 11-bit mantissa),
   multiplied by the activation in float32 and summed in float32; a row's result does not depend
   on the other rows. codes: [n, k] int8; scales: [n, k / 32] fp16 bits; x: [rows, k] bf16 with
   row stride x_stride; out: [rows, n] float32. k % 32 == 0 and rows <= Q8_MAX_ROWS (native.py). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "bf16.h"
#include "fma_tiles.h"

#if defined(__AVX512F__) || defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define Q8_MAX_ROWS 16
#define Q8_TILE 4 /* activation rows sharing one pass over a weight row's blocks */

static inline float half_to_f32(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;
    } else { /* subnormal half: normalize */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

/* One weight row against up to Q8_TILE activation rows (xf: float32, row stride k). */
static inline __attribute__((always_inline)) void q8_row(const int8_t *w, const uint16_t *s, int64_t k, const float *xf, int64_t tile, float *sums) {
#ifdef __AVX512F__
    __m512 acc[Q8_TILE];
    for (int64_t r = 0; r < tile; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < k / 32; b++) {
        const __m512 d = _mm512_set1_ps(half_to_f32(s[b]));
        const __m128i raw0 = _mm_loadu_si128((const __m128i *)(w + 32 * b));
        const __m128i raw1 = _mm_loadu_si128((const __m128i *)(w + 32 * b + 16));
        const __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw0)), d);
        const __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw1)), d);
        for (int64_t r = 0; r < tile; r++) {
            const float *x = xf + r * k + 32 * b;
            acc[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), acc[r]);
            acc[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16), acc[r]);
        }
    }
    for (int64_t r = 0; r < tile; r++) sums[r] = _mm512_reduce_add_ps(acc[r]);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc[Q8_TILE];
    for (int64_t r = 0; r < tile; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < k / 32; b++) {
        const __m256 d = _mm256_set1_ps(half_to_f32(s[b]));
        __m256 wv[4];
        for (int c = 0; c < 4; c++)
            wv[c] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + 32 * b + 8 * c)))), d);
        for (int64_t r = 0; r < tile; r++) {
            const float *x = xf + r * k + 32 * b;
            for (int c = 0; c < 4; c++) acc[r] = _mm256_fmadd_ps(wv[c], _mm256_loadu_ps(x + 8 * c), acc[r]);
        }
    }
    for (int64_t r = 0; r < tile; r++) sums[r] = f32x8_sum(acc[r]);
#else
    float acc[Q8_TILE][32];
    for (int64_t r = 0; r < tile; r++) memset(acc[r], 0, sizeof acc[r]);
    for (int64_t b = 0; b < k / 32; b++) {
        const float d = half_to_f32(s[b]);
        float wv[32];
        for (int j = 0; j < 32; j++) wv[j] = (float)w[32 * b + j] * d;
        for (int64_t r = 0; r < tile; r++)
            for (int j = 0; j < 32; j++) acc[r][j] += wv[j] * xf[r * k + 32 * b + j];
    }
    for (int64_t r = 0; r < tile; r++) {
        float total = 0.f;
        for (int j = 0; j < 32; j++) total += acc[r][j];
        sums[r] = total;
    }
#endif
}

int loom_q8_0_matmul(const uint16_t *x, int64_t x_stride, int64_t rows, const int8_t *codes, const uint16_t *scales,
                     int64_t n, int64_t k, float *out) {
    if (rows < 1 || rows > Q8_MAX_ROWS || k % 32) return 1;
    float *xf = aligned_alloc(64, (size_t)(rows * k * 4 + 63) / 64 * 64);
    if (xf == NULL) return 2;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < k; i++) xf[r * k + i] = bf16_to_f32(x[r * x_stride + i]);
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < n; o++) {
        const int8_t *w = codes + o * k;
        const uint16_t *s = scales + o * (k / 32);
        for (int64_t r0 = 0; r0 < rows; r0 += Q8_TILE) {
            const int64_t tile = rows - r0 < Q8_TILE ? rows - r0 : Q8_TILE;
            float sums[Q8_TILE];
            switch (tile) { /* a constant tile keeps the accumulators in registers */
            case 1: q8_row(w, s, k, xf + r0 * k, 1, sums); break;
            case 2: q8_row(w, s, k, xf + r0 * k, 2, sums); break;
            case 3: q8_row(w, s, k, xf + r0 * k, 3, sums); break;
            default: q8_row(w, s, k, xf + r0 * k, Q8_TILE, sums); break;
            }
            for (int64_t r = 0; r < tile; r++) out[(r0 + r) * n + o] = sums[r];
        }
    }
    free(xf);
    return 0;
}

/* Many rows: the same values (code * scale in float32) in a layout of 16 output rows per vector,
   as csrc/int4_matmul.c's float32 kernel reads int4 codes: two tiles (32 output rows) at a time,
   each block of 32 inputs turned into floats once, into L1, for every activation row, then 8
   activation rows at a time against both tiles. Where a decode step's rows are many, this is
   compute-bound; the per-row kernel above turns codes into floats again for every 4 rows.
   tcodes: [n / 16, k, 16] int8 (tile, input, lane); tscales: [n / 16, k / 32, 16] float32. */
#ifdef __AVX512F__
static inline __attribute__((always_inline)) void q8_pair_rows(const float wf[2][32][16], const float *xf, int64_t k,
                                                               int64_t b, int64_t tile, float *acc) {
    __m512 part[PAIR_ROWS][2];
    pair_block(wf, xf, k, b, tile, part);
    for (int64_t r = 0; r < tile; r++)
        for (int h = 0; h < 2; h++)
            _mm512_store_ps(acc + (2 * r + h) * 16, _mm512_add_ps(_mm512_load_ps(acc + (2 * r + h) * 16), part[r][h]));
}

static void q8_pair(const int8_t *tcodes, const float *tscales, int64_t t, int64_t k, const float *xf, int64_t rows,
                    float *acc, float *out, int64_t n) {
    const int64_t nb = k / 32;
    float wf[2][32][16] __attribute__((aligned(64)));
    memset(acc, 0, (size_t)rows * 32 * sizeof(float));
    for (int64_t b = 0; b < nb; b++) {
        for (int h = 0; h < 2; h++) {
            const int8_t *q = tcodes + ((t + h) * k + 32 * b) * 16;
            const __m512 scale = _mm512_loadu_ps(tscales + ((t + h) * nb + b) * 16);
            for (int64_t j = 0; j < 32; j++) {
                const __m512i codes = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + j * 16)));
                _mm512_store_ps(wf[h][j], _mm512_mul_ps(_mm512_cvtepi32_ps(codes), scale));
            }
        }
        for (int64_t r0 = 0; r0 < rows; r0 += PAIR_ROWS) {
            const int64_t tile = rows - r0 < PAIR_ROWS ? rows - r0 : PAIR_ROWS;
#define PAIR(T) q8_pair_rows(wf, xf + r0 * k, k, b, T, acc + r0 * 32)
            TILES_UP_TO_8(PAIR, tile)
#undef PAIR
        }
    }
    for (int64_t r = 0; r < rows; r++)
        for (int h = 0; h < 2; h++)
            _mm512_storeu_ps(out + r * n + 16 * (t + h), _mm512_load_ps(acc + (2 * r + h) * 16));
}
#endif

int loom_q8_tiled_available(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

int loom_q8_tiled_matmul(const uint16_t *x, int64_t x_stride, int64_t rows, const int8_t *tcodes,
                         const float *tscales, int64_t n, int64_t k, float *out) {
#ifdef __AVX512F__
    if (rows < 1 || k % 32 || n % 32) return 1;
    float *xf = aligned_alloc(64, (size_t)(rows * k * 4 + 63) / 64 * 64);
    if (xf == NULL) return 2;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < k; i++) xf[r * k + i] = bf16_to_f32(x[r * x_stride + i]);
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        float *acc = aligned_alloc(64, (size_t)rows * 32 * sizeof(float));
        if (acc == NULL) {
            failed = 1;
        } else {
            const int nt = omp_get_num_threads(), th = omp_get_thread_num();
            const int64_t pairs = n / 32, chunk = (pairs + nt - 1) / nt, lo = th * chunk;
            const int64_t hi = lo + chunk < pairs ? lo + chunk : pairs;
            for (int64_t p = lo; p < hi; p++) q8_pair(tcodes, tscales, 2 * p, k, xf, rows, acc, out, n);
            free(acc);
        }
    }
    free(xf);
    return failed ? 2 : 0;
#else
    (void)x, (void)x_stride, (void)rows, (void)tcodes, (void)tscales, (void)n, (void)k, (void)out;
    return 3;
#endif
}
