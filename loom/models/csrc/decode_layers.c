/* Every decoder layer of a decode step in one call, for a few rows of a bf16 model with int4
   linears: the same steps as the torch path (DecoderLayer.forward with native ops) in the same
   order, each rounding to bf16 where that path does, without returning to Python between them.
   At one decode row a step is otherwise mostly Python and dispatch around small kernels
   (loom/models/native.py has the numbers).

   layers: num_layers x LAYER_FIELDS pointers (as int64): input_norm, post_attn_norm, then codes,
   scales, zeros of qkv_proj, o_proj, gate_up_proj and down_proj (csrc/int4_matmul.c's layout),
   then that layer's KV cache [2 * kv_heads, num_slots, head_dim]. hidden: [rows, hidden_size]
   bf16, updated in place. cos / signed_sin: [rows, head_dim]; slots, block_table, context_lens:
   as for the cache write and paged decode. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "int4_matmul.h"
#include "vexp.h"

#define LAYER_FIELDS 15

/* the kernels of layer_ops.c and paged_decode.c */
void loom_rms_norm_bf16(const uint16_t *x, const uint16_t *weight, uint16_t *out, int64_t rows, int64_t dim,
                        float eps);
void loom_rope_write_bf16(uint16_t *qkv, int64_t row_stride, const uint16_t *cos, const uint16_t *signed_sin,
                          int64_t rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                          uint16_t *cache, int64_t num_slots, const int64_t *slots);
int loom_paged_decode_bf16(const uint16_t *cache, int64_t num_slots, const uint16_t *q, int64_t q_stride,
                           uint16_t *out, const int32_t *block_table, int64_t max_blocks,
                           const int32_t *context_lens, int64_t num_reqs, int64_t num_heads,
                           int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale);

static Int4Weight weight_at(const int64_t *fields, int64_t n, int64_t k) {
    const Int4Weight w = {(const uint8_t *)fields[0], (const uint16_t *)fields[1], (const uint16_t *)fields[2], n, k};
    return w;
}

static void add_into(uint16_t *hidden, const uint16_t *delta, int64_t count) { /* hidden + delta, rounded once */
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= count; i += 16)
        f32x16_to_bf16(_mm512_add_ps(bf16x16_to_f32(hidden + i), bf16x16_to_f32(delta + i)), hidden + i);
#elif defined(__AVX2__)
    for (; i + 8 <= count; i += 8)
        f32x8_to_bf16(_mm256_add_ps(bf16x8_to_f32(hidden + i), bf16x8_to_f32(delta + i)), hidden + i);
#endif
    for (; i < count; i++) hidden[i] = f32_to_bf16(bf16_to_f32(hidden[i]) + bf16_to_f32(delta[i]));
}

/* act = bf16(silu(gate)) * up, each rounded as torch rounds; the exps 16 at a time where AVX-512
 * has them (a scalar expf per value was ~0.5 ms of a one-row step) */
static void silu_mul(const uint16_t *gate, const uint16_t *up, uint16_t *act, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        const __m512 g = bf16x16_to_f32(gate + i);
        const __m512 e = loom_exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        uint16_t silu[16];
        f32x16_to_bf16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), silu);
        f32x16_to_bf16(_mm512_mul_ps(bf16x16_to_f32(silu), bf16x16_to_f32(up + i)), act + i);
    }
#elif defined(__AVX2__) && defined(__FMA__)
    for (; i + 8 <= n; i += 8) {
        const __m256 g = bf16x8_to_f32(gate + i);
        const __m256 e = loom_exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
        const __m256 silu = f32x8_round_bf16(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e)));
        f32x8_to_bf16(_mm256_mul_ps(silu, bf16x8_to_f32(up + i)), act + i);
    }
#endif
    for (; i < n; i++) {
        const float g = bf16_to_f32(gate[i]);
        const float silu = bf16_to_f32(f32_to_bf16(g / (1.f + expf(-g))));
        act[i] = f32_to_bf16(silu * bf16_to_f32(up[i]));
    }
}

