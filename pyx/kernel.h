/* kernel.h: kvarena's attention kernel, for decoding (T = 1) and prefill (T > 1).
 *
 * One kernel, four orthogonal parts:
 *   row reader    stored vectors -> compute type, in registers inside the
 *                 dot product and the weighted sum (kernel_impl.h's load):
 *                 float16, float32, float64, or int8 with one scale per row;
 *                 a block that many queries share is converted once instead
 *   position map  a row's logical position -> its slot in the arena: linear,
 *                 or n_sink sinks followed by a ring (a sliding window)
 *   rotation      optional rotary positions, applied to keys as they are read
 *                 (in the dot product, or once in a shared tile) and to each
 *                 query, by logical position
 *   group loop    the G query heads of one K/V head (and a tile of query
 *                 positions) share every K/V block that is read
 * Keys and values are read once per query tile, in one pass, with an online
 * softmax: a block's keys, then its values, or, in memory-bound calls, the
 * keys a block ahead in turns of a few rows (kv_job's step); a long row is
 * split into chunks whose partial (max, sum, accumulator) are merged
 * afterwards (flash-decoding), so one row can use every thread. How the
 * rows are read (plainly, asking ahead, or streaming: see kv_ask_from and
 * kv_stream_from) depends on how many bytes a call reads (streaming also on
 * its storage type and its queries per K/V row).
 *
 * The body (kernel_impl.h) is compiled for AVX-512, AVX2+FMA and the x86-64
 * baseline; kv_best_isa() picks the widest the CPU has at run time, so an
 * extension built on one machine runs on an older one.
 *
 * Everything here trusts its caller: kvarena._arena checks every index and
 * shape it passes in, kvarena.cache what the values mean.
 */
#ifndef KVARENA_KERNEL_H
#define KVARENA_KERNEL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { KV_F16 = 0, KV_F32 = 1, KV_F64 = 2, KV_I8 = 3 };            /* storage types */
enum { KV_ISA_BASELINE = 0, KV_ISA_AVX2 = 1, KV_ISA_AVX512 = 2 };  /* instruction sets */

/* rows per block. The kernel reads a block of keys, then the same rows of
 * values, so K and V alternate every block. At 32 rows (8 KiB of each at
 * D = 64, float32) a call out of cache slowed by up to 3x whenever the
 * host slowed memory by 30% (the read floor and the plain C loop: 30%);
 * 1 thread, 8 x 12 x 1024, floor/kvarena over ~2,000 calls, p50 / p25 /
 * p10: 0.65-0.78, 0.39-0.42, 0.35-0.36 at 32 rows; 0.78-0.79, 0.75,
 * 0.71-0.72 at 256 (the C loop: 0.67, 0.64, 0.62); 64 and 128 between.
 * In L2, 256 rows took 0.82-0.89x the time of 32. So a block holds
 * KV_BLK_BYTES of keys, within [KV_BLK_ASKED, KV_BLK] rows (a huge head_dim
 * keeps 32-row tiles, as before). A call that asks for each next block
 * itself (kv_ask_from, Intel cores) keeps blocks of 32 rows, the distance
 * measured there */
#define KV_BLK_BYTES (64 << 10)
#define KV_BLK 256
#define KV_BLK_ASKED 32
_Static_assert(KV_BLK_ASKED <= KV_BLK, "the stack arrays are sized for KV_BLK rows");

#ifndef KV_CONVERT_FROM
/* queries sharing a block from which float16 and int8 rows are converted
 * once into a tile rather than read in place. Measured (1 thread, 8 K/V
 * heads, B x S = 1 x 2048 and 8 x 16384): 2 query heads per K/V head read
 * in place took 0.75-0.85x the time of converting, float16 and int8; at 4,
 * converting took 0.7-0.9x for float16 and the same for int8 */
#define KV_CONVERT_FROM 2
#endif

/* one layer of the arena as the kernel reads it (and writes a call's new
 * rows into, see kv_new) */
