/* kernel_impl.h: the attention kernel's body, compiled once per instruction
 * set and compute type. kernel.h includes it with
 *     KV_REAL  float or double (the compute type)
 *     KV_FN(x) x with a suffix naming the variant, e.g. x##_f_avx2
 *     KV_DOUBLE, KV_BIG  1 and a huge double, or 0 and a huge float
 *     KV_VBYTES  the instruction set's vector width in bytes
 *     KV_F16C    halves the CPU converts per instruction (16, 8; 0: none)
 * under a `#pragma GCC target` for the instruction set, so the same source
 * is vectorised for AVX-512, AVX2 and the x86-64 baseline.
 *
 * Legend: B rows, H key/value heads, G query heads per K/V head, S slots,
 * D head_dim, T new positions, BLK rows read per block.
 */

/* row reader: n rows of one (row, head) block, from slot `slot` on, as KV_REAL */
static void KV_FN(read_run)(const kv_layer *c, int kv, ptrdiff_t bh, ptrdiff_t slot,
                            ptrdiff_t n, KV_REAL *dst)
{
    const ptrdiff_t D = c->D, first = (bh * c->S + slot) * D, m = n * D;
    switch (c->dtype) {
    case KV_F32: {
        const float *s = (const float *)c->data[kv] + first;
#pragma omp simd
        for (ptrdiff_t i = 0; i < m; i++) dst[i] = (KV_REAL)s[i];
        break;
    }
    case KV_F64: {
        const double *s = (const double *)c->data[kv] + first;
#pragma omp simd
        for (ptrdiff_t i = 0; i < m; i++) dst[i] = (KV_REAL)s[i];
        break;
    }
    case KV_F16: {
        const uint16_t *s = (const uint16_t *)c->data[kv] + first;
        ptrdiff_t i = 0;
#if KV_F16C == 16 && !KV_DOUBLE     /* the CPU converts 16 halves at once */
        for (; i + 16 <= m; i += 16)
            _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + i))));
#elif KV_F16C == 8 && !KV_DOUBLE
        for (; i + 8 <= m; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
#endif
        for (; i < m; i++) dst[i] = (KV_REAL)kv_half_to_float(s[i]);
        break;
    }
    case KV_I8: {
        const int8_t *s = (const int8_t *)c->data[kv] + first;
        const float *scale = c->scale[kv] + bh * c->S + slot;
        for (ptrdiff_t r = 0; r < n; r++) {
            const KV_REAL f = (KV_REAL)scale[r];
#pragma omp simd
            for (ptrdiff_t d = 0; d < D; d++) dst[r * D + d] = f * (KV_REAL)s[r * D + d];
        }
        break;
    }
    }
}

/* rotation: x (one D-vector) by its logical position `pos` */
static void KV_FN(rotate)(const kv_layer *c, KV_REAL *x, ptrdiff_t pos)
{
    const ptrdiff_t half = c->D / 2;
    const float *cs = c->rope_cos + pos * half, *sn = c->rope_sin + pos * half;
    if (c->rope_interleaved) {          /* pairs (2i, 2i + 1) */
        for (ptrdiff_t i = 0; i < half; i++) {
            const KV_REAL a = x[2 * i], b = x[2 * i + 1];
            x[2 * i] = a * cs[i] - b * sn[i];
            x[2 * i + 1] = a * sn[i] + b * cs[i];
        }
    } else {                            /* pairs (i, i + D/2) */
#pragma omp simd
        for (ptrdiff_t i = 0; i < half; i++) {
            const KV_REAL a = x[i], b = x[i + half];
            x[i] = a * cs[i] - b * sn[i];
            x[i + half] = a * sn[i] + b * cs[i];
        }
    }
}

/* the instruction set's native vector, loadable at any float alignment */
typedef KV_REAL KV_FN(vec) __attribute__((vector_size(KV_VBYTES), aligned(sizeof(KV_REAL))));


