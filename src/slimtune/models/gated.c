/* SwiGLU's elementwise passes for training, float32: the product silu(g) u and its gradients.
 *
 * torch runs them as separate passes over (tokens x intermediate) tensors: silu, then the
 * product; in backward silu again, two products and silu's own backward. Each reads and
 * writes whole tensors, so the MLP's elementwise work is bound by memory, not arithmetic.
 * Here the forward is one pass (read g and u, write the product) and the backward one (read
 * the gradient, g and u, write both gradients), with e^x in plain arithmetic (q4.h) so that
 * the loops vectorize.
 *
 * The formulas are torch's, in its order: silu(g) = g / (1 + e^-g), and the gradient of g is
 * (grad u) s (1 + g (1 - s)) with s = 1 / (1 + e^-g). Only e^x differs (within 2 ulp).
 */
#include <omp.h>
#include <stdint.h>

#include "q4.h"

#define SPAN 8192 /* values a task: 32 KB of each tensor, enough to amortise the loop's start */

static void forward_span(const float *gate, const float *up, float *out, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) out[i] = gate[i] / (1.0f + exp_approx(-gate[i])) * up[i];
}

static void backward_span(const float *grad, const float *gate, const float *up, float *grad_gate,
                          float *grad_up, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        const float g = gate[i], e = 1.0f + exp_approx(-g);
        const float s = 1.0f / e;
        grad_up[i] = grad[i] * (g / e);
        grad_gate[i] = grad[i] * up[i] * s * (1.0f + g * (1.0f - s));
    }
}

static inline int64_t span(int64_t start, int64_t n) { return start + SPAN < n ? SPAN : n - start; }

/* out = silu(gate) * up, n values. */
int slim_swiglu_forward(const float *gate, const float *up, float *out, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t start = 0; start < n; start += SPAN)
        forward_span(gate + start, up + start, out + start, span(start, n));
    return 0;
}

/* grad_gate and grad_up of out = silu(gate) * up, given grad = d loss / d out. */
int slim_swiglu_backward(const float *grad, const float *gate, const float *up, float *grad_gate,
                         float *grad_up, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t start = 0; start < n; start += SPAN)
        backward_span(grad + start, gate + start, up + start, grad_gate + start, grad_up + start,
                      span(start, n));
    return 0;
}
