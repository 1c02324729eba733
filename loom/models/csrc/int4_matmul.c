/* y = x @ W.T for a 4-bit weight and a few bf16 activation rows: the decode-step kernel of an
   int4 linear (loom/models/native.py).

   A weight value is (code - 8) * scale + zero, as PyTorch's int4 kernel reads it (linear.py's
   Int4Method): scale and zero bf16 per 32 values of a row. Output rows are taken 16 at a time,
   one per vector lane, so a weight tile is read once for every activation row and no lane sums
   are needed. Row o's result for activation row r is
       sum_b scale_b * ((codes_b - 8) . x_b) + zero_b * sum(x_b)
   in float32; it does not depend on the other rows.
   codes: [n / 16, k / 2, 16] uint8: for output tile t, input pair p, lane j: byte =
   code(16t + j, 2p) | code(16t + j, 2p + 1) << 4; scales, zeros: [n / 16, k / 32, 16] bf16. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "fma_tiles.h"
#include "int4_matmul.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

void int4_prepare_rows(const uint16_t *x, int64_t x_stride, int64_t rows, int64_t k, float *xf, float *sums) {
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < k; i++) xf[r * k + i] = bf16_to_f32(x[r * x_stride + i]);
        for (int64_t b = 0; b < k / 32; b++) {
            float s = 0.f;
            for (int j = 0; j < 32; j++) s += xf[r * k + 32 * b + j];
            sums[r * (k / 32) + b] = s;
        }
    }
}

#ifdef __AVX512F__
/* One tile of 16 output rows against `tile` (<= INT4_FMA_TILE) activation rows in float32 FMAs:
   a lane's two codes become floats (code - 8 by permute) once for every row of the tile. */
static inline __attribute__((always_inline)) void int4_tile_fma(const Int4Weight *w, int64_t t, const float *xf,
                                                                const float *sums, int64_t tile, float *out,
                                                                int64_t out_stride) {
    const int64_t k = w->k, nb = k / 32;
    const uint8_t *q = w->codes + t * (k / 2) * 16;
    const uint16_t *s = w->scales + t * nb * 16, *z = w->zeros + t * nb * 16;
    const __m512 centred = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    __m512 acc[INT4_FMA_TILE];
    for (int64_t r = 0; r < tile; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512 part[INT4_FMA_TILE];
        for (int64_t r = 0; r < tile; r++) part[r] = _mm512_setzero_ps();
        for (int64_t p = 0; p < 16; p++) {
            const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + (16 * b + p) * 16)));
            const __m512 w0 = _mm512_permutexvar_ps(bytes, centred); /* code - 8: the low 4 bits index */
            const __m512 w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), centred);
            for (int64_t r = 0; r < tile; r++) {
                const float *x = xf + r * k + 32 * b + 2 * p;
                part[r] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[0]), part[r]);
                part[r] = _mm512_fmadd_ps(w1, _mm512_set1_ps(x[1]), part[r]);
            }
        }
        const __m512 scale = bf16x16_to_f32(s + 16 * b), zero = bf16x16_to_f32(z + 16 * b);
        for (int64_t r = 0; r < tile; r++) {
            acc[r] = _mm512_fmadd_ps(part[r], scale, acc[r]);
            acc[r] = _mm512_fmadd_ps(zero, _mm512_set1_ps(sums[r * nb + b]), acc[r]);
        }
    }
    for (int64_t r = 0; r < tile; r++) _mm512_storeu_ps(out + r * out_stride + 16 * t, acc[r]);
}
#endif

#ifdef __AVX512BF16__
/* code - 8 for codes 0..15 in bf16, twice: the word permute indexes 32 entries */
static const uint16_t CENTRED_BF16[32] = {
    0xc100, 0xc0e0, 0xc0c0, 0xc0a0, 0xc080, 0xc040, 0xc000, 0xbf80, 0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
    0xc100, 0xc0e0, 0xc0c0, 0xc0a0, 0xc080, 0xc040, 0xc000, 0xbf80, 0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
};

/* The same tile with bf16 dot instructions: a lane's two codes as a bf16 pair (code - 8 by word
   permute) against the activations' own bf16 pair, one instruction per input pair and row. */