/* dot product of two D-vectors, in registers: two vector sums, then a tree of the lanes */
static inline KV_REAL KV_FN(dot)(const KV_REAL *a, const KV_REAL *b, ptrdiff_t D)
{
    typedef KV_FN(vec) vec;
    const ptrdiff_t W = KV_VBYTES / sizeof(KV_REAL);
    vec s0 = {0}, s1 = {0};
    ptrdiff_t d = 0;
    for (; d + 2 * W <= D; d += 2 * W) {
        s0 += *(const vec *)(a + d) * *(const vec *)(b + d);
        s1 += *(const vec *)(a + d + W) * *(const vec *)(b + d + W);
    }
    if (d + W <= D) {
        s0 += *(const vec *)(a + d) * *(const vec *)(b + d);
        d += W;
    }
    s0 += s1;
    KV_REAL s = 0;
    for (ptrdiff_t w = 0; w < W; w++) s += s0[w];
    for (; d < D; d++) s += a[d] * b[d];
    return s;
}

/* acc += sum over r < n of p[r] * values[r]. Up to four native vectors
 * of acc stay in registers for the whole block, each with two sums (even
 * and odd rows) so that no add waits on the one before; the rows are read
 * in order */
static inline void KV_FN(accumulate)(KV_REAL *acc, const KV_REAL *p, const KV_REAL *values,
                                     ptrdiff_t n, ptrdiff_t D)
{
    typedef KV_FN(vec) vec;
    const ptrdiff_t W = KV_VBYTES / sizeof(KV_REAL);
    ptrdiff_t d = 0;
    for (; d + 4 * W <= D; d += 4 * W) {
        vec e0 = {0}, e1 = {0}, e2 = {0}, e3 = {0}, o0 = {0}, o1 = {0}, o2 = {0}, o3 = {0};
        const KV_REAL *v = values + d;
        ptrdiff_t r = 0;
        for (; r + 2 <= n; r += 2, v += 2 * D) {
            const KV_REAL pe = p[r], po = p[r + 1];
            e0 += pe * *(const vec *)v;
            e1 += pe * *(const vec *)(v + W);
            e2 += pe * *(const vec *)(v + 2 * W);
            e3 += pe * *(const vec *)(v + 3 * W);
            o0 += po * *(const vec *)(v + D);
            o1 += po * *(const vec *)(v + D + W);
            o2 += po * *(const vec *)(v + D + 2 * W);
            o3 += po * *(const vec *)(v + D + 3 * W);
        }
        if (r < n) {
            const KV_REAL pe = p[r];
            e0 += pe * *(const vec *)v;
            e1 += pe * *(const vec *)(v + W);
            e2 += pe * *(const vec *)(v + 2 * W);
            e3 += pe * *(const vec *)(v + 3 * W);
        }
        *(vec *)(acc + d) += e0 + o0;
        *(vec *)(acc + d + W) += e1 + o1;
        *(vec *)(acc + d + 2 * W) += e2 + o2;
        *(vec *)(acc + d + 3 * W) += e3 + o3;
    }
    for (; d + W <= D; d += W) {    /* fewer than four vectors left */
        vec e = {0}, o = {0};
        ptrdiff_t r = 0;
        for (; r + 2 <= n; r += 2) {
            e += p[r] * *(const vec *)(values + r * D + d);
            o += p[r + 1] * *(const vec *)(values + (r + 1) * D + d);
        }
        if (r < n) e += p[r] * *(const vec *)(values + r * D + d);
        *(vec *)(acc + d) += e + o;
    }
    for (; d < D; d++) {            /* the last D mod W lanes */
        KV_REAL e = 0;
        for (ptrdiff_t r = 0; r < n; r++) e += p[r] * values[r * D + d];
        acc[d] += e;
    }
}

/* rows at logical positions pos .. pos + n - 1 of (row b, head h): a pointer
 * into the arena when they are stored as KV_REAL in one run and need no
 * rotation, else converted (and rotated) into `tile` */
