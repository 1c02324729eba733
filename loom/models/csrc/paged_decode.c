/* Decode attention over a paged KV cache: one query per request, every head, read in place.

   Built and loaded by loom/models/paged_decode.py (ctypes; see there for why). Each (request, KV
   head) reads its context's K and V rows once, block by block through the block table, with an
   online softmax in float32: no gathered copy of the context, no score matrix. Every request is
   computed on its own, so a row's result does not depend on the batch it shares a step with.

   Cache layout (loom/models/attention.py): [2 * num_kv_heads, num_slots, head_dim] bf16, K heads
   then V heads; slot = block_id * block_size + offset. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "vexp.h"
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LOOM_AVX512BF16 1
#endif

#define HD_MAX 256
#define GROUP_MAX 16
#define BLOCK_MAX 64

#ifdef LOOM_AVX512BF16
/* Lane t of the result is the sum of the 16 lanes of v[SUM16_SLOT[t]]: four rounds of shuffles and
   adds for 16 vectors, where a horizontal sum of each takes four rounds per vector. The slot
   order undoes where the rounds leave each sum (the two bits of each half of t reversed). */
static const int SUM16_SLOT[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};

static inline __m512 sum16(const __m512 v[16]) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) /* 256-bit halves: v[i]'s in the low half, v[i + 8]'s in the high */
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xee));
    for (int i = 0; i < 4; i++) /* 128-bit quarters */
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 4], 0x88), _mm512_shuffle_f32x4(a[i], a[i + 4], 0xdd));
    for (int i = 0; i < 2; i++) /* pairs within each quarter */
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[i], b[i + 2], 0x44), _mm512_shuffle_ps(b[i], b[i + 2], 0xee));
    return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xdd));
}
#endif

/* s[g][t] = q_g . k_t for the n key rows at k (unscaled) */
static inline void block_scores(const uint16_t *qb, float qf[][HD_MAX], int64_t group, int64_t hd,
                                const uint16_t *k, int64_t n, float s[][BLOCK_MAX]) {
#ifdef LOOM_AVX512BF16
    if (hd % 32 == 0) { /* bf16 pairs multiplied exactly, summed in float32, 16 keys reduced at once */
        for (int64_t g = 0; g < group; g++)
            for (int64_t t0 = 0; t0 < n; t0 += 16) {
                const int64_t m = n - t0 < 16 ? n - t0 : 16;
                __m512 acc[16];
#pragma GCC unroll 16
                for (int t = 0; t < 16; t++) {
                    __m512 a = _mm512_setzero_ps();
                    if (t < m)
                        for (int64_t i = 0; i < hd; i += 32)
                            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(qb + g * hd + i),
                                                 (__m512bh)_mm512_loadu_si512(k + (t0 + t) * hd + i));
                    acc[SUM16_SLOT[t]] = a;
                }
                _mm512_mask_storeu_ps(s[g] + t0, (__mmask16)((1u << m) - 1), sum16(acc));
            }
        return;
    }
#endif
    for (int64_t t = 0; t < n; t++) {
        float kf[HD_MAX];
        for (int64_t i = 0; i < hd; i++) kf[i] = bf16_to_f32(k[t * hd + i]);
        for (int64_t g = 0; g < group; g++) {
            float dot = 0.f;
            for (int64_t i = 0; i < hd; i++) dot += qf[g][i] * kf[i];
            s[g][t] = dot;
        }
    }
}

/* acc_g += sum_t p[g][t] * v_t: the block's V rows converted once, each head's sum kept in registers */
static inline __attribute__((always_inline)) void block_values(const uint16_t *v, int64_t n, int64_t group,
                                                               const int64_t hd, float s[][BLOCK_MAX],
                                                               float acc[][HD_MAX]) {
    float vf[BLOCK_MAX][HD_MAX];
    for (int64_t t = 0; t < n; t++)
        for (int64_t i = 0; i < hd; i++) vf[t][i] = bf16_to_f32(v[t * hd + i]);
    for (int64_t g = 0; g < group; g++) {
        float a[HD_MAX];
        for (int64_t i = 0; i < hd; i++) a[i] = acc[g][i];
        for (int64_t t = 0; t < n; t++) {
            const float p = s[g][t];
            for (int64_t i = 0; i < hd; i++) a[i] += p * vf[t][i];
        }
        for (int64_t i = 0; i < hd; i++) acc[g][i] = a[i];
    }
}