static inline __attribute__((always_inline)) void int4_tile_dot(const Int4Weight *w, int64_t t, const uint16_t *xb,
                                                                int64_t xb_stride, const float *sums, int64_t tile,
                                                                float *out, int64_t out_stride) {
    const int64_t k = w->k, nb = k / 32;
    const uint8_t *q = w->codes + t * (k / 2) * 16;
    const uint16_t *s = w->scales + t * nb * 16, *z = w->zeros + t * nb * 16;
    const __m512i table = _mm512_loadu_si512(CENTRED_BF16), nibbles = _mm512_set1_epi32(0x000f000f);
    __m512 acc[INT4_TILE];
    for (int64_t r = 0; r < tile; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512 part[INT4_TILE];
        for (int64_t r = 0; r < tile; r++) part[r] = _mm512_setzero_ps();
        for (int64_t p = 0; p < 16; p++) {
            const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + (16 * b + p) * 16)));
            const __m512i idx = _mm512_and_si512(_mm512_or_si512(bytes, _mm512_slli_epi32(bytes, 12)), nibbles);
            const __m512bh pair = (__m512bh)_mm512_permutexvar_epi16(idx, table);
            for (int64_t r = 0; r < tile; r++) {
                uint32_t xpair;
                memcpy(&xpair, xb + r * xb_stride + 32 * b + 2 * p, 4);
                part[r] = _mm512_dpbf16_ps(part[r], pair, (__m512bh)_mm512_set1_epi32((int)xpair));
            }
        }
        const __m512 scale = bf16x16_to_f32(s + 16 * b), zero = bf16x16_to_f32(z + 16 * b);
        for (int64_t r = 0; r < tile; r++) {
            acc[r] = _mm512_fmadd_ps(part[r], scale, acc[r]);
            acc[r] = _mm512_fmadd_ps(zero, _mm512_set1_ps(sums[r * nb + b]), acc[r]);
        }
    }
    for (int64_t r = 0; r < tile; r++) _mm512_storeu_ps(out + r * out_stride + 16 * t, acc[r]);
}

/* bf16 dot instructions unless the caller measured float32 FMAs faster: some CPUs run the dot
   at half the FMA's rate (an Intel AVX512-BF16 guest without AMX), others at twice (AMD Zen 4). */
static int int4_use_fma = 0;
#endif

void loom_int4_use_fma(int on) {
#ifdef __AVX512BF16__
    int4_use_fma = on;
#else
    (void)on;
#endif
}

int loom_int4_has_dot(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

#if !defined(__AVX512F__)
/* One tile of 16 output rows against `tile` activation rows; out[r * out_stride + 16 * t + lane]. */
static inline __attribute__((always_inline)) void int4_tile(const Int4Weight *w, int64_t t, const float *xf,
                                                            const float *sums, int64_t tile, float *out,
                                                            int64_t out_stride) {
    const int64_t k = w->k, nb = k / 32;
    const uint8_t *q = w->codes + t * (k / 2) * 16;
    const uint16_t *s = w->scales + t * nb * 16, *z = w->zeros + t * nb * 16;
#if defined(__AVX2__) && defined(__FMA__)
    /* the 16 lanes as two halves of 8; code - 8 converted once per input pair for every row */
    const __m256i low4 = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
    __m256 acc[INT4_TILE][2];
    for (int64_t r = 0; r < tile; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256 part[INT4_TILE][2];
        for (int64_t r = 0; r < tile; r++) part[r][0] = part[r][1] = _mm256_setzero_ps();
        for (int64_t p = 0; p < 16; p++) {
            const __m128i bytes = _mm_loadu_si128((const __m128i *)(q + (16 * b + p) * 16));
            const __m256i lo = _mm256_cvtepu8_epi32(bytes), hi = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
            const __m256 w0[2] = {_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(lo, low4), eight)),
                                  _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(hi, low4), eight))};
            const __m256 w1[2] = {_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(lo, 4), eight)),
                                  _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(hi, 4), eight))};
            for (int64_t r = 0; r < tile; r++) {
                const float *x = xf + r * k + 32 * b + 2 * p;
                const __m256 x0 = _mm256_set1_ps(x[0]), x1 = _mm256_set1_ps(x[1]);
                for (int h = 0; h < 2; h++)
                    part[r][h] = _mm256_fmadd_ps(w1[h], x1, _mm256_fmadd_ps(w0[h], x0, part[r][h]));
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m256 scale = bf16x8_to_f32(s + 16 * b + 8 * h), zero = bf16x8_to_f32(z + 16 * b + 8 * h);
            for (int64_t r = 0; r < tile; r++) {
                acc[r][h] = _mm256_fmadd_ps(part[r][h], scale, acc[r][h]);
                acc[r][h] = _mm256_fmadd_ps(zero, _mm256_set1_ps(sums[r * nb + b]), acc[r][h]);
            }
        }
    }
    for (int64_t r = 0; r < tile; r++)
        for (int h = 0; h < 2; h++) _mm256_storeu_ps(out + r * out_stride + 16 * t + 8 * h, acc[r][h]);
