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

/* the instruction set's native vector, loadable at any float alignment */
typedef KV_REAL KV_FN(vec) __attribute__((vector_size(KV_VBYTES), aligned(sizeof(KV_REAL))));
#define KV_W ((ptrdiff_t)(KV_VBYTES / sizeof(KV_REAL)))     /* lanes per vector */
/* four numbers of the compute type: the scores of four queries with one row */
typedef KV_REAL KV_FN(four) __attribute__((vector_size(4 * sizeof(KV_REAL))));
#define KV_INLINE static inline __attribute__((always_inline))
/* c + a * b for the last D mod W lanes, rounded once where the instruction
 * set fuses it (as the compiler does with the vector sums), else twice.
 * Written out: a lone query and four (dot, dot4), rows read in place and
 * converted (accumulate by storage type) must round alike, and left to the
 * compiler a scalar loop's rounding depends on how it vectorises the loop
 * (it multiplied a vector of products, then added them one by one) */
#if defined(__FMA__) && KV_DOUBLE
#define KV_MULADD(a, b, c) __builtin_fma((a), (b), (c))
#elif defined(__FMA__)
#define KV_MULADD(a, b, c) __builtin_fmaf((a), (b), (c))
#else
#define KV_MULADD(a, b, c) ((c) + (a) * (b))
#endif
#if KV_DOUBLE
#define KV_NATIVE KV_F64            /* the storage type read without conversion */
#else
#define KV_NATIVE KV_F32
#endif

/* row reader, the only code that knows how each storage type is laid out:
 * W stored elements from element i of p as one vector of the compute type.
 * `kind` is a constant at every call (the callers are always_inline), so
 * each caller compiles to straight-line code for one storage type. int8
 * elements come unscaled: the callers fold each row's scale into its score
 * and its weight, one multiply per row instead of one per element */
KV_INLINE KV_FN(vec) KV_FN(load)(const void *p, ptrdiff_t i, int kind)
{
    typedef KV_FN(vec) vec;
#if !KV_DOUBLE
    if (kind == KV_I8) {    /* sign-extend to 32 bits, then convert (GCC's generic
                               int8 -> float conversion is lane by lane) */
        const int8_t *b = (const int8_t *)p + i;
#if KV_HAVE_X86 && KV_VBYTES == 64
        return (vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)b)));
#elif KV_HAVE_X86 && KV_VBYTES == 32
        return (vec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)b)));
#else
        vec x;
        for (ptrdiff_t w = 0; w < KV_W; w++) x[w] = (KV_REAL)b[w];
        return x;
#endif
    }
    if (kind == KV_F16) {
        const uint16_t *h = (const uint16_t *)p + i;
#if KV_F16C == 16
        return (vec)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
#elif KV_F16C == 8
        return (vec)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
#else
        vec x;
        for (ptrdiff_t w = 0; w < KV_W; w++) x[w] = kv_half_to_float(h[w]);
        return x;
#endif
    }
#endif
    (void)kind;
    return *(const vec *)((const KV_REAL *)p + i);
}

/* one stored element, for the last D mod W lanes */
KV_INLINE KV_REAL KV_FN(load1)(const void *p, ptrdiff_t i, int kind)
{
    if (kind == KV_I8) return (KV_REAL)((const int8_t *)p)[i];
    if (kind == KV_F16) return (KV_REAL)kv_half_to_float(((const uint16_t *)p)[i]);
    return ((const KV_REAL *)p)[i];
}

/* the sum of a vector's lanes, as a fixed tree of halves (the build does
 * not reassociate, so every caller sums in exactly this order) */
KV_INLINE KV_REAL KV_FN(sum_lanes)(KV_FN(vec) v)
{
#if KV_HAVE_X86 && KV_VBYTES == 64 && !KV_DOUBLE
    return _mm512_reduce_add_ps((__m512)v);
#elif KV_HAVE_X86 && KV_VBYTES == 64
    return _mm512_reduce_add_pd((__m512d)v);
#elif KV_HAVE_X86 && KV_VBYTES == 32 && !KV_DOUBLE
    __m128 x = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
#elif KV_HAVE_X86 && KV_VBYTES == 32
    __m128d x = _mm_add_pd(_mm256_castpd256_pd128((__m256d)v), _mm256_extractf128_pd((__m256d)v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(x, _mm_unpackhi_pd(x, x)));
#else
    for (ptrdiff_t half = KV_W / 2; half > 0; half /= 2)
        for (ptrdiff_t w = 0; w < half; w++) v[w] += v[w + half];
    return v[0];
#endif
}

/* the lane sums of four vectors, lane i the sum of v[i], each in exactly
 * sum_lanes' order (the same pairs of lanes at every step, so the same
 * bits): one tree for all four, 14 instructions on AVX-512 (12 on AVX2;
 * the last gathers the four sums) where four trees take 32 */
KV_INLINE void KV_FN(sum_lanes4)(const KV_FN(vec) v[4], KV_FN(four) *s)
{
#if KV_HAVE_X86 && KV_VBYTES == 64 && !KV_DOUBLE
    const __m512 a = (__m512)v[0], b = (__m512)v[1], c = (__m512)v[2], d = (__m512)v[3];
    /* 256-bit halves: (a, b) and (c, d) side by side, each the sum of its halves */
    const __m512 ab = _mm512_shuffle_f32x4(a, b, 0x44) + _mm512_shuffle_f32x4(a, b, 0xee);
    const __m512 cd = _mm512_shuffle_f32x4(c, d, 0x44) + _mm512_shuffle_f32x4(c, d, 0xee);
    /* 128-bit quarters: one per vector, in order a, b, c, d */
    __m512 x = _mm512_shuffle_f32x4(ab, cd, 0x88) + _mm512_shuffle_f32x4(ab, cd, 0xdd);
    x += _mm512_permute_ps(x, 0x4e);        /* lanes i and i + 2 */
    x += _mm512_permute_ps(x, 0xb1);        /* lanes 0 and 1 */
    *s = (KV_FN(four))_mm512_castps512_ps128(
        _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
                              x));
#elif KV_HAVE_X86 && KV_VBYTES == 32 && !KV_DOUBLE
    const __m256 a = (__m256)v[0], b = (__m256)v[1], c = (__m256)v[2], d = (__m256)v[3];
    /* 128-bit halves: (a, b) and (c, d) side by side, each the sum of its halves */
    const __m256 ab = _mm256_permute2f128_ps(a, b, 0x20) + _mm256_permute2f128_ps(a, b, 0x31);
    const __m256 cd = _mm256_permute2f128_ps(c, d, 0x20) + _mm256_permute2f128_ps(c, d, 0x31);
    /* lanes i and i + 2: a, c in the low half, b, d in the high one */
    __m256 x = _mm256_shuffle_ps(ab, cd, 0x44) + _mm256_shuffle_ps(ab, cd, 0xee);
    x += _mm256_permute_ps(x, 0xb1);        /* lanes 0 and 1 */
    *s = (KV_FN(four))_mm256_castps256_ps128(
        _mm256_permutevar8x32_ps(x, _mm256_setr_epi32(0, 4, 2, 6, 0, 0, 0, 0)));
#else
    for (int i = 0; i < 4; i++) (*s)[i] = KV_FN(sum_lanes)(v[i]);
#endif
}

