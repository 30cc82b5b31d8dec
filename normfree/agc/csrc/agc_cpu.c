/* Adaptive Gradient Clipping fused into one pass, for contiguous CPU tensors.
 *
 * Brock, De, Smith, Simonyan 2021, "High-Performance Large-Scale Image Recognition Without
 * Normalization", Sec. 4, Eq. (3): for each unit u (one index of dim 0 of a weight in PyTorch's
 * [out, in, *kernel] layout; a whole tensor of ndim <= 1),
 *
 *     G_u <- lambda * max(||W_u||, eps) / max(||G_u||, floor) * G_u   if ||G_u|| > lambda * max(||W_u||, eps)
 *
 * with floor = agc.GRAD_NORM_FLOOR (1e-6, DeepMind's), passed in by the caller.
 *
 * The torch-ops version reads W and G once for their norms and then G again to scale it. Here a
 * unit's weight and gradient are read together once, and the gradient is rewritten, while it is
 * still in the core's cache, only when the unit clips: the memory traffic of one copy of the
 * gradients. Squares are summed in double, so no norm of float32 values overflows; a unit whose
 * gradient or weight holds inf or NaN is left alone and flagged.
 *
 * Built and loaded by normfree/cpu_kernel.py; OpenMP threads come from the runtime torch loaded,
 * so torch.set_num_threads applies.
 */
#include <math.h>
#include <stdint.h>

enum { KEPT = 0, CLIPPED = 1, NONFINITE = 2 };

/* Index t of the tensor holding unit u: first_unit[t] <= u < first_unit[t + 1]. */
static int64_t owner(const int64_t *first_unit, int64_t n_tensors, int64_t u) {
    int64_t lo = 0, hi = n_tensors;
    while (hi - lo > 1) {
        int64_t mid = lo + (hi - lo) / 2;
        if (first_unit[mid] <= u) lo = mid; else hi = mid;
    }
    return lo;
}

/* clip_T(n_tensors, weights, grads, first_unit, unit_size, clipping, eps, floor, outcome, clipped, nonfinite)
 *   weights[t], grads[t]: data of tensor t, first_unit[n_tensors] + 1 prefix sums of unit counts,
 *   unit_size[t]: elements per unit; outcome: one byte per unit (scratch);
 *   clipped[t], nonfinite[t]: per-tensor counts, written. */
#define DEFINE_CLIP(NAME, T)                                                                                   \
    void NAME(int64_t n_tensors, T *const *weights, T *const *grads, const int64_t *first_unit,                 \
              const int64_t *unit_size, double clipping, double eps, double floor, int8_t *outcome,             \
              int64_t *clipped, int64_t *nonfinite) {                                                          \
        int64_t n_units = first_unit[n_tensors], n_elements = 0;                                               \
        for (int64_t t = 0; t < n_tensors; t++) n_elements += (first_unit[t + 1] - first_unit[t]) * unit_size[t]; \
        _Pragma("omp parallel for schedule(dynamic, 256) if (n_elements > 65536)")                              \
        for (int64_t u = 0; u < n_units; u++) {                                                                \
            int64_t t = owner(first_unit, n_tensors, u), m = unit_size[t];                                     \
            const T *w = weights[t] + (u - first_unit[t]) * m;                                                 \
            T *g = grads[t] + (u - first_unit[t]) * m;                                                         \
            double w2 = 0.0, g2 = 0.0;                                                                         \
            _Pragma("omp simd reduction(+ : w2, g2)")                                                          \
            for (int64_t i = 0; i < m; i++) {                                                                  \
                w2 += (double)w[i] * (double)w[i];                                                             \
                g2 += (double)g[i] * (double)g[i];                                                             \
            }                                                                                                  \
            double w_norm = sqrt(w2), g_norm = sqrt(g2);                                                       \
            double max_norm = clipping * (w_norm < eps ? eps : w_norm);                                        \
            /* an inf or NaN weight gives no threshold: the unit is left alone and flagged, as for a gradient */ \
            if (!isfinite(g2) || !isfinite(w2)) {                                                              \
                outcome[u] = NONFINITE;                                                                        \
            } else if (g_norm > max_norm) {                                                                    \
                T factor = (T)(max_norm / (g_norm > floor ? g_norm : floor));                                    \
                for (int64_t i = 0; i < m; i++) g[i] *= factor;                                                \
                outcome[u] = CLIPPED;                                                                          \
            } else {                                                                                           \
                outcome[u] = KEPT;                                                                             \
            }                                                                                                  \
        }                                                                                                      \
        for (int64_t t = 0; t < n_tensors; t++) {                                                              \
            clipped[t] = nonfinite[t] = 0;                                                                     \
            for (int64_t u = first_unit[t]; u < first_unit[t + 1]; u++) {                                      \
                clipped[t] += outcome[u] == CLIPPED;                                                           \
                nonfinite[t] += outcome[u] == NONFINITE;                                                       \
            }                                                                                                  \
        }                                                                                                      \
    }

DEFINE_CLIP(agc_clip_float32, float)
DEFINE_CLIP(agc_clip_float64, double)