typedef struct {
    int dtype;                   /* KV_F16 .. KV_I8 */
    void *data[2];               /* keys, values: (B, H, S, D), C-contiguous */
    float *scale[2];             /* int8 only: (B, H, S), else NULL */
    ptrdiff_t B, H, S, D;
    /* position map: ring_head NULL is linear (slot = position); else row b
       keeps n_sink sinks in slots [0, n_sink) and its window in a ring of
       S - n_sink slots whose oldest position sits at slot n_sink + ring_head[b] */
    ptrdiff_t n_sink;
    const ptrdiff_t *ring_head;
    /* rotation: cos and sin of position * frequency, (S, D / 2); NULL: none */
    const float *rope_cos, *rope_sin;
    int rope_interleaved;        /* pairs (2i, 2i+1); else (i, i + D/2) */
} kv_layer;

/* the queries of one call and where their outputs go */
typedef struct {
    const void *q;               /* (B, Hq, T, D), element strides qs */
    void *out;                   /* (B, Hq, T, D), element strides os */
    ptrdiff_t qs[4], os[4];
    int q_f64, out_f64;          /* float64, else float32 */
    ptrdiff_t Hq, T;             /* Hq = G * H */
    const ptrdiff_t *base;       /* (B,): query t of row b sits at position base[b] + t
                                    and sees positions [0, base[b] + t] */
    const struct kv_new *new_rows;   /* keys and values to store first, or NULL */
} kv_query;

/* the keys (kv 0) and values (1) of a call's new positions, (B, H, T, D),
 * which kv_attend stores at positions base[b] .. base[b] + T - 1 of row b
 * before any of them is read: in the item of (row, head) when that is its
 * only item, so that both threads write and each new row is written right
 * before it is read; else all of them before the items start. As they are
 * when of the storage type (elements stride[3] apart); else float32 rows
 * of D consecutive floats, stored as halves or as int8 with a scale each */
typedef struct kv_new {
    const void *rows[2];         /* NULL: stored by the caller */
    ptrdiff_t stride[2][4];      /* in elements, along b, h, t, d */
    int as_stored[2];            /* of the storage type, else float32 */
} kv_new;

/* how one call is cut into work items: (row * H + head, query tile, chunk) */
typedef struct {
    const kv_layer *c;
    const kv_query *q;
    ptrdiff_t G, Tq, n_qtiles, n_chunks, chunk_len;
    void *partial;               /* n_chunks > 1: (B, Hq, T, n_chunks, 2 + D) */
    int ask;                     /* ask for each next block ahead (kv_ask_from) */
    ptrdiff_t blk;               /* rows per block: KV_BLK_ASKED if ask, else KV_BLK_BYTES of
                                    keys within [KV_BLK_ASKED, KV_BLK] rows */
    ptrdiff_t step;              /* the keys of a block are scored while the values of the
                                    block before are weighed, `step` rows of each in turn:
                                    KV_STEP in a call that asks or streams with few
                                    queries per row, else blk */
} kv_job;

static inline ptrdiff_t kv_min(ptrdiff_t a, ptrdiff_t b) { return a < b ? a : b; }
static inline ptrdiff_t kv_max(ptrdiff_t a, ptrdiff_t b) { return a > b ? a : b; }
static inline ptrdiff_t kv_round64(ptrdiff_t bytes) { return (bytes + 63) / 64 * 64; }

/* position map: the slot of logical position pos in row b */
static inline ptrdiff_t kv_slot(const kv_layer *c, ptrdiff_t b, ptrdiff_t pos)
{
    if (!c->ring_head || pos < c->n_sink) return pos;
    const ptrdiff_t window = c->S - c->n_sink, r = c->ring_head[b] + (pos - c->n_sink);
    return c->n_sink + (r >= window ? r - window : r);
}

/* causal: how many of the n positions from j0 on a query at position p
 * sees (those up to its own); each query sums exactly these, so its result
 * does not depend on the other queries of its tile or on padding */
static inline ptrdiff_t kv_seen(ptrdiff_t p, ptrdiff_t j0, ptrdiff_t n)
{
    return p < j0 ? 0 : kv_min(n, p + 1 - j0);
}