static const KV_REAL *KV_FN(load_rows)(const kv_layer *c, int kv, ptrdiff_t b, ptrdiff_t h,
                                       ptrdiff_t pos, ptrdiff_t n, KV_REAL *tile)
{
    const ptrdiff_t bh = b * c->H + h, D = c->D;
    ptrdiff_t slot = kv_slot(c, b, pos), run = kv_run(c, b, pos, n);
    const int rotate = kv == 0 && c->rope_cos != NULL;
    if (run == n && !rotate && c->dtype == (sizeof(KV_REAL) == 4 ? KV_F32 : KV_F64))
        return (const KV_REAL *)c->data[kv] + (bh * c->S + slot) * D;
    for (ptrdiff_t done = 0; done < n; done += run) {
        slot = kv_slot(c, b, pos + done);
        run = kv_run(c, b, pos + done, n - done);
        KV_FN(read_run)(c, kv, bh, slot, run, tile + done * D);
    }
    if (rotate)
        for (ptrdiff_t r = 0; r < n; r++) KV_FN(rotate)(c, tile + r * D, pos + r);
    return tile;
}

/* e^x for x <= 0: 2^k e^r with k = round(x / ln2), |r| <= ln2 / 2, and a
 * degree-6 polynomial for e^r; exactly 0 below -87, so no subnormal weight
 * ever reaches the sum of values. r = x - k ln2 in one step (the build's
 * reassociation would fold a two-constant split anyway): relative error
 * about |x| 2^-24, far below what a softmax weight needs */
#ifndef KV_EXP_POLY
#define KV_EXP_POLY(p, f)                                                     \
    p = 1.3888889e-3f * (f) + 8.3333333e-3f;                                  \
    p = p * (f) + 4.1666667e-2f;                                              \
    p = p * (f) + 1.6666667e-1f;                                              \
    p = p * (f) + 0.5f;                                                       \
    p = p * (f) + 1.0f;                                                       \
    p = p * (f) + 1.0f
#endif

static inline KV_REAL KV_FN(exp_neg)(KV_REAL x)
{
#if KV_DOUBLE
    return exp(x);
#else
    if (!(x >= -87.0f)) return 0.0f;     /* NaN too */
    const int32_t ki = (int32_t)(x * 1.44269504f - 0.5f);
    const float f = x - (float)ki * 0.69314718f;
    float p;
    KV_EXP_POLY(p, f);
    union { float f; int32_t i; } two_k = { .i = (ki + 127) << 23 };
    return p * two_k.f;
#endif
}

/* w[r] = e^(w[r] - best) for r < n, a native vector at a time (the same
 * steps as exp_neg, lane-wise); returns their sum */
static inline KV_REAL KV_FN(softmax_weights)(KV_REAL *w, ptrdiff_t n, KV_REAL best)
{
    KV_REAL total = 0;
    ptrdiff_t r = 0;
#if !KV_DOUBLE && (defined(__clang__) || __GNUC__ >= 9)   /* __builtin_convertvector */
    typedef KV_FN(vec) vec;
    typedef int32_t ivec __attribute__((vector_size(KV_VBYTES), aligned(4)));
    const ptrdiff_t W = KV_VBYTES / sizeof(float);
    vec sum = {0};
    for (; r + W <= n; r += W) {
        vec x = *(const vec *)(w + r) - best;
        const ivec under = (x < -87.0f) | (x != x);          /* lanes that become 0, NaN too */
        const vec lowest = (vec){0} - 87.0f;
        x = (vec)(((ivec)x & ~under) | ((ivec)lowest & under));   /* clamp before converting */
        const ivec ki = __builtin_convertvector(x * 1.44269504f - 0.5f, ivec);
        const vec f = x - __builtin_convertvector(ki, vec) * 0.69314718f;
        vec p;
        KV_EXP_POLY(p, f);
        const vec e = p * (vec)((ki + 127) << 23);
        *(vec *)(w + r) = (vec)((ivec)e & ~under);
        sum += *(const vec *)(w + r);
    }
    for (ptrdiff_t i = 0; i < W; i++) total += sum[i];
#endif
    for (; r < n; r++) {
        w[r] = KV_FN(exp_neg)(w[r] - best);
        total += w[r];
    }
    return total;
}