#if !KV_DOUBLE
/* the largest of a vector's lanes (no NaN), as the same tree of halves: a
 * chain of KV_W dependent maxima was most of quantize_row's time */
KV_INLINE float KV_FN(max_lanes)(KV_FN(vec) v)
{
#if KV_HAVE_X86 && KV_VBYTES == 64
    return _mm512_reduce_max_ps((__m512)v);
#elif KV_HAVE_X86 && KV_VBYTES == 32
    __m128 x = _mm_max_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps(x, x, 1)));
#else
    for (ptrdiff_t half = KV_W / 2; half > 0; half /= 2)
        for (ptrdiff_t w = 0; w < half; w++) v[w] = v[w + half] > v[w] ? v[w + half] : v[w];
    return v[0];
#endif
}
#endif

/* c + a * b, lane by lane, rounded once where the instruction set fuses
 * it. Written out for the dot products, whose first two steps compute
 * q0 * k0 + q2 * k2: left to the compiler, which of the two products it
 * fuses can differ between dot and dot4, or between two builds, once a
 * constant D unrolls the loop (the sum starting at 0 folds away), and a
 * query must get the same bits alone and with three others. The x86-64
 * baseline has no fused multiply-add, so nothing to choose there (other
 * CPUs build only that variant, and there the compiler may fuse) */
KV_INLINE KV_FN(vec) KV_FN(muladd)(KV_FN(vec) a, KV_FN(vec) b, KV_FN(vec) c)
{
#if KV_HAVE_X86 && KV_VBYTES == 64 && KV_DOUBLE
    return (KV_FN(vec))_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#elif KV_HAVE_X86 && KV_VBYTES == 64
    return (KV_FN(vec))_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif KV_HAVE_X86 && KV_VBYTES == 32 && KV_DOUBLE
    return (KV_FN(vec))_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#elif KV_HAVE_X86 && KV_VBYTES == 32
    return (KV_FN(vec))_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return c + a * b;
#endif
}

/* dot product of q with one stored row, in registers: two vector sums,
 * then a tree of the lanes */
KV_INLINE KV_REAL KV_FN(dot)(const KV_REAL *q, const void *row, ptrdiff_t D, int kind)
{
    typedef KV_FN(vec) vec;
    vec s0 = {0}, s1 = {0};
    ptrdiff_t d = 0;
    for (; d + 2 * KV_W <= D; d += 2 * KV_W) {
        s0 = KV_FN(muladd)(*(const vec *)(q + d), KV_FN(load)(row, d, kind), s0);
        s1 = KV_FN(muladd)(*(const vec *)(q + d + KV_W), KV_FN(load)(row, d + KV_W, kind), s1);
    }
    if (d + KV_W <= D) {
        s0 = KV_FN(muladd)(*(const vec *)(q + d), KV_FN(load)(row, d, kind), s0);
        d += KV_W;
    }
    KV_REAL s = KV_FN(sum_lanes)(s0 + s1);
    for (; d < D; d++) s = KV_MULADD(q[d], KV_FN(load1)(row, d, kind), s);
    return s;
}

/* the dot products of four queries with one stored row, each loaded once:
 * per query the sums of dot, in its order, so each gets dot's bits */
KV_INLINE void KV_FN(dot4)(const KV_REAL *const q[4], const void *row, ptrdiff_t D, int kind,
                           KV_FN(four) *s)
{
    typedef KV_FN(vec) vec;
    vec even[4] = {{0}}, odd[4] = {{0}};
    ptrdiff_t d = 0;
    for (; d + 2 * KV_W <= D; d += 2 * KV_W) {
        const vec k0 = KV_FN(load)(row, d, kind), k1 = KV_FN(load)(row, d + KV_W, kind);
        for (int i = 0; i < 4; i++) {
            even[i] = KV_FN(muladd)(*(const vec *)(q[i] + d), k0, even[i]);
            odd[i] = KV_FN(muladd)(*(const vec *)(q[i] + d + KV_W), k1, odd[i]);
        }
    }
    if (d + KV_W <= D) {
        const vec k0 = KV_FN(load)(row, d, kind);
        for (int i = 0; i < 4; i++) even[i] = KV_FN(muladd)(*(const vec *)(q[i] + d), k0, even[i]);
        d += KV_W;
    }
    for (int i = 0; i < 4; i++) even[i] += odd[i];
    KV_FN(sum_lanes4)(even, s);
    for (; d < D; d++) {
        const KV_REAL k = KV_FN(load1)(row, d, kind);
        for (int i = 0; i < 4; i++) (*s)[i] = KV_MULADD(q[i][d], k, (*s)[i]);
    }
}

/* the k queries q[i] as the dot products are to read them (query[i]).
 * With D = 4W as a constant (score and score4 compile it so: 64 floats on
 * AVX-512), or 8W for a lone query (score: 64 floats on AVX2), each is 4
 * or 8 vectors, copied into `held`, which the compiler keeps in registers
 * for a whole pass over the rows (on AVX-512, with 32 of them; AVX2 and
 * the baseline have 16 and spill some, measured no slower); read from q,
 * a query is loaded again for every row (a store to the scores could
 * change q, as far as the compiler knows). For four queries that is 20
 * vector loads per row instead of 4, more than Zen 4's load ports take in
 * the time of the 16 multiply-adds. `held` has room for `room` vectors a
 * query */