/* how many of the Q queries of a tile, from query i on, share a score pass
 * over the n rows from j0: those of the next four that see as many of them
 * as query i does, if three or four do (a fourth then dropped) and
 * `grouped`; else one. Query i sits at position first + i / G: the G heads
 * of a position always see the same rows, and in a block that a tile sees
 * whole (prefill, off the diagonal) so do queries of several positions */
static inline ptrdiff_t kv_pass_size(ptrdiff_t i, ptrdiff_t Q, ptrdiff_t G, ptrdiff_t first,
                                     ptrdiff_t j0, ptrdiff_t n, int grouped)
{
    const ptrdiff_t seen = kv_seen(first + i / G, j0, n);
    ptrdiff_t k = 1;
    while (grouped && k < 4 && i + k < Q && kv_seen(first + (i + k) / G, j0, n) == seen) k++;
    return k >= 3 ? k : 1;
}

/* how many of the n positions from pos on lie in consecutive slots */
static inline ptrdiff_t kv_run(const kv_layer *c, ptrdiff_t b, ptrdiff_t pos, ptrdiff_t n)
{
    if (!c->ring_head) return n;
    if (pos < c->n_sink) return kv_min(n, c->n_sink - pos);
    return kv_min(n, c->S - kv_slot(c, b, pos));
}

/* bytes per stored element, by storage type (KV_F16 .. KV_I8) */
static const ptrdiff_t kv_elem_bytes[4] = {2, 4, 8, 1};

/* the stored key (kv 0) or value (1) row at index at = (b * H + h) * S + slot,
 * and its int8 scale (NULL for float storage) */
static inline char *kv_stored_row(const kv_layer *c, int kv, ptrdiff_t at)
{
    return (char *)c->data[kv] + at * c->D * kv_elem_bytes[c->dtype];
}
static inline const float *kv_stored_scale(const kv_layer *c, int kv, ptrdiff_t at)
{
    return c->scale[kv] ? c->scale[kv] + at : NULL;
}

/* stored rows asked for a block ahead of their use: while the keys of one
 * block are scored, the keys of the block after it and its values (which
 * are weighed after those keys are scored). The CPU's own streamer stops
 * at every 4 KiB page and runs only a little ahead of the loads, so
 * without this, memory idles while a block is in the registers. The
 * requests are spread over the rows of the dot products (a kv_ask too
 * large for the compiler to inline there made a call 1.3-1.7x slower),
 * and the G query heads of a K/V head ask for a share each: a burst of them
 * crowds out the loads that are waiting (float32 grouped-query 1.21x
 * slower, int8 0.79x as fast as spread). Measured side by side in one
 * process (Xeon, decode, 2 threads), against not asking: out of cache
 * (B x H x S = 8 x 12 x 16384) float32 0.79x the time, float16 0.90x,
 * int8 0.63x, 32 query heads over 8 0.91x, and 0.95x again with shares;
 * in the last-level cache (1 x 12 x 1024-16384) 0.80-0.98x on 2 threads,
 * 0.72-1.04x on 1; in L2 0.95-0.99x. Asking two blocks ahead: 1.01-1.09x.
 * On AMD's Zen 4 (EPYC VM, D = 64, 14 interleaved runs) asking costs
 * instead: not asking took 0.76x the time (1 thread) and 0.80x (2) at
 * 1 x 12 x 16384, 0.84x at 8 x 12 x 16384, 0.77-0.78x in L3 (1 x 12 x
 * 1024). Asking for keys only took 0.84-0.97x the time of asking for
 * both, one line per row 1.2-1.3x, asking 2, 4 or 8 blocks ahead
 * 1.1-1.4x the time of not asking. So a call asks one block ahead on
 * Intel cores only (kv_ask_from) */
typedef struct {
    const char *k, *v;           /* the first stored K and V rows asked for */
    const float *ks, *vs;        /* int8: their scales, else NULL */
    ptrdiff_t n, row_bytes;      /* rows in consecutive slots from both k and v */
    ptrdiff_t first, every;      /* the rows one score pass asks for: first,
                                    first + every, ... (its share of them) */
} kv_ahead;