/* out[b, head, t, :] = acc * inv, in out's dtype and strides */
static void KV_FN(store)(const kv_query *q, ptrdiff_t b, ptrdiff_t head, ptrdiff_t t,
                         const KV_REAL *acc, KV_REAL inv, ptrdiff_t D)
{
    const ptrdiff_t off = b * q->os[0] + head * q->os[1] + t * q->os[2];
    for (ptrdiff_t d = 0; d < D; d++) {
        if (q->out_f64) ((double *)q->out)[off + d * q->os[3]] = (double)(acc[d] * inv);
        else ((float *)q->out)[off + d * q->os[3]] = (float)(acc[d] * inv);
    }
}

/* one work item: query heads h*G .. h*G + G - 1 of row b, query positions
 * t0 .. t0 + nt - 1, over logical positions [lo, hi) of the row */
static int KV_FN(attend_item)(const kv_job *job, ptrdiff_t item)
{
    const kv_layer *c = job->c;
    const kv_query *q = job->q;
    const ptrdiff_t D = c->D, G = job->G, chunk = item % job->n_chunks;
    const ptrdiff_t qtile = (item / job->n_chunks) % job->n_qtiles;
    const ptrdiff_t bh = item / (job->n_chunks * job->n_qtiles), b = bh / c->H, h = bh % c->H;
    const ptrdiff_t t0 = qtile * job->Tq, nt = kv_min(job->Tq, q->T - t0), Q = G * nt;
    const ptrdiff_t end = q->base[b] + t0 + nt;             /* the last query sees [0, end) */
    const ptrdiff_t lo = chunk * job->chunk_len, hi = kv_min(end, lo + job->chunk_len);
    const KV_REAL scale = (KV_REAL)(1.0 / sqrt((double)D));

    /* per-item scratch: the K and V tiles, queries, accumulators, scores,
     * each from a 64-byte boundary (kv_scratch's is one): a tile vector
     * split across two cache lines costs every store and load, and the
     * forwarding of each converted row from its store to the dot */
    const ptrdiff_t tile = kv_round64(KV_BLK * D * sizeof(KV_REAL)) / sizeof(KV_REAL);
    const ptrdiff_t rows = kv_round64(Q * D * sizeof(KV_REAL)) / sizeof(KV_REAL);
    const ptrdiff_t per_query = kv_round64(Q * sizeof(KV_REAL)) / sizeof(KV_REAL);
    const ptrdiff_t scores = kv_round64(Q * KV_BLK * sizeof(KV_REAL)) / sizeof(KV_REAL);
    KV_REAL *mem = (KV_REAL *)kv_scratch(sizeof(KV_REAL) *
                                         (2 * tile + 2 * rows + 2 * per_query + scores));
    if (!mem) return -1;
    KV_REAL *ktile = mem, *vtile = ktile + tile, *qv = vtile + tile, *acc = qv + rows;
    KV_REAL *m = acc + rows, *l = m + per_query, *w = l + per_query;

    /* query i = t * G + g is head h * G + g at position t0 + t */
    for (ptrdiff_t t = 0; t < nt; t++)
        for (ptrdiff_t g = 0; g < G; g++) {
            const ptrdiff_t i = t * G + g;
            const ptrdiff_t off = b * q->qs[0] + (h * G + g) * q->qs[1] + (t0 + t) * q->qs[2];
            for (ptrdiff_t d = 0; d < D; d++)
                qv[i * D + d] = q->q_f64 ? (KV_REAL)((const double *)q->q)[off + d * q->qs[3]]
                                         : (KV_REAL)((const float *)q->q)[off + d * q->qs[3]];
            if (c->rope_cos) KV_FN(rotate)(c, qv + i * D, q->base[b] + t0 + t);
            m[i] = -KV_BIG;
            l[i] = 0;
        }
    for (ptrdiff_t i = 0; i < Q * D; i++) acc[i] = 0;

    /* iterate over the positions [lo, hi): cached ones, then causal in the block */
    for (ptrdiff_t j0 = lo; j0 < hi; j0 += KV_BLK) {
        const ptrdiff_t n = kv_min(KV_BLK, hi - j0);
        const KV_REAL *keys = KV_FN(load_rows)(c, 0, b, h, j0, n, ktile);

        /* 1. scores q . k / sqrt(D), then the online softmax: rescale what
         *    was accumulated when the running maximum grows */
        for (ptrdiff_t i = 0; i < Q; i++) {
            const ptrdiff_t seen = kv_seen(q->base[b] + t0 + i / G, j0, n);
            KV_REAL *wi = w + i * KV_BLK, best = m[i];
            for (ptrdiff_t r = 0; r < seen; r++) {
                wi[r] = KV_FN(dot)(qv + i * D, keys + r * D, D) * scale;
                best = wi[r] > best ? wi[r] : best;
            }
            /* 2. softmax weights, max-subtracted for stability */
            const KV_REAL total = KV_FN(softmax_weights)(wi, seen, best);
            if (best > m[i]) {
                const KV_REAL shrink = KV_FN(exp_neg)(m[i] - best);
                l[i] *= shrink;
#pragma omp simd
                for (ptrdiff_t d = 0; d < D; d++) acc[i * D + d] *= shrink;
                m[i] = best;
            }
            l[i] += total;
        }

        /* 3. weighted sum of the values, each row read once for all Q queries */
        const KV_REAL *values = KV_FN(load_rows)(c, 1, b, h, j0, n, vtile);
        for (ptrdiff_t i = 0; i < Q; i++)
            KV_FN(accumulate)(acc + i * D, w + i * KV_BLK, values,
                              kv_seen(q->base[b] + t0 + i / G, j0, n), D);
    }

    /* one chunk: normalise into out; several: keep (m, l, acc) for the merge */
    for (ptrdiff_t i = 0; i < Q; i++) {
        const ptrdiff_t t = t0 + i / G, head = h * G + i % G;
        if (job->n_chunks == 1) {
            KV_FN(store)(q, b, head, t, acc + i * D, (KV_REAL)1 / l[i], D);
        } else {
            KV_REAL *part = (KV_REAL *)job->partial + kv_partial_index(job, b, head, t, chunk);
            part[0] = m[i];
            part[1] = l[i];
            for (ptrdiff_t d = 0; d < D; d++) part[2 + d] = acc[i * D + d];
        }
    }
    return 0;
}

