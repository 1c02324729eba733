/* bf16 <-> float32 as PyTorch converts them, and the vector helpers around them; shared by the
   kernels in this folder. */
#ifndef LOOM_BF16_H
#define LOOM_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN stays NaN (as torch rounds) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if defined(__AVX2__) && !defined(__AVX512F__)
#include <immintrin.h>

static inline __m256 bf16x8_to_f32(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* 8 values at once, bit for bit as f32_to_bf16, the bf16 bits in the high half of each lane */
static inline __m256i f32x8_round_bf16_bits(__m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
    const __m256 quiet = _mm256_castsi256_ps(_mm256_or_si256(u, _mm256_set1_epi32(0x400000)));
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), quiet, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
}

static inline void f32x8_to_bf16(__m256 x, uint16_t *p) {
    const __m256i b = _mm256_srli_epi32(f32x8_round_bf16_bits(x), 16);
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}

/* bf16_to_f32(f32_to_bf16(x)) for 8 values */
static inline __m256 f32x8_round_bf16(__m256 x) {
    return _mm256_castsi256_ps(_mm256_and_si256(f32x8_round_bf16_bits(x), _mm256_set1_epi32((int)0xffff0000u)));
}

/* the 8 lanes' sum, lane 0 first (AVX2 has no reduce-add) */
static inline float f32x8_sum(__m256 x) {
    float lanes[8], total = 0.f;
    _mm256_storeu_ps(lanes, x);
    for (int i = 0; i < 8; i++) total += lanes[i];
    return total;
}
#endif

#ifdef __AVX512F__
#include <immintrin.h>

static inline __m512 bf16x16_to_f32(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* 16 values at once, bit for bit as f32_to_bf16, the bf16 bits in the high half of each lane */
static inline __m512i f32x16_round_bf16_bits(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
}

static inline void f32x16_to_bf16(__m512 x, uint16_t *p) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(f32x16_round_bf16_bits(x), 16)));
}

/* bf16_to_f32(f32_to_bf16(x)) for 16 values */
static inline __m512 f32x16_round_bf16(__m512 x) {
    return _mm512_castsi512_ps(_mm512_and_si512(f32x16_round_bf16_bits(x), _mm512_set1_epi32((int)0xffff0000u)));
}
#endif

#endif