/* calls that read at least this many bytes of K and V ask for each next
 * block; -1: none. At import KV_ASK_FROM_BYTES where kv_prefetch_helps(),
 * else -1; kvarena.kernel.forced_reads sets 0 (every call) or -1 for
 * tests. Below it the rows come from the L2s: on the Xeon, 1 x 12 x S
 * decode without asking (blocks of 256 rows) took, 1 thread and 2,
 * 0.80 and 0.80x the time at 1.5 MiB, 0.97 and 0.83x at 3, 0.99 and
 * 0.93x at 4.5, 1.01 and 0.98x at 6; asking, 0.87x at 768 MiB */
#define KV_ASK_FROM_BYTES (8 << 20)
static ptrdiff_t kv_ask_from = -1;

/* calls that read at least this many bytes of K and V, with at most two
 * queries per K/V row (decode of up to two query heads per K/V head) and
 * float32 or float64 storage, stream; -1: none. At import
 * KV_STREAM_FROM_BYTES where kv_prefetch_helps(), else -1 (not measured
 * elsewhere); kvarena.kernel.forced_reads sets 0 or -1 for tests. A call that streams
 * leaves the rows to the core's own prefetchers, which follow a stream
 * from memory better than asking does when the loads are 256 bits wide
 * and keys and values advance together: it runs the AVX2 body on an
 * AVX-512 CPU, does not ask, and scores KV_STEP keys of the next block
 * between as many values of this one. On the Xeon, decode 8 x 12 x 16384
 * float32 (768 MiB), 1 and 2 threads, in one process: streaming 45.8 and
 * 23.5 ms, asking 50.1 and 24.5, plainly 62 and 32. What it rests on: a
 * C loop that only sums the rows took 42-45 ms with 256-bit loads and
 * 47-49 with 512-bit ones; not asking, the AVX-512 body took 58-61 ms, the
 * AVX2 body 59-61 while it read a row of 64 floats in two passes, 48 in
 * one; in turns of 4 rows 45-47. Rows the L3 holds come faster asked for:
 * 1 x 12 x 16384 (96 MiB) 3.5-3.7 ms asking, 5.5-6.5 streaming, while at
 * 192 MiB streaming took 0.88-1.0x the time: this VM's L3 (480 MiB as
 * reported) stops holding a call's rows in between. Four queries sharing
 * a row compute enough to want the wider vectors: grouped 8 x 32/8 x
 * 16384 (512 MiB) took 1.5-1.8x the time streaming. So do rows converted
 * as they are read, so only float32 and float64 calls stream: 8 x 12 x
 * 16384, 2 threads, one process, asking against streaming: float16 (384
 * MiB) 14.8-15.3 against 16.2-16.4 ms, int8 11.8-12.4 against 16.1-16.5
 * (the AVX2 body asking 13.3), float32 27.8 and 27.6, float64 (1.5 GiB)
 * 78 against 56 (the read floor 55) */
#define KV_STREAM_FROM_BYTES (128 << 20)
/* rows of keys scored, then of values weighed, in turn in a call that asks
 * or streams with at most two queries per K/V row (kv_job's step).
 * Streaming 8 x 12 x 16384 (1 and 2 threads; experimental builds,
 * alternated processes): 4 rows 46 and 22.9 ms, 2 rows 46-57 and 24-30
 * (the calls cost), 8 rows 48 and 24.2, 16 49 and 24.4, a block of each
 * (256) 48 and 25. Asking, against a block (32 rows) of each in turn: 48-49
 * and 25-25.5 ms against 51-52.5 and 26-27; 1 x 12 x 16384 (96 MiB, L3)
 * 3.5 and 1.8 against 3.6-3.8 and 1.8-1.9. Other calls read a block's
 * keys, then its values: in the L2s turns of 4 rows cost 1.1x the time
 * (1 x 12 x 256), and where more queries share a row, more passes cost
 * each turn: prefill of 2048 positions 1.5x, 8 x 32/8 x 2048 (four per
 * row) 1.15x, 16 per row 1.25x */
#define KV_STEP 4
static ptrdiff_t kv_stream_from = -1;