/* combine the chunks of query (b, head, t): rescale each to the common maximum */
static void KV_FN(merge)(const kv_job *job, ptrdiff_t b, ptrdiff_t head, ptrdiff_t t,
                         void *scratch)
{
    KV_REAL *acc = (KV_REAL *)scratch;     /* D numbers */
    const ptrdiff_t D = job->c->D;
    KV_REAL best = -KV_BIG, total = 0;
    for (ptrdiff_t k = 0; k < job->n_chunks; k++) {
        const KV_REAL *part = (const KV_REAL *)job->partial + kv_partial_index(job, b, head, t, k);
        if (part[1] > 0 && part[0] > best) best = part[0];
    }
    for (ptrdiff_t d = 0; d < D; d++) acc[d] = 0;
    for (ptrdiff_t k = 0; k < job->n_chunks; k++) {
        const KV_REAL *part = (const KV_REAL *)job->partial + kv_partial_index(job, b, head, t, k);
        if (part[1] == 0) continue;     /* a chunk past this query's range */
        const KV_REAL f = KV_FN(exp_neg)(part[0] - best);
        total += f * part[1];
        for (ptrdiff_t d = 0; d < D; d++) acc[d] += f * part[2 + d];
    }
    KV_FN(store)(job->q, b, head, t, acc, (KV_REAL)1 / total, D);
}
