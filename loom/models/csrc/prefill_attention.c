/* Prefill attention for one chunk: its queries over their context, causal, K and V read in place
   by slot (loom/models/attention.py owns the layout: [2 * num_kv_heads, num_slots, head_dim] bf16,
   K heads then V heads). Query i of Q sits at context position C - Q + i and sees keys 0..there.

   Work splits into (KV head, tile of queries); a tile's rows are its queries times the KV head's
   query heads, so each K and V block is read once for all of them. Per block of 32 keys the K rows
   are transposed into bf16 pairs, and every row's scores for 16 keys come from one dot instruction
   per pair of dimensions (products exact, summed in float32, as the decode kernel's); an online softmax in
   float32, then V in float32. Each query's result depends only on its own context, never on the
   chunk it arrived in. AVX512-BF16 only: elsewhere `loom_prefill_attention_available` says 0 and
   PyTorch's kernels run. */
#include <float.h>
#include <stdint.h>

#include "bf16.h"
#include "vexp.h"
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LOOM_PREFILL_NATIVE 1
#endif

#define PF_HD_MAX 256
#define PF_ROWS_MAX 64 /* query rows (queries x heads of one KV head) per tile */
#define PF_QUERIES_MAX 16
#define PF_KEYS 32 /* keys per block: two vectors of scores */

int loom_prefill_attention_available(void) {
#ifdef LOOM_PREFILL_NATIVE
    return 1;
#else
    return 0;
#endif
}

#ifdef LOOM_PREFILL_NATIVE
/* the 16 lanes' max in every lane */
static inline __m512 all_lanes_max(__m512 x) {
    x = _mm512_max_ps(x, _mm512_shuffle_f32x4(x, x, 0x4e));
    x = _mm512_max_ps(x, _mm512_shuffle_f32x4(x, x, 0xb1));
    x = _mm512_max_ps(x, _mm512_permute_ps(x, 0x4e));
    return _mm512_max_ps(x, _mm512_permute_ps(x, 0xb1));
}

static inline __attribute__((always_inline)) void tile(const uint16_t *cache, int64_t num_slots, const int64_t *slots,
                                                       const uint16_t *q, int64_t q_stride, uint16_t *out,
                                                       int64_t first_pos, int64_t i0, int64_t nq, int64_t kh,
                                                       int64_t num_kv_heads, int64_t group, const int64_t hd,
                                                       float scale) {
    const int64_t rows = nq * group, pairs = hd / 2, chunks = hd / 16;
    const uint16_t *qrow[PF_ROWS_MAX];
    int64_t pos[PF_ROWS_MAX];
    __m512 m[PF_ROWS_MAX], l[PF_ROWS_MAX]; /* each row's running max (every lane) and lane-wise sums */
    __attribute__((aligned(64))) float acc[PF_ROWS_MAX][PF_HD_MAX];
    __attribute__((aligned(64))) uint32_t kp[2][PF_HD_MAX / 2][16]; /* kp[h][i][t]: key 16h + t's pair i */
    __attribute__((aligned(64))) float vf[PF_KEYS][PF_HD_MAX];
    for (int64_t r = 0; r < rows; r++) { /* row r: query i0 + r / group, head kh * group + r % group */
        const int64_t i = i0 + r / group, h = kh * group + r % group;
        qrow[r] = q + i * q_stride + h * hd;
        pos[r] = first_pos + i;
        m[r] = _mm512_set1_ps(-FLT_MAX);
        l[r] = _mm512_setzero_ps();
        for (int64_t c = 0; c < hd; c++) acc[r][c] = 0.f;
    }
    const uint16_t *kbase = cache + kh * num_slots * hd, *vbase = cache + (num_kv_heads + kh) * num_slots * hd;
    const int64_t end = first_pos + i0 + nq; /* one past the last key the tile's last query sees */
    const __m512 vscale = _mm512_set1_ps(scale);
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t t0 = 0; t0 < end; t0 += PF_KEYS) {
        const int64_t n = end - t0 < PF_KEYS ? end - t0 : PF_KEYS;
        for (int64_t t = 0; t < PF_KEYS; t++) {
            const uint32_t *krow = (const uint32_t *)(kbase + slots[t0 + (t < n ? t : 0)] * hd);
            for (int64_t i = 0; i < pairs; i++) kp[t / 16][i][t % 16] = krow[i];
        }
        for (int64_t t = 0; t < n; t++) {
            const uint16_t *vrow = vbase + slots[t0 + t] * hd;
            for (int64_t c = 0; c < chunks; c++) _mm512_store_ps(vf[t] + 16 * c, bf16x16_to_f32(vrow + 16 * c));
        }
        for (int64_t r0 = 0; r0 < rows; r0 += 4) {
            const int64_t nr = rows - r0 < 4 ? rows - r0 : 4;
            __m512 s[4][2];
            for (int64_t j = 0; j < 4; j++) s[j][0] = s[j][1] = _mm512_setzero_ps();
            for (int64_t i = 0; i < pairs; i++) {
                const __m512bh k0 = (__m512bh)_mm512_load_si512(kp[0][i]), k1 = (__m512bh)_mm512_load_si512(kp[1][i]);
#pragma GCC unroll 4
                for (int64_t j = 0; j < 4; j++)
                    if (j < nr) {
                        const __m512bh qp = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(qrow[r0 + j] + 2 * i));
                        s[j][0] = _mm512_dpbf16_ps(s[j][0], qp, k0);
                        s[j][1] = _mm512_dpbf16_ps(s[j][1], qp, k1);
                    }
            }
            for (int64_t j = 0; j < nr; j++) {
                const int64_t r = r0 + j;
                const int64_t seen = pos[r] - t0 + 1; /* keys of this block the row's query may see */
                if (seen <= 0) continue;
                const int live_keys = (int)(seen < n ? seen : n);
                const __mmask16 live0 = _mm512_cmplt_epi32_mask(lane, _mm512_set1_epi32(live_keys));
                const __mmask16 live1 = _mm512_cmplt_epi32_mask(lane, _mm512_set1_epi32(live_keys - 16));
                const __m512 x0 = _mm512_mul_ps(s[j][0], vscale), x1 = _mm512_mul_ps(s[j][1], vscale);
                const __m512 both = _mm512_max_ps(_mm512_mask_mov_ps(m[r], live0, x0), _mm512_mask_mov_ps(m[r], live1, x1));
                const __m512 bm = _mm512_max_ps(m[r], all_lanes_max(both));
                const __m512 p0 = _mm512_maskz_mov_ps(live0, loom_exp512(_mm512_sub_ps(x0, bm)));
                const __m512 p1 = _mm512_maskz_mov_ps(live1, loom_exp512(_mm512_sub_ps(x1, bm)));
                const __m512 corr = loom_exp512(_mm512_sub_ps(m[r], bm)); /* 0 on the first block: -FLT_MAX - bm */
                l[r] = _mm512_add_ps(_mm512_fmadd_ps(l[r], corr, p0), p1);
                m[r] = bm;
                __attribute__((aligned(64))) float pt[PF_KEYS];
                _mm512_store_ps(pt, p0);
                _mm512_store_ps(pt + 16, p1);
                __m512 a[PF_HD_MAX / 16];
                for (int64_t c = 0; c < chunks; c++) a[c] = _mm512_mul_ps(_mm512_load_ps(acc[r] + 16 * c), corr);
                for (int64_t t = 0; t < live_keys; t++) {
                    const __m512 pv = _mm512_set1_ps(pt[t]);
                    for (int64_t c = 0; c < chunks; c++) a[c] = _mm512_fmadd_ps(pv, _mm512_load_ps(vf[t] + 16 * c), a[c]);
                }
                for (int64_t c = 0; c < chunks; c++) _mm512_store_ps(acc[r] + 16 * c, a[c]);
            }
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        const int64_t i = i0 + r / group, h = kh * group + r % group;
        uint16_t *o = out + (i * num_kv_heads * group + h) * hd;
        const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(l[r]));
        for (int64_t c = 0; c < chunks; c++) f32x16_to_bf16(_mm512_mul_ps(_mm512_load_ps(acc[r] + 16 * c), inv), o + 16 * c);
    }
}