KV_INLINE void KV_FN(hold)(const KV_REAL *const q[], int k, ptrdiff_t D, KV_FN(vec) *held,
                           int room, const KV_REAL *query[])
{
    for (int i = 0; i < k; i++) {
        query[i] = q[i];
        if (D == 4 * KV_W || (room == 8 && D == 8 * KV_W)) {
            for (int j = 0; j < D / KV_W; j++)
                held[i * room + j] = *(const KV_FN(vec) *)(q[i] + j * KV_W);
            query[i] = (const KV_REAL *)(held + i * room);
        }
    }
}

/* acc += sum over r < n of p[r] * row r of `rows` in the nv (8 or 4; a
 * constant once inlined) native vectors of lanes from d: one chain of
 * multiply-adds per vector, in registers for the whole pass */
KV_INLINE void KV_FN(accumulate_lanes)(KV_REAL *acc, const KV_REAL *p, const void *rows,
                                       ptrdiff_t n, ptrdiff_t D, int kind, ptrdiff_t d, int nv)
{
    typedef KV_FN(vec) vec;
    vec e[8] = {{0}};
    for (ptrdiff_t r = 0; r < n; r++)
        for (int j = 0; j < nv; j++) e[j] += p[r] * KV_FN(load)(rows, r * D + d + j * KV_W, kind);
    for (int j = 0; j < nv; j++) *(vec *)(acc + d + j * KV_W) += e[j];
}

/* acc += sum over r < n of p[r] * row r of `rows`, in lanes `from` .. D - 1.
 * Up to eight native vectors of acc stay in registers for a whole pass
 * over the rows, read in order: a row of D = 64 floats is read in one pass
 * on AVX2 too (in two, the first half of every row and then the second,
 * streaming from memory took 1.25x the time; see kv_attend). Four vectors
 * or more are as many independent chains, enough to keep the units busy;
 * fewer would wait on their own adds, so each then keeps two sums (even
 * and odd rows). Every lane gets the same sums in the same order whichever
 * loop, here or in accumulate4, takes it */
KV_INLINE void KV_FN(accumulate)(KV_REAL *acc, const KV_REAL *p, const void *rows,
                                 ptrdiff_t n, ptrdiff_t D, int kind, ptrdiff_t from)
{
    typedef KV_FN(vec) vec;
    const ptrdiff_t W = KV_W;
    ptrdiff_t d = from;
    for (; d + 8 * W <= D; d += 8 * W) KV_FN(accumulate_lanes)(acc, p, rows, n, D, kind, d, 8);
    for (; d + 4 * W <= D; d += 4 * W) KV_FN(accumulate_lanes)(acc, p, rows, n, D, kind, d, 4);
#define KV_LD(r, off) KV_FN(load)(rows, (r) * D + d + (off), kind)
    for (; d + W <= D; d += W) {    /* fewer than four vectors left */
        vec e = {0}, o = {0};
        ptrdiff_t r = 0;
        for (; r + 2 <= n; r += 2) {
            e += p[r] * KV_LD(r, 0);
            o += p[r + 1] * KV_LD(r + 1, 0);
        }
        if (r < n) e += p[r] * KV_LD(r, 0);
        *(vec *)(acc + d) += e + o;
    }
#undef KV_LD
    for (; d < D; d++) {            /* the last D mod W lanes */
        KV_REAL e = 0;
        for (ptrdiff_t r = 0; r < n; r++)
            e = KV_MULADD(p[r], KV_FN(load1)(rows, r * D + d, kind), e);
        acc[d] += e;
    }
}

/* accumulate4 over the nv (4 or 2; a constant once inlined) native vectors
 * of lanes from d: the rows read whole and in order, each loaded once for
 * the four queries, with accumulate's sums: one chain per query and vector
 * when four vectors, even and odd rows when two */
KV_INLINE void KV_FN(accumulate4_lanes)(KV_REAL *const acc[4], const KV_REAL *const p[4],
                                        const void *rows, ptrdiff_t n, ptrdiff_t D, int kind,
                                        ptrdiff_t d, int nv)
{
    typedef KV_FN(vec) vec;
    const ptrdiff_t W = KV_W, step = nv == 4 ? 1 : 2;      /* rows a step */
#define KV_LD(r, j) KV_FN(load)(rows, (r) * D + d + (j) * W, kind)
    vec e[4][4] = {{{0}}}, o[4][2] = {{{0}}};   /* [query][vector], even (or all) and odd rows */
    ptrdiff_t r = 0;
    for (; r + step <= n; r += step) {
        vec a[4], b[2];
        for (int j = 0; j < nv; j++) a[j] = KV_LD(r, j);
        for (int j = 0; step == 2 && j < 2; j++) b[j] = KV_LD(r + 1, j);
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < nv; j++) {
                e[i][j] += p[i][r] * a[j];
                if (step == 2) o[i][j] += p[i][r + 1] * b[j];
            }
    }
    if (r < n)                          /* two vectors, an odd number of rows */
        for (int j = 0; j < 2; j++) {
            const vec a = KV_LD(r, j);
            for (int i = 0; i < 4; i++) e[i][j] += p[i][r] * a;
        }
#undef KV_LD
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < nv; j++)
            *(vec *)(acc[i] + d + j * W) += step == 2 ? e[i][j] + o[i][j] : e[i][j];
}

/* accumulate for four queries that weigh the same n rows: acc[i] += the
 * rows weighted by p[i], each row loaded once for the four; per query and
 * lane the sums of accumulate, in its order: the same bits. Four native
 * vectors of each query's acc at a time (16 sums, one per query and
 * vector), then two. Two at a time over the whole row read the first half
 * of every row of the run, then the second: a run of 256 rows is 64 KiB,
 * and out of cache that stride made the grouped call 8 x 32/8 x 16384 on 2
 * threads take 23.6-32.7 ms against 17.8-21.0 (five alternated processes) */