static int kv_prefetch_helps(void)
{
#if defined(__GNUC__) && defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_is("intel");
#else
    return 0;
#endif
}

/* the keys at logical positions kpos .. kpos + n - 1 of (row b, head h)
 * and the values at vpos .. vpos + n - 1, as far as both lie in
 * consecutive slots, shared among `every` passes */
static inline kv_ahead kv_ahead_of(const kv_layer *c, ptrdiff_t b, ptrdiff_t h, ptrdiff_t kpos,
                                   ptrdiff_t vpos, ptrdiff_t n, ptrdiff_t every)
{
    const ptrdiff_t bh = (b * c->H + h) * c->S;
    const ptrdiff_t kat = bh + kv_slot(c, b, kpos), vat = bh + kv_slot(c, b, vpos);
    return (kv_ahead){kv_stored_row(c, 0, kat), kv_stored_row(c, 1, vat),
                      kv_stored_scale(c, 0, kat), kv_stored_scale(c, 1, vat),
                      n ? kv_min(kv_run(c, b, kpos, n), kv_run(c, b, vpos, n)) : 0,
                      c->D * kv_elem_bytes[c->dtype], 0, every};
}

/* the rows of a from row r on */
static inline kv_ahead kv_ahead_from(const kv_ahead *a, ptrdiff_t r)
{
    kv_ahead rest = *a;
    rest.k += r * a->row_bytes;
    rest.v += r * a->row_bytes;
    rest.n -= r;
    if (rest.ks) {
        rest.ks += r;
        rest.vs += r;
    }
    return rest;
}

/* ask for row r of the next block: its K and V lines, the K lines twice,
 * and every 16th row the line of scales from it. Asking twice for the keys
 * (read first, while the values' requests are still out) took 0.94-0.95x
 * the time out of cache on a Xeon (grouped 8 x 32/8 x 16384, 1 and 2
 * threads; G1 8 x 12 x 16384: 0.94-0.98; in-process A/B, 5 interleaved
 * rounds; alternated processes: 0.92-0.96): some requests made once are
 * evidently dropped. A second request with the L2-only hint gave the same
 * (0.93-0.96), asking twice for the values too nothing more, the L2-only
 * hint alone nothing (0.97-1.00), 64- or 128-row blocks asked for twice
 * 0-4% more out of cache but 1.06-1.10x the time in L3, and asking for
 * the values during the values' pass instead 1.04-1.09x */
static inline void kv_ask(const kv_ahead *a, ptrdiff_t r)
{
    if (!a || r >= a->n) return;
    for (ptrdiff_t off = 0; off < a->row_bytes; off += 64) {
        __builtin_prefetch(a->k + r * a->row_bytes + off);
        __builtin_prefetch(a->v + r * a->row_bytes + off);
        __builtin_prefetch(a->k + r * a->row_bytes + off);
    }
    if (a->ks && r % 16 == 0) {
        __builtin_prefetch(a->ks + r);
        __builtin_prefetch(a->vs + r);
    }
}

static inline ptrdiff_t kv_partial_index(const kv_job *job, ptrdiff_t b, ptrdiff_t head,
                                         ptrdiff_t t, ptrdiff_t chunk)
{
    return (((b * job->q->Hq + head) * job->q->T + t) * job->n_chunks + chunk) * (2 + job->c->D);
}

/* IEEE half -> float without branches (so it vectorises on every ISA): the
 * 15 low bits shifted into a float are the value times 2^-112, subnormals
 * included; infinities and NaNs are patched afterwards */
static inline float kv_half_to_float(uint16_t h)
{
    const uint32_t magnitude = h & 0x7fffu;
    union { uint32_t u; float f; } v = { .u = magnitude << 13 };
    v.f *= 0x1p112f;
    const uint32_t special = 0x7f800000u | (magnitude & 0x3ffu) << 13;
    v.u = (magnitude >= 0x7c00u ? special : v.u) | (uint32_t)(h & 0x8000u) << 16;
    return v.f;
}

