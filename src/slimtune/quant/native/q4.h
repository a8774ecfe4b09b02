/* The packed 4-bit weight the kernels read, and their entry points (q4_matmul.c). Other C
 * files compiled into the same library (slimtune.infer's decode step) call them through this. */
#ifndef SLIMTUNE_Q4_H
#define SLIMTUNE_Q4_H
#include <stdint.h>

/* A packed 4-bit weight, described once per layer (mirrored by slimtune.quant.native). */
typedef struct {
    const uint8_t *packed;   /* (out, in / 2) */
    int64_t out, in, blocksize;
    const float *lut;        /* the 16 code values */
    const float *absmax;     /* float per block, or NULL when double quantized */
    const uint8_t *absmax_codes;
    const float *nested, *nested_code;
    float offset;
    int64_t nested_blocksize;
} Weight4;

int slim_q4_matmul(const Weight4 *w, const float *x, int64_t batch, float *y, int threads,
                   int bf16);
int slim_q4_matmul_many(const Weight4 *const *w, int n, const float *x, int64_t batch,
                        float *const *y, int threads, int bf16);
int slim_f32_matmul(const float *w, int64_t out, int64_t in, const float *x, int64_t batch,
                    float *y, int threads);
#endif