KV_INLINE void KV_FN(accumulate4)(KV_REAL *const acc[4], const KV_REAL *const p[4],
                                  const void *rows, ptrdiff_t n, ptrdiff_t D, int kind)
{
    ptrdiff_t d = 0;
    for (; d + 4 * KV_W <= D; d += 4 * KV_W)
        KV_FN(accumulate4_lanes)(acc, p, rows, n, D, kind, d, 4);
    for (; d + 2 * KV_W <= D; d += 2 * KV_W)       /* two or three vectors left */
        KV_FN(accumulate4_lanes)(acc, p, rows, n, D, kind, d, 2);
    /* the last vector and the last D mod W lanes: one query at a time */
    for (int i = 0; i < 4; i++) KV_FN(accumulate)(acc[i], p[i], rows, n, D, kind, d);
}

/* a run of rows in consecutive slots, as the loops below read it: stored
 * rows of type `kind` (int8 with one scale per row), or converted ones */
typedef struct {
    const void *rows;
    const float *scale;          /* int8: one per row; else NULL */
    ptrdiff_t n;
    int kind;
    const float *cos, *sin;      /* keys rotated in the dot product (pairs
                                    (i, i + D/2)): row r by cos, sin + r * D/2 */
} KV_FN(run);

#if !KV_DOUBLE
/* q . (row rotated by cs, sn), pairs (i, i + D/2): the key is rotated in
 * registers and never stored (float64 arenas rotate theirs in the tile) */
KV_INLINE KV_REAL KV_FN(dot_rotated)(const KV_REAL *q, const void *row, ptrdiff_t D, int kind,
                                     const float *cs, const float *sn)
{
    typedef KV_FN(vec) vec;
    const ptrdiff_t half = D / 2;
    vec s0 = {0}, s1 = {0};
    ptrdiff_t d = 0;
    for (; d + KV_W <= half; d += KV_W) {
        const vec lo = KV_FN(load)(row, d, kind), hi = KV_FN(load)(row, d + half, kind);
        const vec c = *(const vec *)(cs + d), s = *(const vec *)(sn + d);
        s0 += *(const vec *)(q + d) * (lo * c - hi * s);
        s1 += *(const vec *)(q + d + half) * (lo * s + hi * c);
    }
    KV_REAL sum = KV_FN(sum_lanes)(s0 + s1);
    for (; d < half; d++) {
        const KV_REAL a = KV_FN(load1)(row, d, kind), b = KV_FN(load1)(row, d + half, kind);
        sum += q[d] * (a * cs[d] - b * sn[d]) + q[d + half] * (a * sn[d] + b * cs[d]);
    }
    return sum;
}
#endif

/* w[r] = (q . row r) * scale (times the row's own scale when `scaled`)
 * for the n rows of a run; returns the largest of them and best */
KV_INLINE KV_REAL KV_FN(score_kind)(const KV_REAL *q, const KV_FN(run) *run, ptrdiff_t n,
                                    ptrdiff_t D, KV_REAL scale, KV_REAL *w, KV_REAL best,
                                    const kv_ahead *ahead, int kind, int scaled, int rotated)
{
    const ptrdiff_t stride = D * kv_elem_bytes[kind];
    ptrdiff_t ask = ahead ? ahead->first : n;
    KV_FN(vec) held[8];
    const KV_REAL *query;
    KV_FN(hold)(&q, 1, D, held, 8, &query);
    for (ptrdiff_t r = 0; r < n; r++) {
        if (r == ask) {
            kv_ask(ahead, r);
            ask += ahead->every;
        }
        const KV_REAL f = scaled ? scale * run->scale[r] : scale;
        const void *row = (const char *)run->rows + r * stride;
#if !KV_DOUBLE
        if (rotated)
            w[r] = KV_FN(dot_rotated)(query, row, D, kind, run->cos + r * (D / 2),
                                      run->sin + r * (D / 2)) * f;
        else
#endif
            w[r] = KV_FN(dot)(query, row, D, kind) * f;
        best = w[r] > best ? w[r] : best;
    }
    return best;
}

/* score_kind for four queries that see the same n rows (query heads of one
 * K/V head), each row loaded once for all four: w[i][r] and best[i] */
KV_INLINE void KV_FN(score4_kind)(const KV_REAL *const q[4], const KV_FN(run) *run, ptrdiff_t n,
                                  ptrdiff_t D, KV_REAL scale, KV_REAL *const w[4],
                                  KV_REAL best[4], const kv_ahead *ahead, int kind, int scaled)
{
    const ptrdiff_t stride = D * kv_elem_bytes[kind];
    ptrdiff_t ask = ahead ? ahead->first : n;
    KV_FN(four) top = {best[0], best[1], best[2], best[3]};
    KV_FN(vec) held[4 * 4];
    const KV_REAL *query[4];
    KV_FN(hold)(q, 4, D, held, 4, query);
    for (ptrdiff_t r = 0; r < n; r++) {
        if (r == ask) {
            kv_ask(ahead, r);
            ask += ahead->every;
        }
        const KV_REAL f = scaled ? scale * run->scale[r] : scale;
        KV_FN(four) s;
        KV_FN(dot4)(query, (const char *)run->rows + r * stride, D, kind, &s);
        s *= f;
        for (int i = 0; i < 4; i++) w[i][r] = s[i];
        const __typeof__(s > top) larger = s > top;        /* the lanes of s to keep */
        top = (KV_FN(four))(((__typeof__(larger))s & larger) | ((__typeof__(larger))top & ~larger));
    }
    for (int i = 0; i < 4; i++) best[i] = top[i];
}

/* acc[i] += the n rows of a run weighted by p[i] for the k (1 or 4) queries
 * (`scaled`: by p[i] times each row's scale) */
KV_INLINE void KV_FN(accumulate_kind)(KV_REAL *const acc[4], const KV_REAL *const p[4],
                                      const KV_FN(run) *run, ptrdiff_t n, ptrdiff_t D,
                                      int kind, int scaled, int k)
{
    KV_REAL scaled_p[4][KV_BLK];
    const KV_REAL *weight[4] = {p[0], p[1], p[2], p[3]};
    if (scaled)
        for (int i = 0; i < k; i++) {
            for (ptrdiff_t r = 0; r < n; r++) scaled_p[i][r] = p[i][r] * run->scale[r];
            weight[i] = scaled_p[i];
        }
    if (k == 4) KV_FN(accumulate4)(acc, weight, run->rows, n, D, kind);
    else KV_FN(accumulate)(acc[0], weight[0], run->rows, n, D, kind, 0);
}