/* float -> IEEE half, rounded to nearest, ties to even (as NumPy casts and
 * F16C converts): the row store's path without F16C, and its last D mod W
 * lanes. Beyond the half range (from 65520, which rounds up) infinity; a
 * NaN stays a NaN (made quiet, the top bits of its payload kept) */
static inline uint16_t kv_float_to_half(float f)
{
    union { float f; uint32_t u; } v = { .f = f };
    const uint16_t sign = (uint16_t)(v.u >> 16 & 0x8000u);
    const uint32_t a = v.u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u | (uint16_t)(a >> 13 & 0x3ffu);
    if (a >= 0x477ff000u) return sign | 0x7c00u;
    if (a < 0x38800000u) {          /* below 2^-14: a subnormal half, or 0, in units of
                                       2^-24 (1024 is the least normal), rounded in the
                                       CPU's mode: to nearest unless a program changed it */
        v.u = a;
        return sign | (uint16_t)lrintf(v.f * 0x1p24f);
    }
    /* rebias the exponent (127 -> 15), then round 23 bits of fraction to 10:
       add just under half a unit, and the last kept bit for ties (a carry
       into the exponent is right) */
    return sign | (uint16_t)((a - 0x38000000u + 0xfffu + (a >> 13 & 1u)) >> 13);
}

#include "pool.h"

/* -- the body, once per instruction set and compute type -------------------- */

#define KV_CAT_(a, b) a##b
#define KV_CAT(a, b) KV_CAT_(a, b)
#define KV_FN(name) KV_CAT(name, KV_SUFFIX)

/* kernel_variants.h includes kernel_impl.h once per instruction set, for
 * the compute type defined here; KV_T names the type in the suffixes */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
/* GCC on x86-64: per-function target pragmas (Clang ignores `#pragma GCC
 * target`, so it builds the portable variant only) */
#define KV_HAVE_X86 1
#include <immintrin.h>
#else
#define KV_HAVE_X86 0
#endif

/* float compute (float16, float32 and int8 storage) */
#define KV_T _f
#define KV_REAL float
#define KV_DOUBLE 0
#define KV_BIG 3.0e38f
#include "kernel_variants.h"
#undef KV_T
#undef KV_REAL
#undef KV_DOUBLE
#undef KV_BIG

/* double compute (float64 storage) */
#define KV_T _d
#define KV_REAL double
#define KV_DOUBLE 1
#define KV_BIG 1.0e300
#include "kernel_variants.h"
#undef KV_T
#undef KV_REAL
#undef KV_DOUBLE
#undef KV_BIG

typedef int (*kv_item_fn)(const kv_job *, ptrdiff_t);
typedef void (*kv_merge_fn)(const kv_job *, ptrdiff_t, ptrdiff_t, ptrdiff_t, void *);

typedef float (*kv_quantize_fn)(const float *, int8_t *, ptrdiff_t);
typedef void (*kv_half_fn)(const float *, uint16_t *, ptrdiff_t);

/* [isa][0 = float compute, 1 = double]; storing rows is float only */
#define KV_VARIANT(isa) {{attend_item_f_##isa, merge_f_##isa, quantize_row_f_##isa, \
                          half_row_f_##isa}, {attend_item_d_##isa, merge_d_##isa, NULL, NULL}}
static const struct {
    kv_item_fn item;
    kv_merge_fn merge;
    kv_quantize_fn quantize;
    kv_half_fn half;
} kv_variants[3][2] = {
    KV_VARIANT(baseline),
#if KV_HAVE_X86
    KV_VARIANT(avx2),
    KV_VARIANT(avx512),
#else
    KV_VARIANT(baseline),
    KV_VARIANT(baseline),
#endif
};
#undef KV_VARIANT

/* the widest instruction set this CPU runs */
static int kv_best_isa(void)
{
#if KV_HAVE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
        return KV_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        return KV_ISA_AVX2;
#endif
    return KV_ISA_BASELINE;
}

/* one row of D elements into the stored row `at` ((b * H + h) * S + slot)
 * of keys (kv 0) or values (1): copied when `src` has the storage type
 * (`as_stored`, elements `step` apart), else float32 (consecutive) as
 * halves or as int8 with its scale, on instruction set `isa` */