/* the common head sizes with their loops' bounds known, so each row's sums stay in registers */
static void one_tile(const uint16_t *cache, int64_t num_slots, const int64_t *slots, const uint16_t *q,
                     int64_t q_stride, uint16_t *out, int64_t first_pos, int64_t i0, int64_t nq, int64_t kh,
                     int64_t num_kv_heads, int64_t group, int64_t hd, float scale) {
    if (hd == 64)
        tile(cache, num_slots, slots, q, q_stride, out, first_pos, i0, nq, kh, num_kv_heads, group, 64, scale);
    else if (hd == 128)
        tile(cache, num_slots, slots, q, q_stride, out, first_pos, i0, nq, kh, num_kv_heads, group, 128, scale);
    else
        tile(cache, num_slots, slots, q, q_stride, out, first_pos, i0, nq, kh, num_kv_heads, group, hd, scale);
}
#endif

/* q: query i's head h at q + i * q_stride + h * head_dim; out: [num_q, num_heads, head_dim]
   contiguous; slots: [num_ctx] int64, the context's tokens in order, the chunk's own last.
   Returns 1 where this build or these shapes are not supported (head_dim a multiple of 32, at most
   256; at most 64 query heads per KV head; num_q <= num_ctx). */
int loom_prefill_attention_bf16(const uint16_t *cache, int64_t num_slots, const int64_t *slots, int64_t num_ctx,
                                const uint16_t *q, int64_t q_stride, int64_t num_q, uint16_t *out, int64_t num_heads,
                                int64_t num_kv_heads, int64_t head_dim, float scale) {
#ifdef LOOM_PREFILL_NATIVE
    const int64_t group = num_heads / num_kv_heads;
    if (head_dim % 32 || head_dim > PF_HD_MAX || group * num_kv_heads != num_heads || group > PF_ROWS_MAX ||
        num_q > num_ctx || num_q < 1)
        return 1;
    const int64_t per_tile = PF_ROWS_MAX / group < PF_QUERIES_MAX ? PF_ROWS_MAX / group : PF_QUERIES_MAX;
    const int64_t tiles = (num_q + per_tile - 1) / per_tile;
    /* the last tiles see the most keys: hand them out first */
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t k = 0; k < tiles; k++)
        for (int64_t kh = 0; kh < num_kv_heads; kh++) {
            const int64_t i0 = (tiles - 1 - k) * per_tile;
            const int64_t nq = num_q - i0 < per_tile ? num_q - i0 : per_tile;
            one_tile(cache, num_slots, slots, q, q_stride, out, num_ctx - num_q, i0, nq, kh, num_kv_heads, group,
                     head_dim, scale);
        }
    return 0;
#else
    (void)cache, (void)num_slots, (void)slots, (void)num_ctx, (void)q, (void)q_stride, (void)num_q, (void)out;
    (void)num_heads, (void)num_kv_heads, (void)head_dim, (void)scale;
    return 1;
#endif
}
