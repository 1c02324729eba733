/* Fused elementwise steps of a decoder layer in bf16, each one pass where the torch path takes
   3-8 small kernels (loom/models/native.py says why that matters). Each rounds to bf16 where the
   torch path does, so both give the same bits up to float32 summation order. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* out = bf16(x * rsqrt(mean(x^2) + eps) * weight) per row of x [rows, dim]: F.rms_norm rounds once */
void loom_rms_norm_bf16(const uint16_t *x, const uint16_t *weight, uint16_t *out, int64_t rows, int64_t dim,
                        float eps) {
#pragma omp parallel for schedule(static) if (rows * dim >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *h = x + r * dim;
        float sum = 0.f;
        for (int64_t i = 0; i < dim; i++) sum += bf16_to_f32(h[i]) * bf16_to_f32(h[i]);
        const float rstd = 1.f / sqrtf(sum / (float)dim + eps);
        uint16_t *o = out + r * dim;
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= dim; i += 16)
            f32x16_to_bf16(_mm512_mul_ps(_mm512_mul_ps(bf16x16_to_f32(h + i), _mm512_set1_ps(rstd)),
                                         bf16x16_to_f32(weight + i)), o + i);
#elif defined(__AVX2__)
        for (; i + 8 <= dim; i += 8)
            f32x8_to_bf16(_mm256_mul_ps(_mm256_mul_ps(bf16x8_to_f32(h + i), _mm256_set1_ps(rstd)),
                                        bf16x8_to_f32(weight + i)), o + i);
#endif
        for (; i < dim; i++) o[i] = f32_to_bf16(bf16_to_f32(h[i]) * rstd * bf16_to_f32(weight[i]));
    }
}

/* For each token t: rotates its q and k heads in place (x * cos + rotate_half(x) * sin, written
   as torch's x.mul_(cos).addcmul_(roll(x), signed_sin): two roundings), then writes its k and v
   heads into the cache at slots[t]. qkv row t: [q heads | k heads | v heads] x head_dim at
   qkv + t * row_stride; cos / signed_sin: [T, head_dim]; cache: [2 * kv_heads, num_slots, head_dim]. */
void loom_rope_write_bf16(uint16_t *qkv, int64_t row_stride, const uint16_t *cos, const uint16_t *signed_sin,
                          int64_t rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                          uint16_t *cache, int64_t num_slots, const int64_t *slots) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) if (rows >= 64)
    for (int64_t t = 0; t < rows; t++) {
        const uint16_t *c = cos + t * head_dim, *s = signed_sin + t * head_dim;
        uint16_t *row = qkv + t * row_stride;
        for (int64_t h = 0; h < num_heads + num_kv_heads; h++) {
            uint16_t *x = row + h * head_dim;
            float orig[256]; /* head_dim <= 256 (native.py checks) */
            int64_t i = 0;
#if defined(__AVX512F__)
            if (half % 16 == 0) { /* 16 at a time: a rolled chunk never wraps */
                for (; i < head_dim; i += 16) _mm512_storeu_ps(orig + i, bf16x16_to_f32(x + i));
                for (i = 0; i < head_dim; i += 16) {
                    const __m512 a = f32x16_round_bf16(_mm512_mul_ps(_mm512_loadu_ps(orig + i), bf16x16_to_f32(c + i)));
                    const __m512 rolled = _mm512_loadu_ps(orig + (i + half) % head_dim);
                    f32x16_to_bf16(_mm512_fmadd_ps(rolled, bf16x16_to_f32(s + i), a), x + i);
                }
                continue;
            }
#elif defined(__AVX2__) && defined(__FMA__)
            if (half % 8 == 0) { /* 8 at a time: a rolled chunk never wraps */
                for (; i < head_dim; i += 8) _mm256_storeu_ps(orig + i, bf16x8_to_f32(x + i));
                for (i = 0; i < head_dim; i += 8) {
                    const __m256 a = f32x8_round_bf16(_mm256_mul_ps(_mm256_loadu_ps(orig + i), bf16x8_to_f32(c + i)));
                    const __m256 rolled = _mm256_loadu_ps(orig + (i + half) % head_dim);
                    f32x8_to_bf16(_mm256_fmadd_ps(rolled, bf16x8_to_f32(s + i), a), x + i);
                }
                continue;
            }
#endif
            for (; i < head_dim; i++) orig[i] = bf16_to_f32(x[i]);
            for (i = 0; i < head_dim; i++) {
                const float rolled = orig[(i + half) % head_dim];
                x[i] = f32_to_bf16(bf16_to_f32(f32_to_bf16(orig[i] * bf16_to_f32(c[i]))) + rolled * bf16_to_f32(s[i]));
            }
        }
        for (int64_t j = 0; j < 2 * num_kv_heads; j++)
            memcpy(cache + (j * num_slots + slots[t]) * head_dim, row + (num_heads + j) * head_dim, head_dim * 2);
    }
}