/* The layer-by-layer path's MLP activation (rows past the fused decode's, prefill chunks): gate_up
   [rows, 2 * intermediate] (gate | up) into act [rows, intermediate], one pass where F.silu(gate) * up
   is two kernels and a bf16 temporary. */
void loom_silu_mul_bf16(const uint16_t *gate_up, int64_t rows, int64_t intermediate, uint16_t *act) {
#pragma omp parallel for schedule(static) if (rows * intermediate >= 16384)
    for (int64_t r = 0; r < rows; r++)
        silu_mul(gate_up + r * 2 * intermediate, gate_up + r * 2 * intermediate + intermediate,
                 act + r * intermediate, intermediate);
}

int loom_decode_layers(uint16_t *hidden, int64_t rows, const int64_t *layers, int64_t num_layers,
                       int64_t hidden_size, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                       int64_t intermediate, const uint16_t *cos, const uint16_t *signed_sin, const int64_t *slots,
                       int64_t num_slots, const int32_t *block_table, int64_t max_blocks,
                       const int32_t *context_lens, int64_t block_size, float eps, float attn_scale) {
    const int64_t h = hidden_size, q_size = num_heads * head_dim, qkv_size = (num_heads + 2 * num_kv_heads) * head_dim;
    if (rows < 1 || rows > INT4_MAX_ROWS || h % 32 || q_size % 32 || intermediate % 32 || qkv_size % 16 ||
        h % 16 || (2 * intermediate) % 16)
        return 1;
    const int64_t widest = 2 * intermediate > qkv_size ? 2 * intermediate : qkv_size;
    size_t floats = int4_scratch_floats(rows, h, widest);
    const size_t more = int4_scratch_floats(rows, intermediate, h);
    if (more > floats) floats = more;
    const size_t halves = (size_t)(rows * (h + qkv_size + q_size + widest + intermediate));
    float *scratch = malloc(floats * sizeof(float) + halves * sizeof(uint16_t));
    if (scratch == NULL) return 2;
    uint16_t *x = (uint16_t *)(scratch + floats), *qkv = x + rows * h, *attn = qkv + rows * qkv_size;
    uint16_t *out = attn + rows * q_size, *act = out + rows * widest;
    int status = 0;
    for (int64_t l = 0; l < num_layers && status == 0; l++) {
        const int64_t *f = layers + l * LAYER_FIELDS;
        uint16_t *cache = (uint16_t *)f[14];
        const Int4Weight w_qkv = weight_at(f + 2, qkv_size, h), w_o = weight_at(f + 5, h, q_size);
        const Int4Weight w_gu = weight_at(f + 8, 2 * intermediate, h), w_down = weight_at(f + 11, h, intermediate);

        loom_rms_norm_bf16(hidden, (const uint16_t *)f[0], x, rows, h, eps);
        int4_matmul_bf16(&w_qkv, x, h, rows, qkv, qkv_size, scratch);
        loom_rope_write_bf16(qkv, qkv_size, cos, signed_sin, rows, num_heads, num_kv_heads, head_dim, cache,
                             num_slots, slots);
        status = loom_paged_decode_bf16(cache, num_slots, qkv, qkv_size, attn, block_table, max_blocks, context_lens,
                                        rows, num_heads, num_kv_heads, head_dim, block_size, attn_scale);
        int4_matmul_bf16(&w_o, attn, q_size, rows, out, h, scratch);
        add_into(hidden, out, rows * h);

        loom_rms_norm_bf16(hidden, (const uint16_t *)f[1], x, rows, h, eps);
        int4_matmul_bf16(&w_gu, x, h, rows, out, 2 * intermediate, scratch);
        loom_silu_mul_bf16(out, rows, intermediate, act);
        int4_matmul_bf16(&w_down, act, intermediate, rows, out, h, scratch);
        add_into(hidden, out, rows * h);
    }
    free(scratch);
    return status;
}
