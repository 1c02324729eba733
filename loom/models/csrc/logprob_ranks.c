/* What a response reports of each sampled token's log-probabilities: the chosen token's rank (1 +
 * how many tokens score strictly higher) and the k best tokens, best first, ties in index order.
 * One pass over each row, where the torch path takes a comparison, a sum and a `topk` over the
 * vocabulary (loom/engine/sampler.py `token_logprobs`): 32 rows of SmolLM2's 49,152, 2 threads,
 * ~2.3 ms there. */
#include <math.h>
#include <stdint.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define LOGPROB_TOP_MAX 64

/* Keeps vals[0..*n) descending (ties in arrival order, i.e. index order), at most k of them. */
static inline void keep_best(float x, int64_t id, int64_t k, int64_t *n, int64_t *ids, float *vals) {
    if (*n == k && !(x > vals[k - 1])) return;
    int64_t pos = *n < k ? (*n)++ : k - 1;
    for (; pos > 0 && vals[pos - 1] < x; pos--) {
        vals[pos] = vals[pos - 1];
        ids[pos] = ids[pos - 1];
    }
    vals[pos] = x;
    ids[pos] = id;
}

static void one_row(const float *lp, int64_t vocab, int64_t chosen, int64_t k, int64_t *rank, int64_t *ids,
                    float *vals) {
    const float c = lp[chosen];
    int64_t above = 0, n = 0, v = 0;
#ifdef __AVX512F__
    const __m512 vc = _mm512_set1_ps(c);
    for (; v + 16 <= vocab; v += 16) {
        const __m512 x = _mm512_loadu_ps(lp + v);
        above += __builtin_popcount(_mm512_cmp_ps_mask(x, vc, _CMP_GT_OQ));
        if (k == 0) continue;
        /* most blocks hold nothing above the k-th best so far: one compare skips them */
        unsigned m = n < k ? 0xffffu : _mm512_cmp_ps_mask(x, _mm512_set1_ps(vals[k - 1]), _CMP_GT_OQ);
        while (m) {
            const int j = __builtin_ctz(m);
            m &= m - 1;
            keep_best(lp[v + j], v + j, k, &n, ids, vals);
        }
    }
#endif
    for (; v < vocab; v++) {
        above += lp[v] > c;
        if (k > 0) keep_best(lp[v], v, k, &n, ids, vals);
    }
    *rank = above + 1;
}

/* lp: [rows, vocab] float32, row r at lp + r * stride; chosen: [rows], each in [0, vocab); k <=
 * LOGPROB_TOP_MAX and <= vocab; rank: [rows]; top_ids, top_vals: [rows, k]. Returns 1 when k is out
 * of range, 2 when a chosen id is, having written nothing. */
int loom_logprob_ranks(const float *lp, int64_t rows, int64_t vocab, int64_t stride, const int64_t *chosen,
                       int64_t k, int64_t *rank, int64_t *top_ids, float *top_vals) {
    if (k < 0 || k > LOGPROB_TOP_MAX || k > vocab) return 1;
    for (int64_t r = 0; r < rows; r++)
        if (chosen[r] < 0 || chosen[r] >= vocab) return 2;
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; r++)
        one_row(lp + r * stride, vocab, chosen[r], k, rank + r, top_ids + r * k, top_vals + r * k);
    return 0;
}