/* the n rows of a run into dst as the compute type (int8 rows unscaled:
 * their scales apply as in place, so both ways give the same bits) */
KV_INLINE void KV_FN(convert_kind)(const KV_FN(run) *run, KV_REAL *dst, ptrdiff_t D, int kind)
{
    typedef KV_FN(vec) vec;
    const ptrdiff_t stride = D * kv_elem_bytes[kind];
    for (ptrdiff_t r = 0; r < run->n; r++, dst += D) {
        const void *row = (const char *)run->rows + r * stride;
        ptrdiff_t d = 0;
        for (; d + KV_W <= D; d += KV_W) *(vec *)(dst + d) = KV_FN(load)(row, d, kind);
        for (; d < D; d++) dst[d] = KV_FN(load1)(row, d, kind);
    }
}

/* the three above for a run's storage type: one branch per run, none per row */
KV_INLINE KV_REAL KV_FN(score_d)(const KV_REAL *q, const KV_FN(run) *run, ptrdiff_t n,
                                 ptrdiff_t D, KV_REAL scale, KV_REAL *w, KV_REAL best,
                                 const kv_ahead *ahead)
{
#if !KV_DOUBLE
    if (run->cos) {             /* keys rotated in the dot product: stored ones only */
        switch (run->kind) {
        case KV_F16: return KV_FN(score_kind)(q, run, n, D, scale, w, best, ahead, KV_F16, 0, 1);
        case KV_I8: return KV_FN(score_kind)(q, run, n, D, scale, w, best, ahead, KV_I8, 1, 1);
        default: return KV_FN(score_kind)(q, run, n, D, scale, w, best, ahead, KV_NATIVE, 0, 1);
        }
    }
#endif
    switch (run->kind) {
#if !KV_DOUBLE
    case KV_F16: return KV_FN(score_kind)(q, run, n, D, scale, w, best, ahead, KV_F16, 0, 0);
    case KV_I8: return KV_FN(score_kind)(q, run, n, D, scale, w, best, ahead, KV_I8, 1, 0);
#endif
    default:
        if (run->scale)
            return KV_FN(score_kind)(q, run, n, D, scale, w, best, ahead, KV_NATIVE, 1, 0);
        return KV_FN(score_kind)(q, run, n, D, scale, w, best, ahead, KV_NATIVE, 0, 0);
    }
}

/* score_d, with D = 4W and 8W compiled as constants (see hold) */
KV_INLINE KV_REAL KV_FN(score_D)(const KV_REAL *q, const KV_FN(run) *run, ptrdiff_t n,
                                 ptrdiff_t D, KV_REAL scale, KV_REAL *w, KV_REAL best,
                                 const kv_ahead *ahead)
{
    if (D == 4 * KV_W) return KV_FN(score_d)(q, run, n, 4 * KV_W, scale, w, best, ahead);
    if (D == 8 * KV_W) return KV_FN(score_d)(q, run, n, 8 * KV_W, scale, w, best, ahead);
    return KV_FN(score_d)(q, run, n, D, scale, w, best, ahead);
}

/* score_D, compiled apart for passes that ask and passes that do not: the
 * asking code in a loop that never asked made a call that streams take
 * 1.1x the time (8 x 12 x 16384, AVX2: 52-54 ms against 47.5, one thread) */
static KV_REAL KV_FN(score)(const KV_REAL *q, const KV_FN(run) *run, ptrdiff_t n, ptrdiff_t D,
                            KV_REAL scale, KV_REAL *w, KV_REAL best, const kv_ahead *ahead)
{
    if (ahead) return KV_FN(score_D)(q, run, n, D, scale, w, best, ahead);
    return KV_FN(score_D)(q, run, n, D, scale, w, best, NULL);
}

/* score for four queries, over a run whose keys are not rotated in the dot
 * product. Float16 and int8 runs reach it read in place only when
 * KV_CONVERT_FROM is built above 2 (four queries share a converted tile) */
KV_INLINE void KV_FN(score4_d)(const KV_REAL *const q[4], const KV_FN(run) *run, ptrdiff_t n,
                               ptrdiff_t D, KV_REAL scale, KV_REAL *const w[4], KV_REAL best[4],
                               const kv_ahead *ahead)
{
    switch (run->kind) {
#if !KV_DOUBLE
    case KV_F16: KV_FN(score4_kind)(q, run, n, D, scale, w, best, ahead, KV_F16, 0); break;
    case KV_I8: KV_FN(score4_kind)(q, run, n, D, scale, w, best, ahead, KV_I8, 1); break;
#endif
    default:
        if (run->scale) KV_FN(score4_kind)(q, run, n, D, scale, w, best, ahead, KV_NATIVE, 1);
        else KV_FN(score4_kind)(q, run, n, D, scale, w, best, ahead, KV_NATIVE, 0);
        break;
    }
}

/* score4_d, with D = 4W compiled as a constant (see hold), asking and not
 * compiled apart (see score) */
static void KV_FN(score4)(const KV_REAL *const q[4], const KV_FN(run) *run, ptrdiff_t n,
                          ptrdiff_t D, KV_REAL scale, KV_REAL *const w[4], KV_REAL best[4],
                          const kv_ahead *ahead)
{
    if (D == 4 * KV_W && ahead) KV_FN(score4_d)(q, run, n, 4 * KV_W, scale, w, best, ahead);
    else if (D == 4 * KV_W) KV_FN(score4_d)(q, run, n, 4 * KV_W, scale, w, best, NULL);
    else if (ahead) KV_FN(score4_d)(q, run, n, D, scale, w, best, ahead);
    else KV_FN(score4_d)(q, run, n, D, scale, w, best, NULL);
}

static void KV_FN(convert)(const KV_FN(run) *run, KV_REAL *dst, ptrdiff_t D)
{
    switch (run->kind) {
#if !KV_DOUBLE
    case KV_F16: KV_FN(convert_kind)(run, dst, D, KV_F16); break;
    case KV_I8: KV_FN(convert_kind)(run, dst, D, KV_I8); break;
#endif
    default: KV_FN(convert_kind)(run, dst, D, KV_NATIVE); break;
    }
}