#if defined(__AVX512F__)
/* The same sums with every head's accumulators in registers through the block (group x hd / 16 of
   them, constants where it is called), each V row converted once and used by every head of the
   group: the generic version stores the converted block and reloads it per head. */
static inline __attribute__((always_inline)) void block_values_regs(const uint16_t *v, int64_t n, const int64_t group,
                                                                    const int64_t hd, float s[][BLOCK_MAX],
                                                                    float acc[][HD_MAX]) {
    __m512 a[4][8];
    for (int64_t g = 0; g < group; g++)
        for (int64_t c = 0; c < hd / 16; c++) a[g][c] = _mm512_loadu_ps(acc[g] + 16 * c);
    for (int64_t t = 0; t < n; t++) {
        __m512 row[8];
        for (int64_t c = 0; c < hd / 16; c++) row[c] = bf16x16_to_f32(v + t * hd + 16 * c);
        for (int64_t g = 0; g < group; g++) {
            const __m512 p = _mm512_set1_ps(s[g][t]);
            for (int64_t c = 0; c < hd / 16; c++) a[g][c] = _mm512_fmadd_ps(p, row[c], a[g][c]);
        }
    }
    for (int64_t g = 0; g < group; g++)
        for (int64_t c = 0; c < hd / 16; c++) _mm512_storeu_ps(acc[g] + 16 * c, a[g][c]);
}
#endif

/* s[t] = exp(s[t] - shift) for t < n; returns their sum */
static inline float exp_shifted(float *s, int64_t n, float shift) {
    float sum = 0.f;
    int64_t t = 0;
#if defined(__AVX512F__)
    const __m512 vshift = _mm512_set1_ps(shift);
    __m512 vsum = _mm512_setzero_ps();
    for (; t < n; t += 16) {
        const __mmask16 live = n - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - t)) - 1);
        const __m512 e = loom_exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + t), vshift));
        _mm512_mask_storeu_ps(s + t, live, e);
        vsum = _mm512_mask_add_ps(vsum, live, vsum, e);
    }
    sum = _mm512_reduce_add_ps(vsum);
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 vshift = _mm256_set1_ps(shift);
    __m256 vsum = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8) {
        const __m256 e = loom_exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), vshift));
        _mm256_storeu_ps(s + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    sum = f32x8_sum(vsum);
#endif
    for (; t < n; t++) {
        s[t] = expf(s[t] - shift);
        sum += s[t];
    }
    return sum;
}

static void one_head(const uint16_t *cache, int64_t num_slots, const uint16_t *qb, uint16_t *ob,
                     const int32_t *table, int64_t ctx, int64_t kh, int64_t num_kv_heads, int64_t group,
                     int64_t hd, int64_t block_size, float scale) {
    float qf[GROUP_MAX][HD_MAX], acc[GROUP_MAX][HD_MAX], m[GROUP_MAX], l[GROUP_MAX], s[GROUP_MAX][BLOCK_MAX];
    for (int64_t g = 0; g < group; g++) {
        for (int64_t i = 0; i < hd; i++) {
            qf[g][i] = bf16_to_f32(qb[g * hd + i]);
            acc[g][i] = 0.f;
        }
        m[g] = -FLT_MAX;
        l[g] = 0.f;
    }
    const uint16_t *kbase = cache + kh * num_slots * hd;
    const uint16_t *vbase = cache + (num_kv_heads + kh) * num_slots * hd;
    for (int64_t b = 0; b * block_size < ctx; b++) {
        const int64_t n = ctx - b * block_size < block_size ? ctx - b * block_size : block_size;
        const int64_t slot0 = (int64_t)table[b] * block_size;
        if ((b + 1) * block_size < ctx) { /* the next block lives anywhere: no hardware prefetcher guesses it */
            const char *kn = (const char *)(kbase + (int64_t)table[b + 1] * block_size * hd);
            const char *vn = (const char *)(vbase + (int64_t)table[b + 1] * block_size * hd);
            for (int64_t off = 0; off < block_size * hd * 2; off += 64) {
                __builtin_prefetch(kn + off);
                __builtin_prefetch(vn + off);
            }
        }
        block_scores(qb, qf, group, hd, kbase + slot0 * hd, n, s);
        for (int64_t g = 0; g < group; g++) { /* online softmax: rescale what was summed under the old max */
            float bm = m[g];
#if defined(__AVX512F__)
            __m512 vbm = _mm512_set1_ps(bm);
            for (int64_t t = 0; t < n; t += 16) {
                const __mmask16 live = n - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - t)) - 1);
                const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, s[g] + t), _mm512_set1_ps(scale));
                _mm512_mask_storeu_ps(s[g] + t, live, x);
                vbm = _mm512_mask_max_ps(vbm, live, vbm, x);
            }
            bm = _mm512_reduce_max_ps(vbm);