static void kv_put_row(const kv_layer *c, int kv, ptrdiff_t at, const void *src,
                       ptrdiff_t step, int as_stored, int isa)
{
    const ptrdiff_t D = c->D, size = kv_elem_bytes[c->dtype];
    char *dst = kv_stored_row(c, kv, at);
    if (as_stored && step == 1)
        memcpy(dst, src, D * size);
    else if (as_stored)
        for (ptrdiff_t d = 0; d < D; d++)
            memcpy(dst + d * size, (const char *)src + d * step * size, size);
    else if (c->dtype == KV_I8)
        c->scale[kv][at] = kv_variants[isa][0].quantize((const float *)src, (int8_t *)dst, D);
    else
        kv_variants[isa][0].half((const float *)src, (uint16_t *)dst, D);
}

/* the new keys and values of (row b, head h) at the slots of positions
 * base[b] .. base[b] + T - 1 (kv_new) */
static void kv_store_new(const kv_layer *c, const kv_query *q, ptrdiff_t b, ptrdiff_t h,
                         int isa)
{
    const kv_new *w = q->new_rows;
    for (int kv = 0; kv < 2; kv++) {
        if (!w->rows[kv]) continue;
        const ptrdiff_t *s = w->stride[kv];
        const ptrdiff_t size = w->as_stored[kv] ? kv_elem_bytes[c->dtype] : 4;  /* float32 */
        for (ptrdiff_t t = 0; t < q->T; t++) {
            const char *src = (const char *)w->rows[kv] + (b * s[0] + h * s[1] + t * s[2]) * size;
            const ptrdiff_t at = (b * c->H + h) * c->S + kv_slot(c, b, q->base[b] + t);
            kv_put_row(c, kv, at, src, s[3], w->as_stored[kv], isa);
        }
    }
}

typedef struct {
    const kv_job *job;
    kv_item_fn fn;
    int store_in_items;          /* an item is one (row, head): it stores its new rows */
    int isa;
} kv_task_ctx;

static int kv_run_item(void *ctx, ptrdiff_t item)
{
    const kv_task_ctx *t = (const kv_task_ctx *)ctx;
    const ptrdiff_t H = t->job->c->H;
    if (t->store_in_items) kv_store_new(t->job->c, t->job->q, item / H, item % H, t->isa);
    return t->fn(t->job, item);
}

/* int8 and float16 storage: the float32 rows x[b, h, t] (D consecutive
 * floats each, rows xs[0], xs[1], xs[2] floats apart along b, h, t) into
 * slot slots[b * T + t] of (b, h) of keys (kv 0) or values (1), on
 * instruction set `isa`: as halves (KV_F16), or as int8 with one scale
 * (absmax / 127) each (KV_I8) */
static void kv_store(const kv_layer *c, int kv, const float *x, const ptrdiff_t xs[3],
                     const ptrdiff_t *slots, ptrdiff_t T, int isa)
{
    for (ptrdiff_t b = 0; b < c->B; b++)
        for (ptrdiff_t h = 0; h < c->H; h++)
            for (ptrdiff_t t = 0; t < T; t++)
                kv_put_row(c, kv, (b * c->H + h) * c->S + slots[b * T + t],
                           x + b * xs[0] + h * xs[1] + t * xs[2], 1, 0, isa);
}

/* attention of q over one layer, into q->out, after storing the call's
 * new rows (q->new_rows, kv_new), on run_threads threads (`large`: worth
 * waking sleeping ones, see kv_parallel); the work is cut for
 * plan_threads, so that the result does not depend on how many threads
 * ran it. 0, or -1 when scratch memory could not be had (out is then
 * incomplete; the new rows are stored either way) */