/* weighted sums for k (1 or 4) queries that see the same n rows */
static void KV_FN(weigh)(KV_REAL *const acc[4], const KV_REAL *const p[4],
                         const KV_FN(run) *run, ptrdiff_t n, ptrdiff_t D, int k)
{
    switch (run->kind) {
#if !KV_DOUBLE
    case KV_F16: KV_FN(accumulate_kind)(acc, p, run, n, D, KV_F16, 0, k); break;
    case KV_I8: KV_FN(accumulate_kind)(acc, p, run, n, D, KV_I8, 1, k); break;
#endif
    default:
        if (run->scale) KV_FN(accumulate_kind)(acc, p, run, n, D, KV_NATIVE, 1, k);
        else KV_FN(accumulate_kind)(acc, p, run, n, D, KV_NATIVE, 0, k);
        break;
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

/* the rows at logical positions pos .. pos + n - 1 of (row b, head h) as
 * one run. In place, read in registers by every dot and accumulate, when
 * they lie in consecutive slots and `convert` is 0; else converted once
 * into `tile` as the compute type and rotated (keys), with their int8
 * scales in tile_scale, which pays when many queries share the block.
 * Either way a block is summed in the same order: the same bits (keys
 * rotated in the dot product excepted: rotation there rounds otherwise) */
static KV_FN(run) KV_FN(block)(const kv_layer *c, int kv, ptrdiff_t b, ptrdiff_t h,
                               ptrdiff_t pos, ptrdiff_t n, int convert, KV_REAL *tile,
                               float *tile_scale)
{
    KV_FN(run) runs[3];          /* at most three: sinks, the ring's end, its start */
    const ptrdiff_t bh = b * c->H + h, D = c->D;
    if (!c->ring_head && !convert && !(kv == 0 && c->rope_cos))    /* the common case */
        return (KV_FN(run)){kv_stored_row(c, kv, bh * c->S + pos),
                            kv_stored_scale(c, kv, bh * c->S + pos), n, c->dtype, NULL, NULL};
    int count = 0;
    for (ptrdiff_t done = 0, len; done < n; done += len) {
        const ptrdiff_t slot = kv_slot(c, b, pos + done);
        len = kv_run(c, b, pos + done, n - done);
        runs[count++] = (KV_FN(run)){kv_stored_row(c, kv, bh * c->S + slot),
                                     kv_stored_scale(c, kv, bh * c->S + slot),
                                     len, c->dtype, NULL, NULL};
    }
    /* keys to rotate: in the dot product for "half" pairs in float compute,
       else in the tile */
    const int rotate = kv == 0 && c->rope_cos != NULL;
    if (count == 1 && !convert && (!rotate || (!c->rope_interleaved && !KV_DOUBLE))) {
        if (rotate) {
            runs[0].cos = c->rope_cos + pos * (D / 2);
            runs[0].sin = c->rope_sin + pos * (D / 2);
        }
        return runs[0];
    }
    KV_REAL *dst = tile;
    float *dst_scale = tile_scale;
    for (int k = 0; k < count; dst += runs[k].n * D, dst_scale += runs[k].n, k++) {
        KV_FN(convert)(&runs[k], dst, D);
        if (runs[k].scale) memcpy(dst_scale, runs[k].scale, runs[k].n * sizeof(float));
    }
    if (rotate)
        for (ptrdiff_t r = 0; r < n; r++) KV_FN(rotate)(c, tile + r * D, pos + r);
    return (KV_FN(run)){tile, c->scale[kv] ? tile_scale : NULL, n, KV_NATIVE, NULL, NULL};
}

/* e^x for x <= 0: 2^k e^r with k = round(x / ln2), |r| <= ln2 / 2, and a
 * degree-6 polynomial for e^r; exactly 0 below -87, so no subnormal weight
 * ever reaches the sum of values. r = x - k ln2 in one step: relative
 * error about |x| 2^-24, far below what a softmax weight needs */
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
    total = KV_FN(sum_lanes)(sum);
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

#if !KV_DOUBLE
/* int8 storage: the D-vector x as int8 in q, rounded to nearest (ties to
 * even, the CPU's mode, as lrintf); returns its scale absmax / 127 (0 for
 * an all-zero vector). x must be finite: the caller (KVCache) refuses
 * NaN and infinity, whose conversion differs between instruction sets */
static float KV_FN(quantize_row)(const float *x, int8_t *q, ptrdiff_t D)
{
    typedef KV_FN(vec) vec;
    typedef int32_t ivec __attribute__((vector_size(KV_VBYTES), aligned(4)));
    vec most = {0};
    ptrdiff_t d = 0;
    for (; d + KV_W <= D; d += KV_W) {
        const vec a = (vec)((ivec) * (const vec *)(x + d) & 0x7fffffff);     /* |x| */
        const ivec larger = a > most;
        most = (vec)(((ivec)a & larger) | ((ivec)most & ~larger));
    }
    float big = KV_FN(max_lanes)(most);
    for (ptrdiff_t e = d; e < D; e++) big = fabsf(x[e]) > big ? fabsf(x[e]) : big;
    float inv = big > 0 ? 127.0f / big : 0.0f;
    if (inv > 3.0e38f) inv = 3.0e38f;       /* absmax below ~4e-37: keep x * inv finite */
    d = 0;
#if KV_HAVE_X86 && KV_VBYTES == 64
    for (; d + 16 <= D; d += 16)            /* round in the current mode, narrow to bytes */
        _mm_storeu_si128((__m128i *)(q + d), _mm512_cvtepi32_epi8(
            _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + d), _mm512_set1_ps(inv)))));
#elif KV_HAVE_X86 && KV_VBYTES == 32
    for (; d + 8 <= D; d += 8) {            /* |values| <= 127: the saturating packs are exact */
        const __m256i i32 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + d),
                                                             _mm256_set1_ps(inv)));
        const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32),
                                            _mm256_extracti128_si256(i32, 1));
        _mm_storel_epi64((__m128i *)(q + d), _mm_packs_epi16(i16, i16));
    }
