/* Top-p (then min-p) and the inverse-CDF draw of one token per row, without sorting the vocabulary.
 *
 * The tokens a row's nucleus can hold are its most likely ones, so the kernel takes the tokens at
 * or above a threshold (the row's best x 2^-4, lowered while their mass is short of p) and sorts
 * only those: a prefix of the descending order whose mass reaches p holds the whole nucleus.
 * Cumulative sums run in double and are stored as float, as torch's CPU cumsum does, so the cut
 * and the draw match the torch path (loom/engine/sampler.py `_draw_sorted`, `_draw`) token for
 * token but for exact ties in probability, which sort in index order here.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float prob;
    int32_t index;
} Candidate;

#define RADIX_BITS 11
#define INSERTION_MAX 48

static uint32_t descending_key(float prob) {
    uint32_t bits;
    memcpy(&bits, &prob, sizeof bits);
    return ~bits; /* probabilities are >= 0: their bit patterns order as integers */
}

/* The candidates by probability, highest first, ties in index order (they arrive in index order
 * and both sorts are stable); returns whichever of `a` and `spare` holds the result. */
static Candidate *sort_descending(Candidate *a, Candidate *spare, int64_t n) {
    if (n <= INSERTION_MAX) {
        for (int64_t i = 1; i < n; i++) {
            Candidate c = a[i];
            int64_t j = i;
            for (; j > 0 && a[j - 1].prob < c.prob; j--) a[j] = a[j - 1];
            a[j] = c;
        }
        return a;
    }
    /* LSD radix sort on the inverted bits, 3 passes of 11 bits: linear in n, where a comparison
     * sort of a flat row's thousands of candidates took most of the kernel's time */
    for (int shift = 0; shift < 32; shift += RADIX_BITS) {
        int64_t start[(1 << RADIX_BITS) + 1] = {0};
        for (int64_t i = 0; i < n; i++) start[((descending_key(a[i].prob) >> shift) & ((1 << RADIX_BITS) - 1)) + 1]++;
        for (int d = 0; d < (1 << RADIX_BITS); d++) start[d + 1] += start[d];
        for (int64_t i = 0; i < n; i++) spare[start[(descending_key(a[i].prob) >> shift) & ((1 << RADIX_BITS) - 1)]++] = a[i];
        Candidate *t = a;
        a = spare;
        spare = t;
    }
    return a;
}

#define LANES 16
#define SCAN_BLOCK 64

/* The row's largest value. Lane-wise maxima, so the compiler vectorizes it (a running `a > b ? a
 * : b` over the row is a reduction it leaves scalar: ~16x slower here). */
static float row_max(const float *row, int64_t vocab) {
    float lanes[LANES] = {0};
    int64_t v = 0;
    for (; v + LANES <= vocab; v += LANES) {
        for (int j = 0; j < LANES; j++) lanes[j] = row[v + j] > lanes[j] ? row[v + j] : lanes[j];
    }
    float best = 0.0f;
    for (; v < vocab; v++) best = row[v] > best ? row[v] : best;
    for (int j = 0; j < LANES; j++) best = lanes[j] > best ? lanes[j] : best;
    return best;
}

/* The mass of the tokens at or above `threshold` (one branch-free, vectorized pass). */
static float mass_above(const float *row, int64_t vocab, float threshold) {
    float sum = 0.0f;
    for (int64_t v = 0; v < vocab; v++) sum += row[v] >= threshold ? row[v] : 0.0f;
    return sum;
}

#define BISECTIONS 3 /* each a pass over the row (~5 us here); they shrink what is sorted to about the nucleus */

static int64_t draw_row(const float *row, int64_t vocab, float p, float uniform, float min_p, Candidate *cand,
                        Candidate *spare, float *kept) {
    float best = row_max(row, vocab);
    /* a threshold whose tokens hold mass p (best x 2^-4, 2^-7, ...), then bisected (in log scale)
     * toward the highest such threshold, so that few tokens beyond the nucleus are sorted */
    float low = best * 0x1p-4f, high = best * 2.0f;
    while (low > 0.0f && mass_above(row, vocab, low) < p) {
        high = low;
        low = low < 0x1p-120f ? 0.0f : low * 0x1p-3f;
    }
    for (int i = 0; i < BISECTIONS && low > 0.0f; i++) {
        float mid = sqrtf(low * high);
        if (!(mid > low && mid < high)) break;
        if (mass_above(row, vocab, mid) >= p) {
            low = mid;
        } else {
            high = mid;
        }
    }
    float threshold = low;
    int64_t n = 0;
    for (int64_t start = 0; start < vocab; start += SCAN_BLOCK) {
        int64_t end = start + SCAN_BLOCK < vocab ? start + SCAN_BLOCK : vocab;
        int any = 0;
        for (int64_t v = start; v < end; v++) any |= row[v] >= threshold;
        if (!any) continue; /* most blocks hold no candidate: one vectorized test skips them */
        for (int64_t v = start; v < end; v++) {
            if (row[v] >= threshold) {
                cand[n].prob = row[v];
                cand[n].index = (int32_t)v;
                n++;
            }
        }
    }
    if (n == 0) return 0; /* no number in the row (NaN): nothing to draw from */
    cand = sort_descending(cand, spare, n);
    /* a token is dropped when the mass strictly before it reaches p, then when below min_p x the best */
    double running = 0.0;
    float floor_p = min_p * cand[0].prob;
    for (int64_t i = 0; i < n; i++) {
        running += cand[i].prob;
        float before = (float)running - cand[i].prob;
        float k = before >= p ? 0.0f : cand[i].prob;
        kept[i] = k < floor_p ? 0.0f : k;
    }
    /* inverse CDF over the kept tokens in that order: the first whose cumulative mass exceeds u x total */
    running = 0.0;
    for (int64_t i = 0; i < n; i++) {
        running += kept[i];
        kept[i] = (float)running;
    }
    float target = uniform * kept[n - 1];
    int64_t last = 0;
    for (int64_t i = 0; i < n; i++) {
        if (kept[i] > target) return cand[i].index;
        if (i == 0 || kept[i] > kept[i - 1]) last = i;
    }
    return cand[last].index; /* target rounded up to the total: the last kept token */
}

/* probs [rows, vocab] float32 (row stride `stride`), p / uniform / min_p [rows] (min_p may be NULL:
 * none); out [rows] token ids. Returns 0, or -1 if scratch memory could not be had. */
int loom_top_p_draw(const float *probs, int64_t rows, int64_t vocab, int64_t stride, const float *p,
                    const float *uniform, const float *min_p, int64_t *out) {
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        Candidate *cand = malloc((size_t)vocab * 2 * sizeof(Candidate));
        float *kept = malloc((size_t)vocab * sizeof(float));
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < rows; r++) {
            if (cand == NULL || kept == NULL) {
                failed = 1; /* every thread still takes its share of the loop, as OpenMP requires */
                continue;
            }
            float row_min_p = min_p ? min_p[r] : 0.0f;
            out[r] = draw_row(probs + r * stride, vocab, p[r], uniform[r], row_min_p, cand, cand + vocab, kept);
        }
        free(cand);
        free(kept);
    }
    return failed ? -1 : 0;
}