#else
            for (int64_t t = 0; t < n; t++) {
                s[g][t] *= scale;
                bm = s[g][t] > bm ? s[g][t] : bm;
            }
#endif
            const float corr = expf(m[g] - bm);
            l[g] *= corr;
            for (int64_t i = 0; i < hd; i++) acc[g][i] *= corr;
            l[g] += exp_shifted(s[g], n, bm);
            m[g] = bm;
        }
        const uint16_t *vb = vbase + slot0 * hd;
#if defined(__AVX512F__)
        if (hd == 64 && group == 3) /* SmolLM2's 9 / 3 heads */
            block_values_regs(vb, n, 3, 64, s, acc);
        else if (hd == 64 && group == 4)
            block_values_regs(vb, n, 4, 64, s, acc);
        else if (hd == 64 && group == 1)
            block_values_regs(vb, n, 1, 64, s, acc);
        else if (hd == 128 && group == 2)
            block_values_regs(vb, n, 2, 128, s, acc);
        else if (hd == 128 && group == 1)
            block_values_regs(vb, n, 1, 128, s, acc);
        else
#endif
        if (hd == 64)
            block_values(vb, n, group, 64, s, acc);
        else if (hd == 128)
            block_values(vb, n, group, 128, s, acc);
        else
            block_values(vb, n, group, hd, s, acc);
    }
    for (int64_t g = 0; g < group; g++) {
        const float inv = 1.f / l[g];
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= hd; i += 16)
            f32x16_to_bf16(_mm512_mul_ps(_mm512_loadu_ps(acc[g] + i), _mm512_set1_ps(inv)), ob + g * hd + i);
#endif
        for (; i < hd; i++) ob[g * hd + i] = f32_to_bf16(acc[g][i] * inv);
    }
}

/* Limits the caller checks: head_dim <= 256, num_heads / num_kv_heads <= 16, block_size <= 64,
   every context_lens[d] >= 1. q: request d's head h at q + d * q_stride + h * head_dim;
   out: [num_reqs, num_heads, head_dim] contiguous; block_table: [num_reqs, max_blocks]. */
int loom_paged_decode_bf16(const uint16_t *cache, int64_t num_slots, const uint16_t *q, int64_t q_stride,
                           uint16_t *out, const int32_t *block_table, int64_t max_blocks,
                           const int32_t *context_lens, int64_t num_reqs, int64_t num_heads,
                           int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale) {
    const int64_t group = num_heads / num_kv_heads;
    if (head_dim > HD_MAX || group > GROUP_MAX || block_size > BLOCK_MAX || group * num_kv_heads != num_heads) return 1;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t d = 0; d < num_reqs; d++)
        for (int64_t kh = 0; kh < num_kv_heads; kh++)
            one_head(cache, num_slots, q + d * q_stride + kh * group * head_dim,
                     out + (d * num_heads + kh * group) * head_dim, block_table + d * max_blocks, context_lens[d],
                     kh, num_kv_heads, group, head_dim, block_size, scale);
    return 0;
}