#elif KV_HAVE_X86
    for (; d + 4 <= D; d += 4) {
        const __m128i i32 = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(x + d), _mm_set1_ps(inv)));
        const __m128i i16 = _mm_packs_epi32(i32, i32);
        const int32_t bytes = _mm_cvtsi128_si32(_mm_packs_epi16(i16, i16));
        memcpy(q + d, &bytes, 4);
    }
#endif
    for (; d < D; d++) q[d] = (int8_t)lrintf(x[d] * inv);
    return big / 127.0f;
}
#endif

#if !KV_DOUBLE
/* float16 storage: the D floats of x as halves in h, rounded to nearest,
 * ties to even (kv_float_to_half's rounding, and NumPy's) */
static void KV_FN(half_row)(const float *x, uint16_t *h, ptrdiff_t D)
{
    ptrdiff_t d = 0;
#if KV_F16C >= 16
    for (; d + 16 <= D; d += 16)
        _mm256_storeu_si256((__m256i *)(h + d),
                            _mm512_cvtps_ph(_mm512_loadu_ps(x + d), _MM_FROUND_TO_NEAREST_INT));
#endif
#if KV_F16C >= 8
    for (; d + 8 <= D; d += 8)
        _mm_storeu_si128((__m128i *)(h + d),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + d), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; d < D; d++) h[d] = kv_float_to_half(x[d]);
}
#endif

/* the rows of `run` from row r0 on */
KV_INLINE KV_FN(run) KV_FN(rows_from)(const KV_FN(run) *run, ptrdiff_t r0, ptrdiff_t D)
{
    KV_FN(run) rest = *run;
    rest.rows = (const char *)run->rows + r0 * D * kv_elem_bytes[run->kind];
    rest.n -= r0;
    if (rest.scale) rest.scale += r0;
    if (rest.cos) {
        rest.cos += r0 * (D / 2);
        rest.sin += r0 * (D / 2);
    }
    return rest;
}

/* 1. the scores q . k * scale of the Q queries qv (query i at position
 * first + i / G) with rows [r0, r1) of the block of n keys at position j0,
 * into w (query i's at w + i * blk), the largest of each query's so far in
 * best[i]. Three or four queries that see the same rows share a pass,
 * which loads each key row once for them; else one pass per query (also
 * when keys rotate in the dot product). Two in one pass with two dropped
 * took 1.05x the time of a pass each (1 x 16/8 x 256, in L2). The passes
 * ask for their shares of rows [r0, r1) of `next` (NULL: none) */
KV_INLINE void KV_FN(score_rows)(const kv_job *job, const KV_REAL *qv, ptrdiff_t Q,
                                 ptrdiff_t first, KV_REAL scale, const KV_FN(run) *keys,
                                 ptrdiff_t j0, ptrdiff_t n, ptrdiff_t r0, ptrdiff_t r1,
                                 KV_REAL *w, KV_REAL *best, KV_REAL *dropped, kv_ahead *next)
{
    const ptrdiff_t D = job->c->D, G = job->G, blk = job->blk;
    const int grouped = keys->cos == NULL;
    const KV_FN(run) rows = KV_FN(rows_from)(keys, r0, D);
    kv_ahead ahead;             /* the rows of `next` that line up with these */
    if (next) {
        ahead = kv_ahead_from(next, r0);
        next = &ahead;
    }
    for (ptrdiff_t i = 0, pass = 0; i < Q; pass++) {
        /* queries i .. i + k - 1, seeing the same rows */
        const ptrdiff_t k = kv_pass_size(i, Q, G, first, j0, n, grouped);
        const ptrdiff_t seen = kv_min(kv_seen(first + i / G, j0, n), r1) - r0;
        if (next) next->first = pass;
        if (seen > 0 && k == 1) {
            best[i] = KV_FN(score)(qv + i * D, &rows, seen, D, scale, w + i * blk + r0, best[i],
                                   next);
        } else if (seen > 0) {      /* fewer than four: the last one again, its scores dropped */
            const KV_REAL *qs[4];
            KV_REAL *ws[4], most[4];
            for (ptrdiff_t g = 0; g < 4; g++) {
                const ptrdiff_t at = i + kv_min(g, k - 1);
                qs[g] = qv + at * D;
                ws[g] = g < k ? w + at * blk + r0 : dropped;
                most[g] = best[at];
            }
            KV_FN(score4)(qs, &rows, seen, D, scale, ws, most, next);
            for (ptrdiff_t g = 0; g < k; g++) best[i + g] = most[g];
        }
        i += k;
    }
}

/* 3. acc += rows [r0, r1) of the block of n values at position j0 weighted
 * by the queries' softmax weights w (as score_rows lays them out), each
 * row read once for all Q queries and loaded once for each four of them
 * that see the same rows */
KV_INLINE void KV_FN(weigh_rows)(const kv_job *job, ptrdiff_t Q, ptrdiff_t first,
                                 const KV_FN(run) *values, ptrdiff_t j0, ptrdiff_t n,
                                 ptrdiff_t r0, ptrdiff_t r1, const KV_REAL *w, KV_REAL *acc)
{
    const ptrdiff_t D = job->c->D, G = job->G, blk = job->blk;
    const KV_FN(run) rows = KV_FN(rows_from)(values, r0, D);
    for (ptrdiff_t i = 0, k; i < Q; i += k) {
        k = kv_pass_size(i, Q, G, first, j0, n, 1) == 4 ? 4 : 1;
        const ptrdiff_t seen = kv_min(kv_seen(first + i / G, j0, n), r1) - r0;
        if (seen <= 0) continue;
        KV_REAL *accs[4];
        const KV_REAL *ps[4];
        for (ptrdiff_t g = 0; g < 4; g++) {
            accs[g] = acc + (i + kv_min(g, k - 1)) * D;
            ps[g] = w + (i + kv_min(g, k - 1)) * blk + r0;
        }
        KV_FN(weigh)(accs, ps, &rows, seen, D, (int)k);
    }
}

/* 2. the softmax weights of the n rows at j0 in w, max-subtracted for
 * stability (largest scores in best), and the online softmax: what was
 * accumulated rescaled when a query's running maximum m[i] grows; l[i]
 * sums the weights */