#else
    for (int64_t r = 0; r < tile; r++) {
        for (int64_t j = 0; j < 16; j++) {
            float total = 0.f;
            for (int64_t b = 0; b < nb; b++) {
                float part = 0.f;
                for (int64_t p = 0; p < 16; p++) {
                    const uint8_t byte = q[(16 * b + p) * 16 + j];
                    const float *x = xf + r * k + 32 * b + 2 * p;
                    part += (float)((byte & 15) - 8) * x[0] + (float)((byte >> 4) - 8) * x[1];
                }
                total += part * bf16_to_f32(s[16 * b + j]) + bf16_to_f32(z[16 * b + j]) * sums[r * nb + b];
            }
            out[r * out_stride + 16 * t + j] = total;
        }
    }
#endif
}
#endif

#ifdef __AVX512F__
/* Many rows (float32 FMAs): two tiles (32 output rows) at a time, each block's codes turned into
   floats once, into L1, for every activation row; then 8 activation rows at a time against both
   tiles, FMA-bound where the one-tile kernel spends a third of its issue slots on turning codes
   into floats again for every 8 rows. Each lane sums in the same order as int4_tile_fma: the
   same bits. SmolLM2's 120 linears, Intel AVX512-BF16 guest without AMX, 2 threads, against the
   one-tile kernel in one process (load ~0.5): 26.2-26.4 vs 31.7-32.9 ms at 32 rows, 50.1-52.4 vs
   62.6-63.6 at 64; mixed at 16. */
static inline __attribute__((always_inline)) void int4_pair_rows(const float wf[2][32][16], const float *xf,
                                                                 int64_t k, int64_t b, __m512 scale[2],
                                                                 __m512 zero[2], const float *sums, int64_t nb,
                                                                 int64_t tile, float *acc) {
    __m512 part[PAIR_ROWS][2];
    pair_block(wf, xf, k, b, tile, part);
    for (int64_t r = 0; r < tile; r++) {
        const __m512 s = _mm512_set1_ps(sums[r * nb + b]);
        for (int h = 0; h < 2; h++) {
            __m512 a = _mm512_load_ps(acc + (2 * r + h) * 16);
            a = _mm512_fmadd_ps(part[r][h], scale[h], a);
            a = _mm512_fmadd_ps(zero[h], s, a);
            _mm512_store_ps(acc + (2 * r + h) * 16, a);
        }
    }
}

static void int4_pair_fma(const Int4Weight *w, int64_t t, const float *xf, const float *sums, int64_t rows,
                          float *out, int64_t out_stride) {
    const int64_t k = w->k, nb = k / 32;
    const __m512 centred = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    float wf[2][32][16] __attribute__((aligned(64)));
    float acc[INT4_MAX_ROWS * 2 * 16] __attribute__((aligned(64)));
    memset(acc, 0, (size_t)rows * 2 * 16 * sizeof(float));
    for (int64_t b = 0; b < nb; b++) {
        __m512 scale[2], zero[2];
        for (int h = 0; h < 2; h++) {
            const uint8_t *q = w->codes + (t + h) * (k / 2) * 16 + 16 * b * 16;
            for (int64_t p = 0; p < 16; p++) {
                const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + p * 16)));
                _mm512_store_ps(wf[h][2 * p], _mm512_permutexvar_ps(bytes, centred));
                _mm512_store_ps(wf[h][2 * p + 1], _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), centred));
            }
            scale[h] = bf16x16_to_f32(w->scales + (t + h) * nb * 16 + 16 * b);
            zero[h] = bf16x16_to_f32(w->zeros + (t + h) * nb * 16 + 16 * b);
        }
        for (int64_t r0 = 0; r0 < rows; r0 += PAIR_ROWS) {
            const int64_t tile = rows - r0 < PAIR_ROWS ? rows - r0 : PAIR_ROWS;
#define PAIR(T) int4_pair_rows(wf, xf + r0 * k, k, b, scale, zero, sums + r0 * nb, nb, T, acc + r0 * 32)
            TILES_UP_TO_8(PAIR, tile)
#undef PAIR
        }
    }
    for (int64_t r = 0; r < rows; r++)
        for (int h = 0; h < 2; h++) _mm512_storeu_ps(out + r * out_stride + 16 * (t + h), _mm512_load_ps(acc + (2 * r + h) * 16));
}
#endif

