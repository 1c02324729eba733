/* exp of 16 floats at once (AVX-512): the attention softmax's exps. glibc's expf is a scalar call:
 * 2.2M of them, a 32-request decode step of SmolLM2's attention, took 23 ms on one core of an
 * Intel Xeon guest, most of that kernel's time. Cephes' expf polynomial after a Cody-Waite
 * reduction, scaled by 2^n with scalef: within 1 ulp of glibc's expf over [-103, 88] (checked by
 * hand); below -104 it gives 0. */
#ifndef LOOM_VEXP_H
#define LOOM_VEXP_H
/* one reduction and polynomial for every width, so the 8- and 16-wide versions cannot drift apart */
static const float LOOM_EXP_LO = -104.f, LOOM_EXP_HI = 88.7f, LOOM_LOG2E = 1.44269504088896341f;
static const float LOOM_LN2_HI = 0.693359375f, LOOM_LN2_LO = -2.12194440e-4f; /* ln 2 in two parts */
static const float LOOM_EXP_POLY[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                       4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 loom_exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(LOOM_EXP_LO)), _mm512_set1_ps(LOOM_EXP_HI));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOOM_LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LOOM_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LOOM_LN2_LO), r);
    __m512 p = _mm512_set1_ps(LOOM_EXP_POLY[0]);
    for (int i = 1; i < 6; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(LOOM_EXP_POLY[i]));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* 8 at a time: the same reduction and polynomial; 2^n applied as two exponent-field powers, each
 * a normal float over the whole range (AVX2 has no scalef) */
static inline __m256 loom_exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(LOOM_EXP_LO)), _mm256_set1_ps(LOOM_EXP_HI));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOOM_LOG2E)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LOOM_LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LOOM_LN2_LO), r);
    __m256 p = _mm256_set1_ps(LOOM_EXP_POLY[0]);
    for (int i = 1; i < 6; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(LOOM_EXP_POLY[i]));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i ni = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(ni, 1), bias = _mm256_set1_epi32(127);
    const __m256 pow_a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
    const __m256 pow_b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, pow_a), pow_b);
}
#endif
#endif
