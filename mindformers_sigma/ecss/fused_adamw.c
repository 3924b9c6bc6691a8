/* The experts' AdamW step in one pass over each element: read p, g, m, v; write p, m, v (28 bytes per
 * float32 parameter).  The same operations in the same order as the numpy rule in host_adamw.py, each
 * rounded to float32 (built with -ffp-contract=off, no fast-math), so the results are bitwise equal.
 * Rows (experts) are split over OpenMP threads; each element is independent, so any split gives the
 * same bits. */
#include <math.h>
#include <stdint.h>

void adamw_rows(float *param, float *moment1, float *moment2, const float *grad, const int64_t *rows,
                int64_t row_count, int64_t row_size, float beta1, float beta2, float eps, float rate,
                float decay) {
    const float one_minus_beta1 = 1.0f - beta1, one_minus_beta2 = 1.0f - beta2;
#pragma omp parallel for schedule(static)
    for (int64_t index = 0; index < row_count; ++index) {
        float *p = param + rows[index] * row_size;
        float *m = moment1 + rows[index] * row_size;
        float *v = moment2 + rows[index] * row_size;
        const float *g = grad + index * row_size;
        for (int64_t i = 0; i < row_size; ++i) {
            const float gi = g[i];
            const float mi = m[i] * beta1 + gi * one_minus_beta1;
            const float vi = v[i] * beta2 + (gi * gi) * one_minus_beta2;
            float step = mi / (sqrtf(vi) + eps);
            if (decay != 0.0f) step = step + decay * p[i];
            m[i] = mi;
            v[i] = vi;
            p[i] = p[i] - step * rate;
        }
    }
}
