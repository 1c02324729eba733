/* The int4 decode matmul's parts, shared with the fused decode layers (csrc/int4_matmul.c). */
#ifndef LOOM_INT4_MATMUL_H
#define LOOM_INT4_MATMUL_H
#include <omp.h>
#include <stddef.h>
#include <stdint.h>

#define INT4_MAX_ROWS 64
#define INT4_TILE 4      /* activation rows sharing one pass over a weight row (bf16 dots, AVX2) */
#define INT4_FMA_TILE 8  /* the same for AVX-512 float32 FMAs: 16 accumulators of 32 registers */
#define INT4_PAIR_MIN_ROWS 24 /* from here on two output tiles at a time, codes turned into floats once */


typedef struct {
    const uint8_t *codes;   /* [n, k / 2] */
    const uint16_t *scales; /* [n, k / 32] bf16 */
    const uint16_t *zeros;  /* [n, k / 32] bf16 */
    int64_t n, k;
} Int4Weight;

/* x bf16 [rows, k] -> float32 values and per-32 block sums (the zero term's input). */
void int4_prepare_rows(const uint16_t *x, int64_t x_stride, int64_t rows, int64_t k, float *xf, float *sums);

/* Output tiles [t_begin, t_end) (16 output rows each) of every activation row, in float32. */
void int4_rows(const Int4Weight *w, const float *xf, const uint16_t *xb, int64_t xb_stride, const float *sums,
               int64_t rows, int64_t t_begin, int64_t t_end, float *out, int64_t out_stride);

/* Where the build has bf16 dot instructions (loom_int4_has_dot), the kernel uses them (0, the
   default) or float32 FMAs (1): the faster differs between CPUs (native.choose_int4_kernel). */
void loom_int4_use_fma(int on);
int loom_int4_has_dot(void);

/* out (bf16, rounded once) = x @ W.T for rows <= INT4_MAX_ROWS; scratch: int4_scratch_floats floats. */
size_t int4_scratch_floats(int64_t rows, int64_t k, int64_t n);
void int4_matmul_bf16(const Int4Weight *w, const uint16_t *x, int64_t x_stride, int64_t rows, uint16_t *out,
                      int64_t out_stride, float *scratch);

#endif