static int kv_attend(const kv_layer *c, const kv_query *q, int isa, int plan_threads,
                     int run_threads, int large)
{
    /* no more threads than the pool has; 4 * threads must not overflow */
    const ptrdiff_t threads = plan_threads < KV_MAX_WORKERS + 1 ? plan_threads : KV_MAX_WORKERS + 1;
    const int dbl = c->dtype == KV_F64;
    ptrdiff_t longest = 0, positions = 0;         /* the longest row, all rows' */
    for (ptrdiff_t b = 0; b < c->B; b++) {
        if (q->base[b] + q->T > longest) longest = q->base[b] + q->T;
        positions += q->base[b] + q->T;
    }
    /* decided once per call, so that every item cuts the same blocks */
    const ptrdiff_t G = q->Hq / c->H, Tq = kv_min(q->T, G >= 64 ? 1 : 64 / G);
    const ptrdiff_t row_bytes = c->D * kv_elem_bytes[c->dtype];
    const ptrdiff_t reads = 2 * c->H * positions * row_bytes;     /* K and V, once each */
    const ptrdiff_t ask_from = kv_ask_from, stream_from = kv_stream_from;
    const int few = G * Tq <= 2;          /* queries per K/V row: a memory-bound call */
    const int as_stored = c->dtype == KV_F32 || c->dtype == KV_F64;   /* rows not converted */
    const int stream = stream_from >= 0 && reads >= stream_from && few && as_stored;
    const int ask = !stream && ask_from >= 0 && reads >= ask_from;
    const ptrdiff_t fit = KV_BLK_BYTES / row_bytes;
    const ptrdiff_t blk = ask ? KV_BLK_ASKED : kv_max(KV_BLK_ASKED, kv_min(KV_BLK, fit));
    kv_job job = {c, q, G, Tq, 1, 1, 1, NULL, ask, blk, (ask || stream) && few ? KV_STEP : blk};
    const int read_isa = stream && isa > KV_ISA_AVX2 ? KV_ISA_AVX2 : isa;
    job.n_qtiles = (q->T + job.Tq - 1) / job.Tq;
    /* chunks: enough work items to keep every thread busy, none shorter than
     * 256; in a call too small to wake workers (sparse calls run on the
     * caller alone) only when there are fewer units than threads. Chunks
     * cost partials and a merge: a small model's calls (1 x 4 heads, 256-500
     * positions, 100 us apart) took 1.05-1.08x the time on a 2-thread cache */
    const ptrdiff_t units = c->B * c->H * job.n_qtiles;
    if (threads > 1 && units < 4 * threads && (large || units < threads))
        job.n_chunks = kv_min((4 * threads + units - 1) / units, (longest + 255) / 256);
    if (job.n_chunks < 1) job.n_chunks = 1;
    job.chunk_len = (longest + job.n_chunks - 1) / job.n_chunks;
    job.chunk_len = (job.chunk_len + job.blk - 1) / job.blk * job.blk;
    job.n_chunks = (longest + job.chunk_len - 1) / job.chunk_len;

    /* the new rows: by each (row, head)'s item when it has one, else now */
    const int store_in_items = q->new_rows && units * job.n_chunks == c->B * c->H;
    if (q->new_rows && !store_in_items)
        for (ptrdiff_t bh = 0; bh < c->B * c->H; bh++)
            kv_store_new(c, q, bh / c->H, bh % c->H, isa);

    const size_t real = dbl ? sizeof(double) : sizeof(float);
    if (job.n_chunks > 1) {
        job.partial = malloc((size_t)(c->B * q->Hq * q->T * job.n_chunks * (2 + c->D)) * real);
        if (!job.partial) return -1;
    }
    kv_task_ctx task = {&job, kv_variants[read_isa][dbl].item, store_in_items, isa};
    int status = kv_parallel(units * job.n_chunks, run_threads, large, kv_run_item, &task);
    if (status == 0 && job.n_chunks > 1) {
        void *acc = malloc((size_t)c->D * real);
        status = acc ? 0 : -1;
        for (ptrdiff_t b = 0; acc && b < c->B; b++)
            for (ptrdiff_t head = 0; head < q->Hq; head++)
                for (ptrdiff_t t = 0; t < q->T; t++)
                    kv_variants[read_isa][dbl].merge(&job, b, head, t, acc);
        free(acc);
    }
    free(job.partial);
    return status;
}

#endif /* KVARENA_KERNEL_H */
