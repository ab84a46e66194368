/* The two C loops bench/kernel.py measures kvarena against.
 *
 * Compiled at bench time with cc -O3 -march=native -ffast-math -fopenmp and
 * loaded with ctypes. Layout as in one layer of a kvarena arena whose
 * max_seq_len is n: K and V are (BH, n, D) contiguous, q and out (BH, D).
 */
#include <math.h>

/* decode attention of one query per (row, head) over all n positions:
 * the textbook three passes, threads split over BH */
void plain_attend(const float *q, const float *k, const float *v, float *out,
                  float *scores, long BH, long n, long D, int threads)
{
    const float scale = 1.0f / sqrtf((float)D);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long bh = 0; bh < BH; bh++) {
        const float *qh = q + bh * D, *kh = k + bh * n * D, *vh = v + bh * n * D;
        float *s = scores + bh * n, *o = out + bh * D;
        /* 1. scores over every position, the new one included */
        float max = -INFINITY;
        for (long t = 0; t < n; t++) {
            float dot = 0.0f;
            for (long i = 0; i < D; i++)
                dot += qh[i] * kh[t * D + i];
            s[t] = dot * scale;
            max = s[t] > max ? s[t] : max;
        }
        /* 2. softmax, the max subtracted for numerical stability */
        float sum = 0.0f;
        for (long t = 0; t < n; t++) {
            s[t] = expf(s[t] - max);
            sum += s[t];
        }
        /* 3. the weighted sum of V into a zeroed output */
        for (long i = 0; i < D; i++)
            o[i] = 0.0f;
        for (long t = 0; t < n; t++) {
            const float w = s[t] / sum;
            for (long i = 0; i < D; i++)
                o[i] += w * vh[t * D + i];
        }
    }
}

/* the streaming-read floor: read (sum) the same K and V bytes with the same
 * split over threads; 64 independent sums so that the adds keep up with
 * memory rather than wait on each other */
float plain_read(const float *k, const float *v, long BH, long n, long D, int threads)
{
    float total = 0.0f;
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(+:total)
    for (long bh = 0; bh < BH; bh++) {
        const float *kh = k + bh * n * D, *vh = v + bh * n * D;
        const long len = n * D, body = len - len % 64;
        float acc[64] = {0};
        for (long j = 0; j < body; j += 64)
            for (int u = 0; u < 64; u++)
                acc[u] += kh[j + u] + vh[j + u];
        for (long j = body; j < len; j++)
            acc[0] += kh[j] + vh[j];
        for (int u = 0; u < 64; u++)
            total += acc[u];
    }
    return total;
}