KV_INLINE void KV_FN(weights)(const kv_job *job, ptrdiff_t first, ptrdiff_t Q, ptrdiff_t j0,
                              ptrdiff_t n, KV_REAL *w, const KV_REAL *best, KV_REAL *m,
                              KV_REAL *l, KV_REAL *acc)
{
    const ptrdiff_t D = job->c->D, G = job->G;
    for (ptrdiff_t i = 0; i < Q; i++) {
        const KV_REAL most = best[i] > m[i] ? best[i] : m[i];
        const KV_REAL total =
            KV_FN(softmax_weights)(w + i * job->blk, kv_seen(first + i / G, j0, n), most);
        if (most > m[i]) {
            const KV_REAL shrink = KV_FN(exp_neg)(m[i] - most);
            l[i] *= shrink;
#pragma omp simd
            for (ptrdiff_t d = 0; d < D; d++) acc[i * D + d] *= shrink;
            m[i] = most;
        }
        l[i] += total;
    }
}

/* one work item: query heads h*G .. h*G + G - 1 of row b, query positions
 * t0 .. t0 + nt - 1, over logical positions [lo, hi) of the row */
static int KV_FN(attend_item)(const kv_job *job, ptrdiff_t item)
{
    const kv_layer *c = job->c;
    const kv_query *q = job->q;
    const ptrdiff_t D = c->D, G = job->G, chunk = item % job->n_chunks, blk = job->blk;
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
    const ptrdiff_t tile = kv_round64(blk * D * sizeof(KV_REAL)) / sizeof(KV_REAL);
    const ptrdiff_t rows = kv_round64(Q * D * sizeof(KV_REAL)) / sizeof(KV_REAL);
    const ptrdiff_t per_query = kv_round64(Q * sizeof(KV_REAL)) / sizeof(KV_REAL);
    const ptrdiff_t scores = kv_round64(Q * blk * sizeof(KV_REAL)) / sizeof(KV_REAL);
    KV_REAL *mem = (KV_REAL *)kv_scratch(sizeof(KV_REAL) *
                                         (2 * tile + 2 * rows + 4 * per_query + 2 * scores));
    if (!mem) return -1;
    KV_REAL *ktile = mem, *vtile = ktile + tile, *qv = vtile + tile, *acc = qv + rows;
    KV_REAL *m = acc + rows, *l = m + per_query;
    /* the largest scores and the scores of the block weighed (bc, wc) and of the
     * block scored (bn, wn); the same block when keys do not run ahead */
    KV_REAL *bc = l + per_query, *bn = bc + per_query, *wc = bn + per_query, *wn = wc + scores;

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

    /* convert (and rotate) a block once when several queries share it; a
     * lone query reads the stored rows in registers, and rotates its keys
     * there too */
    const int shared = Q > KV_CONVERT_FROM;
    const int convert_values = shared && c->dtype != KV_NATIVE;
    const int convert_keys = shared && (c->dtype != KV_NATIVE || c->rope_cos != NULL);
    float kscale[KV_BLK], vscale[KV_BLK];
    KV_REAL dropped[KV_BLK];

    /* the positions [lo, hi), a block of blk rows at a time, cached ones,
     * then causal in the block. A block's keys are scored (into wn, the
     * largest scores into bn), then its values weighed; in turns of
     * job->step rows (see kv_job) the keys are scored a block ahead, while
     * the values of the block before are weighed */
    const ptrdiff_t first = q->base[b] + t0;        /* query i's position: first + i / G */
    const ptrdiff_t ahead = job->step < blk;        /* blocks the keys are scored ahead */
    for (ptrdiff_t j0 = lo - ahead * blk; j0 < hi; j0 += blk) {
        /* values weighed: the n rows at j0; keys scored: the ns rows at js */
        const ptrdiff_t n = j0 < lo ? 0 : kv_min(blk, hi - j0), js = j0 + ahead * blk;
        const ptrdiff_t ns = js < hi ? kv_min(blk, hi - js) : 0;
        if (ahead && n) KV_FN(weights)(job, first, Q, j0, n, wc, bc, m, l, acc);
        KV_FN(run) keys = {0}, values = {0};
        if (n) values = KV_FN(block)(c, 1, b, h, j0, n, convert_values, vtile, vscale);
        if (ns) keys = KV_FN(block)(c, 0, b, h, js, ns, convert_keys, ktile, kscale);
        for (ptrdiff_t i = 0; i < Q; i++) bn[i] = -KV_BIG;
        /* while these keys are scored, ask for the keys of the next block
         * and for the values weighed after them: those of this block when
         * the keys run ahead, else of the next; values only as far as keys
         * follow them (the last block's are not asked for) */
        kv_ahead next = {0};
        if (job->ask && ns && js + blk < hi) {
            const int grouped = keys.cos == NULL;
            ptrdiff_t passes = 0;
            for (ptrdiff_t i = 0; i < Q; i += kv_pass_size(i, Q, G, first, js, ns, grouped))
                passes++;
            const ptrdiff_t kpos = js + blk, vpos = ahead ? js : js + blk;
            next = kv_ahead_of(c, b, h, kpos, vpos, kv_min(blk, hi - kpos), passes);
        }
        for (ptrdiff_t r0 = 0; r0 < kv_max(ns, ahead ? n : 0); r0 += job->step) {
            const ptrdiff_t r1 = r0 + job->step;
            if (r0 < ns)
                KV_FN(score_rows)(job, qv, Q, first, scale, &keys, js, ns, r0, kv_min(r1, ns), wn,
                                  bn, dropped, job->ask ? &next : NULL);
            if (ahead && r0 < n)
                KV_FN(weigh_rows)(job, Q, first, &values, j0, n, r0, kv_min(r1, n), wc, acc);
        }
        KV_REAL *swap = wc;
        wc = wn, wn = swap;
        swap = bc;
        bc = bn, bn = swap;
        if (!ahead && n) {
            KV_FN(weights)(job, first, Q, j0, n, wc, bc, m, l, acc);
            KV_FN(weigh_rows)(job, Q, first, &values, j0, n, 0, n, wc, acc);
        }
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

#undef KV_W
#undef KV_MULADD
#undef KV_INLINE
#undef KV_NATIVE