void int4_rows(const Int4Weight *w, const float *xf, const uint16_t *xb, int64_t xb_stride, const float *sums,
               int64_t rows, int64_t t_begin, int64_t t_end, float *out, int64_t out_stride) {
    const int64_t nb = w->k / 32;
#if defined(__AVX512BF16__)
    const int fma = int4_use_fma;
#elif defined(__AVX512F__)
    const int fma = 1;
    (void)xb, (void)xb_stride;
#else
    (void)xb, (void)xb_stride;
#endif
    for (int64_t t = t_begin; t < t_end; t++) {
#if defined(__AVX512F__)
        if (fma && rows >= INT4_PAIR_MIN_ROWS && t + 1 < t_end) { /* this tile and the next, every row */
            int4_pair_fma(w, t, xf, sums, rows, out, out_stride);
            t++;
            continue;
        }
        const int64_t step = fma ? INT4_FMA_TILE : INT4_TILE;
#else
        const int64_t step = INT4_TILE;
#endif
        for (int64_t r0 = 0; r0 < rows; r0 += step) {
            const int64_t tile = rows - r0 < step ? rows - r0 : step;
            const float *x = xf + r0 * w->k, *sx = sums + r0 * nb;
            float *o = out + r0 * out_stride;
#if defined(__AVX512BF16__)
            if (!fma) {
                const uint16_t *x16 = xb + r0 * xb_stride;
#define DOT(T) int4_tile_dot(w, t, x16, xb_stride, sx, T, o, out_stride)
                TILES_UP_TO_4(DOT, tile)
#undef DOT
                continue;
            }
#endif
#if defined(__AVX512F__)
#define FMA(T) int4_tile_fma(w, t, x, sx, T, o, out_stride)
            TILES_UP_TO_8(FMA, tile)
#undef FMA
#else
#define PLAIN(T) int4_tile(w, t, x, sx, T, o, out_stride)
            TILES_UP_TO_4(PLAIN, tile)
#undef PLAIN
#endif
        }
    }
}

size_t int4_scratch_floats(int64_t rows, int64_t k, int64_t n) { return (size_t)(rows * k + rows * (k / 32) + rows * n); }

void int4_matmul_bf16(const Int4Weight *w, const uint16_t *x, int64_t x_stride, int64_t rows, uint16_t *out,
                      int64_t out_stride, float *scratch) {
    const int64_t k = w->k, n = w->n;
    float *xf = scratch, *sums = xf + rows * k, *y = sums + rows * (k / 32);
    int4_prepare_rows(x, x_stride, rows, k, xf, sums);
#pragma omp parallel
    {
        const int nt = omp_get_num_threads(), th = omp_get_thread_num();
        const int64_t tiles = n / 16, chunk = (tiles + nt - 1) / nt, lo = th * chunk;
        const int64_t hi = lo + chunk < tiles ? lo + chunk : tiles;
        if (lo < hi) {
            int4_rows(w, xf, x, x_stride, sums, rows, lo, hi, y, n);
            for (int64_t r = 0; r < rows; r++)
                for (int64_t o = 16 * lo; o < 16 * hi; o += 16) {
#ifdef __AVX512F__
                    f32x16_to_bf16(_mm512_loadu_ps(y + r * n + o), out + r * out_stride + o);
#elif defined(__AVX2__)
                    for (int64_t j = o; j < o + 16; j += 8)
                        f32x8_to_bf16(_mm256_loadu_ps(y + r * n + j), out + r * out_stride + j);
#else
                    for (int64_t j = o; j < o + 16; j++) out[r * out_stride + j] = f32_to_bf16(y[r * n + j]);
#endif
                }
        }
    }
}

int loom_int4_matmul(const uint16_t *x, int64_t x_stride, int64_t rows, const uint8_t *codes,
                     const uint16_t *scales, const uint16_t *zeros, int64_t n, int64_t k, uint16_t *out,
                     int64_t out_stride) {
    if (rows < 1 || rows > INT4_MAX_ROWS || k % 32 || n % 16) return 1;
    const Int4Weight w = {codes, scales, zeros, n, k};
    float *scratch = malloc(int4_scratch_floats(rows, k, n) * sizeof(float));
    if (scratch == NULL) return 2;
    int4_matmul_bf16(&w, x, x_stride, rows, out, out_stride, scratch);
    free(scratch);
    return 0;
}
