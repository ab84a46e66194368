"""How fast is KVCache.attend, against NumPy, a plain C loop and the read floor?

Every case builds kvarena caches holding the same random keys and values
and times, interleaved (medians of rounds taken in turn, rounds disturbed
by other processes taken again; see ``_common.time_many``):

- ``attend 1thr``, ``attend 2thr``: ``KVCache.attend`` (checks, the write of
  the new key and value, the kernel) on a cache built with ``num_threads``
  1 and 2; ``kvarena`` is the better of the two, and ``2thr/1thr`` shows
  whether the second thread pays;
- ``numpy``: the textbook path on the same arena, in its dtype: ``q @ K^T /
  sqrt(D)``, max-subtracted softmax, ``@ V``;
- ``C loop``: the same three passes as a plain C loop (``bench/plain.c``),
  compiled here with ``cc -O3 -march=native -ffast-math -fopenmp``, 2
  OpenMP threads over B*H; left out, with a note, when there is no compiler;
- ``read floor``: a C loop that only reads (sums) the same K and V bytes
  with the same 2 threads: no attention can be faster;
- ``torch``: ``scaled_dot_product_attention`` on the same memory, when torch
  is importable (never a dependency).

Four tables: (1) float32 decode (T = 1) over B x H x S, D = 64; (2) the
storage dtypes (float16, float64, int8) against the float32 kernel and
NumPy on float32 data; (3) prefill of T new tokens into an empty cache
against NumPy's full causal attention; (4) grouped-query attention, 32
query heads over 8 K/V heads, against attend over K/V repeated to 32 heads.
Ratios compare figures taken side by side in this run, each the median of
the ratios within a round (see ``paired_ratio``); absolute times move
with the machine and its load (the ``others`` column: cores other processes
used while the case ran; ``!`` marks a disturbed figure). Before each case
the script waits, up to ``--wait`` seconds, for the machine to be quiet:
on 2 cores, while another process holds one, a 2-thread loop waits a
scheduler time slice for its second thread, and a 16 us call took 12 ms.

BLAS keeps its default threads here, so the NumPy column is NumPy at its
best. Before each sample its method runs untimed for ``settle`` seconds so
that the previous method's spinning workers are not charged to it: each
column is a method running on its own. How the kernel fares next to a
model's BLAS calls is bench/generation.py's question.

    python bench/kernel.py [--quick] [--out DIR]
"""

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (Progress, default_results_dir, header, host_note, log,  # noqa: E402
                     median_ratio, others_note, print_header, results_dir, table, time_many,
                     wait_for_quiet, write_results)

import kvarena  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None

D = 64
THREADS = (1, 2)            # kernel thread counts compared; C loops use the last
CHUNK = 2048                # positions written per update() while filling
C_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
# every table's last columns: what else was going on while a case ran
LOAD_COLUMNS = [("others_txt", "others", ""), ("host_txt", "host GB/s", "")]

FULL = {
    # the sizes issue 10's targets name: call overhead, in cache, out of cache
    "decode": [(1, 12, 16), (1, 12, 256), (1, 12, 1024), (1, 12, 16384),
               (8, 12, 1024), (8, 12, 16384)],
    "dtypes": [(1, 12, 1024), (8, 12, 16384)],
    "prefill": [512, 2048],
    "gqa": (8, 32, 8, 16384),           # B, query heads, K/V heads, S
    # rounds, untimed calls before each sample (s), warm-up per method (s),
    # shortest sample (s), extra rounds allowed for disturbed ones
    "repeat": 7, "settle": 0.1, "warmup": 0.1, "min_sample": 0.02, "retries": 7,
}
QUICK = {
    "decode": [(1, 12, 16), (1, 12, 256), (1, 12, 1024), (2, 12, 1024)],
    "dtypes": [(1, 12, 1024)],
    "prefill": [64, 256],
    "gqa": (1, 32, 8, 1024),
    "repeat": 3, "settle": 0.01, "warmup": 0.02, "min_sample": 0.005, "retries": 1,
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (seconds)")
    parser.add_argument("--out", default=default_results_dir(),
                        help="directory for kernel.json, kernel.csv, kernel.txt "
                             "(default: bench/results)")
    parser.add_argument("--wait", type=float, default=None,
                        help="seconds to wait, before each case, for other processes to leave "
                             "the CPU (default 30, 0 with --quick)")
    args = parser.parse_args(argv)
    if args.wait is None:
        args.wait = 0.0 if args.quick else 30.0
    return args


# -- the C loops ---------------------------------------------------------------

def compile_plain():
    """bench/plain.c compiled and loaded, or (None, why) when it cannot be."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc) found"
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plain.c")
    build = tempfile.mkdtemp(prefix="kvarena-bench-")
    target = os.path.join(build, "plain.so")
    proc = subprocess.run([cc, *C_FLAGS, source, "-o", target, "-lm"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None, f"{cc} {' '.join(C_FLAGS)} failed: {proc.stderr.strip()[:300]}"
    lib = ctypes.CDLL(target)
    shutil.rmtree(build)                  # loaded: the file is no longer needed
    p, n, i = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.plain_attend.argtypes = [p, p, p, p, p, n, n, n, i]
    lib.plain_attend.restype = None
    lib.plain_read.argtypes = [p, p, n, n, n, i]
    lib.plain_read.restype = ctypes.c_float
    return lib, f"{cc} {' '.join(C_FLAGS[:4])}"


def c_methods(lib, q, keys, values):
    """(attend, read) calls of the C loops on (B, H, n, D) float32 K and V, and the output."""
    B, H, n, _ = keys.shape
    assert keys.flags.c_contiguous and values.flags.c_contiguous and keys.dtype == np.float32
    out = np.empty((B, H, 1, D), dtype=np.float32)
    scores = np.empty((B * H, n), dtype=np.float32)
    qc = np.ascontiguousarray(q, dtype=np.float32)
    threads = THREADS[-1]
    arrays = (qc, keys, values, out, scores)     # the closures keep these alive
    ptr = [a.ctypes.data for a in arrays]

    def attend(arrays=arrays):
        lib.plain_attend(*ptr, B * H, n, D, threads)

    def read(arrays=arrays):
        lib.plain_read(ptr[1], ptr[2], B * H, n, D, threads)
    return attend, read, out


# -- NumPy and torch -------------------------------------------------------------

def numpy_decode(q, keys, values):
    """Textbook attention of new queries over all of K and V, in the input dtype."""
    scores = (q @ keys.swapaxes(-1, -2)) / keys.dtype.type(np.sqrt(q.shape[-1]))
    scores -= scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return weights @ values


def causal_bias(T):
    """(T, T) float32: 0 on and below the diagonal, -inf above (made once, as a model does)."""
    return np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)


def numpy_causal(q, k, v, bias):
    """Full causal attention of T queries over the same T positions (prefill)."""
    scores = (q @ k.swapaxes(-1, -2)) / np.float32(np.sqrt(q.shape[-1]))   # (B, H, T, T)
    scores += bias
    scores -= scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return weights @ v


def torch_method(q, keys, values, causal=False):
    """torch's scaled_dot_product_attention on the same memory, or None."""
    if torch is None:
        return None
    with warnings.catch_warnings():      # the arena's views are read-only
        warnings.simplefilter("ignore", UserWarning)
        qt, kt, vt = (torch.from_numpy(np.asarray(x)) for x in (q, keys, values))

    def sdpa():
        with torch.inference_mode():
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    return sdpa


# -- caches holding the same data ------------------------------------------------

def filled_caches(B, H, S, dtype, seed, threads=THREADS, repeat_heads=1):
    """{threads: KVCache} of S + 1 positions, the first S committed, all with the same data.

    The data at position S is what every decode call writes again (the new
    token), so that each method reads the same S + 1 keys and values.
    ``repeat_heads`` > 1 stores each of the H heads that many times over
    (a multi-head copy of a grouped-query cache). Returns the caches, the
    new key and value (float32, (B, H * repeat_heads, 1, D)); None and the
    TypeError's text when the dtype is refused.
    """
    n = S + 1
    stored = H * repeat_heads
    try:
        caches = {t: kvarena.KVCache(B, n, 1, stored, D, dtype=dtype, num_threads=t)
                  for t in threads}
    except TypeError as exc:
        return None, str(exc)
    rng = np.random.default_rng(seed)
    for start in range(0, n, CHUNK):
        T = min(CHUNK, n - start)
        k, v = (np.repeat(rng.standard_normal((B, H, T, D), dtype=np.float32),
                          repeat_heads, axis=1) for _ in range(2))
        commit = T if start + T < n else T - 1      # position S stays uncommitted
        for cache in caches.values():
            cache.update(0, k, v)
            if commit:
                cache.advance(commit)
    return caches, (k[:, :, -1:].copy(), v[:, :, -1:].copy())


def kv_views(cache):
    """Layer 0's full-capacity (B, H, n, D) keys and values: the arena itself."""
    return cache.arena[0, 0], cache.arena[0, 1]


def measure(fns, plan):
    """time_many with the plan's settings; per method us, and the load of the run."""
    timed = time_many(fns, repeat=plan["repeat"], settle=plan["settle"], warmup=plan["warmup"],
                      min_sample=plan["min_sample"], retries=plan["retries"], probe=True)
    row = {f"{name}_us": t["median"] * 1e6 for name, t in timed.items()}
    row["samples_us"] = {name: [x * 1e6 for x in t["samples"]] for name, t in timed.items()}
    any_t = next(iter(timed.values()))
    row.update({key: any_t[key] for key in ("others", "disturbed", "rounds", "flagged",
                                            "host_gb_s", "host_gb_s_range", "host_gb_s_samples")})
    return row


def load_cells(row):
    """The text of a row's LOAD_COLUMNS."""
    return {"others_txt": others_note(row["others"]),
            "host_txt": host_note(row["host_gb_s_range"])}


def best_of_threads(row, prefix="attend"):
    times = {t: row[f"{prefix}{t}_us"] for t in THREADS}
    row[f"{prefix}_us"] = min(times.values())
    row[f"{prefix}_best_threads"] = min(times, key=times.get)
    row[f"{prefix}_2v1"] = paired_ratio(row, f"{prefix}{THREADS[-1]}", f"{prefix}{THREADS[0]}")


def paired_ratio(row, num, den):
    """``median_ratio`` of two methods' per-round times in a measured row.

    ``num`` and ``den`` name methods, or a ``best_of_threads`` prefix (then
    its chosen thread count's samples).
    """
    def samples(name):
        if name in row["samples_us"]:
            return row["samples_us"][name]
        return row["samples_us"][f"{name}{row[f'{name}_best_threads']}"]
    return median_ratio(samples(num), samples(den))


def min_sample_for(nbytes, plan):
    # calls that read more than 64 MiB last milliseconds: one call per sample
    return 0.0 if nbytes > 64 * 2**20 else plan["min_sample"]


# -- 1. float32 decode -------------------------------------------------------------

def decode_case(B, H, S, plan, lib, progress):
    caches, (k_new, v_new) = filled_caches(B, H, S, np.float32, seed=S)
    rng = np.random.default_rng(S + 1)
    q = rng.standard_normal((B, H, 1, D), dtype=np.float32)
    keys, values = kv_views(caches[THREADS[0]])
    row = {"B": B, "H": H, "S": S, "kv_bytes": keys.nbytes + values.nbytes}
    fns = {f"attend{t}": (lambda c=c: c.attend(0, q, k_new, v_new)) for t, c in caches.items()}
    fns["numpy"] = lambda: numpy_decode(q, keys, values)
    outputs = {name: fn() for name, fn in fns.items()}
    if lib is not None:
        fns["c"], fns["floor"], c_out = c_methods(lib, q, keys, values)
        fns["c"]()
        outputs["c"] = c_out
    sdpa = torch_method(q, keys, values)
    if sdpa is not None:
        fns["torch"] = sdpa
        outputs["torch"] = sdpa().numpy()
    reference = outputs["numpy"]
    row["max_abs_diff"] = float(max(np.abs(o - reference).max() for o in outputs.values()))
    row.update(measure(fns, dict(plan, min_sample=min_sample_for(row["kv_bytes"], plan))))
    best_of_threads(row)
    row["numpy_ratio"] = paired_ratio(row, "numpy", "attend")
    if lib is not None:
        row["c_ratio"] = paired_ratio(row, "c", "attend")
        row["floor_gb_s"] = row["kv_bytes"] / row["floor_us"] / 1e3
        row["of_floor_pct"] = 100 * paired_ratio(row, "floor", "attend")
    if sdpa is not None:
        row["torch_ratio"] = paired_ratio(row, "torch", "attend")
    progress.log(f"B={B} H={H} S={S}: kvarena {row['attend_us']:.1f} us "
                 f"(1thr {row['attend1_us']:.1f}, 2thr {row['attend2_us']:.1f}), "
                 f"numpy {row['numpy_us']:.1f}"
                 + (f", C {row['c_us']:.1f}, floor {row['floor_us']:.1f}" if lib else "")
                 + f"; others {others_note(row['others'])}")
    return row


def decode_table(rows, has_c, plan):
    columns = [("case", "B x H x S", ""), ("mib", "K+V MiB", ".2f"),
               ("attend1_us", "1thr us", ".1f"), ("attend2_us", "2thr us", ".1f"),
               ("attend_2v1", "2thr/1thr", ".2f"), ("numpy_us", "numpy us", ".1f")]
    if has_c:
        columns += [("c_us", "C loop us", ".1f"), ("floor_us", "floor us", ".1f"),
                    ("floor_gb_s", "floor GB/s", ".1f")]
    if torch is not None:
        columns.append(("torch_us", "torch us", ".1f"))
    columns.append(("numpy_ratio", "numpy/kv", ".2f"))
    if has_c:
        columns += [("c_ratio", "C/kv", ".2f"), ("of_floor_pct", "% floor", ".0f")]
    if torch is not None:
        columns.append(("torch_ratio", "torch/kv", ".2f"))
    columns += [*LOAD_COLUMNS, ("max_abs_diff", "max|diff|", ".0e")]
    rows = [dict(r, case=f"{r['B']} x {r['H']} x {r['S']}", mib=r["kv_bytes"] / 2**20,
                 **load_cells(r)) for r in rows]
    notes = [f"float32, one new token (T = 1), D = {D}; each call reads S + 1 positions (S cached "
             "and the new one); per-call medians of "
             f"{plan['repeat']} rounds, methods sampled in turn",
             "1thr, 2thr = KVCache.attend on a cache with num_threads=1, 2 (checks + write + "
             "kernel); kv = the better of the two",
             "numpy = q @ K^T / sqrt(D), max-subtracted softmax, @ V on the arena's views",
             "C loop = bench/plain.c's three passes, 2 OpenMP threads; floor = a C loop that "
             "only sums the same K and V bytes, 2 threads (floor GB/s = K+V bytes / its time)"
             if has_c else "no C loop or floor columns: see the note above",
             "x/kv > 1: kvarena is faster than x; % floor = floor us / kvarena us (100: kvarena "
             "reads K and V as fast as a loop that does nothing else); ratios are medians of "
             "the ratios within each round",
             "others = cores used by other processes while the case ran; ! = disturbed (the "
             "rounds were retaken; kept only when too few were clean)",
             "host GB/s = how fast one thread read 64 MiB (a NumPy sum) before each kept "
             "round, slowest-fastest; ! = the slowest more than 20% below the fastest: a "
             "virtual machine's host can slow reads in ways 'others' cannot see (from one "
             "second to the next on the machine the README quotes); tables 2-4 the same",
             "max|diff| = largest difference of any method's output from numpy's"]
    return table(rows, columns, "1. float32 decode attention", notes)


# -- 2. storage dtypes --------------------------------------------------------------

def dtype_case(B, H, S, plan, progress):
    """float16, float64 and int8 storage against the float32 kernel, same data."""
    rng = np.random.default_rng(S + 2)
    q = rng.standard_normal((B, H, 1, D), dtype=np.float32)
    base, (k_new, v_new) = filled_caches(B, H, S, np.float32, seed=S)
    keys32, values32 = kv_views(base[THREADS[0]])
    rows = []
    for name in ("float16", "float64", "int8"):
        caches, new = filled_caches(B, H, S, np.dtype(name), seed=S)
        row = {"B": B, "H": H, "S": S, "dtype": name}
        if caches is None:
            row["skipped"] = f"KVCache(dtype=np.{name}) raises TypeError: {new}"
            progress.log(f"{name} B={B} H={H} S={S}: skipped ({row['skipped']})")
            rows.append(row)
            continue
        # bytes of K and V data (an int8 cache also holds its scales)
        row["kv_bytes"] = 2 * B * H * (S + 1) * D * np.dtype(name).itemsize
        qd = q.astype(np.float64) if name == "float64" else q
        fns = {f"attend{t}": (lambda c=c: c.attend(0, qd, k_new, v_new)) for t, c in caches.items()}
        fns.update({f"f32attend{t}": (lambda c=c: c.attend(0, q, k_new, v_new))
                    for t, c in base.items()})
        fns["numpy32"] = lambda: numpy_decode(q, keys32, values32)
        if name != "int8":                   # the textbook path in the stored dtype
            keys, values = kv_views(caches[THREADS[0]])
            qn = q.astype(keys.dtype)
            fns["numpy"] = lambda: numpy_decode(qn, keys, values)
        reference = fns["numpy32"]()
        row["max_abs_diff"] = float(np.abs(fns[f"attend{THREADS[0]}"]() - reference).max())
        row.update(measure(fns, dict(plan, min_sample=min_sample_for(keys32.nbytes * 2, plan))))
        best_of_threads(row)
        best_of_threads(row, "f32attend")
        row["f32_ratio"] = paired_ratio(row, "f32attend", "attend")
        row["numpy32_ratio"] = paired_ratio(row, "numpy32", "attend")
        progress.log(f"{name} B={B} H={H} S={S}: kvarena {row['attend_us']:.1f} us, "
                     f"float32 kernel {row['f32attend_us']:.1f} us, numpy float32 "
                     f"{row['numpy32_us']:.1f} us; others {others_note(row['others'])}")
        rows.append(row)
        caches = keys = values = None
    return rows


def dtype_table(rows, plan):
    columns = [("dtype", "storage", ""), ("case", "B x H x S", ""),
               ("attend1_us", "1thr us", ".1f"), ("attend2_us", "2thr us", ".1f"),
               ("f32attend_us", "f32 kv us", ".1f"), ("numpy_us", "numpy us", ".1f"),
               ("numpy32_us", "numpy f32 us", ".1f"), ("f32_ratio", "f32 kv/kv", ".2f"),
               ("numpy32_ratio", "numpy f32/kv", ".2f"), *LOAD_COLUMNS,
               ("max_abs_diff", "max|diff|", ".0e")]
    done = [dict(r, case=f"{r['B']} x {r['H']} x {r['S']}", **load_cells(r))
            for r in rows if "skipped" not in r]
    notes = [f"decode (T = 1), D = {D}, the same data stored in each dtype; medians of "
             f"{plan['repeat']} rounds",
             "1thr, 2thr = KVCache.attend on the storage dtype's cache (float64 queries for "
             "float64, float32 otherwise); kv = the better",
             "f32 kv = the same on a float32 cache; numpy = the textbook path in the stored "
             "dtype; numpy f32 = on the float32 cache",
             "max|diff| = kvarena's output against NumPy's on the float32 data (float16 storage "
             "rounds K and V to 11 significant bits)"]
    notes += [f"{r['dtype']} {r['B']} x {r['H']} x {r['S']}: skipped, {r['skipped']}"
              for r in rows if "skipped" in r]
    return table(done, columns, "2. Storage dtypes", notes)


# -- 3. prefill ----------------------------------------------------------------------

def prefill_case(T, plan, progress, B=1, H=12):
    rng = np.random.default_rng(T)
    q, k, v = (rng.standard_normal((B, H, T, D), dtype=np.float32) for _ in range(3))
    caches = {t: kvarena.KVCache(B, T, 1, H, D, num_threads=t) for t in THREADS}
    # the same T positions are written again by every call: seq_pos stays 0
    fns = {f"attend{t}": (lambda c=c: c.attend(0, q, k, v)) for t, c in caches.items()}
    bias = causal_bias(T)
    fns["numpy"] = lambda: numpy_causal(q, k, v, bias)
    sdpa = torch_method(q, k, v, causal=True)
    if sdpa is not None:
        fns["torch"] = sdpa
    reference = fns["numpy"]()
    row = {"B": B, "H": H, "T": T,
           "max_abs_diff": float(np.abs(fns[f"attend{THREADS[0]}"]() - reference).max())}
    row.update(measure(fns, plan))
    best_of_threads(row)
    row["numpy_ratio"] = paired_ratio(row, "numpy", "attend")
    if sdpa is not None:
        row["torch_ratio"] = paired_ratio(row, "torch", "attend")
    progress.log(f"prefill T={T}: kvarena {row['attend_us']:.0f} us, numpy causal "
                 f"{row['numpy_us']:.0f} us; others {others_note(row['others'])}")
    return row


def prefill_table(rows, plan):
    columns = [("case", "B x H x T", ""), ("attend1_us", "1thr us", ".0f"),
               ("attend2_us", "2thr us", ".0f"), ("attend_2v1", "2thr/1thr", ".2f"),
               ("numpy_us", "numpy us", ".0f")]
    if torch is not None:
        columns += [("torch_us", "torch us", ".0f")]
    columns.append(("numpy_ratio", "numpy/kv", ".2f"))
    if torch is not None:
        columns.append(("torch_ratio", "torch/kv", ".2f"))
    columns += [*LOAD_COLUMNS, ("max_abs_diff", "max|diff|", ".0e")]
    rows = [dict(r, case=f"{r['B']} x {r['H']} x {r['T']}", **load_cells(r))
            for r in rows]
    notes = [f"T new tokens into an empty float32 cache, causal, D = {D}; medians of "
             f"{plan['repeat']} rounds",
             "numpy = full causal attention: (B, H, T, T) scores plus a precomputed mask (-inf "
             "above the diagonal), softmax, @ V"
             + ("; torch = scaled_dot_product_attention(is_causal=True)"
                if torch is not None else "")]
    return table(rows, columns, "3. Prefill", notes)


# -- 4. grouped-query attention ---------------------------------------------------------

def gqa_case(B, Hq, Hkv, S, plan, progress):
    row = {"B": B, "Hq": Hq, "Hkv": Hkv, "S": S}
    group = Hq // Hkv
    caches, (k_new, v_new) = filled_caches(B, Hkv, S, np.float32, seed=S)
    q = np.random.default_rng(S + 3).standard_normal((B, Hq, 1, D), dtype=np.float32)
    try:
        grouped = caches[THREADS[0]].attend(0, q, k_new, v_new)
    except ValueError as exc:
        row["skipped"] = f"KVCache.attend with {Hq} query heads over {Hkv} K/V heads: {exc}"
        progress.log(f"grouped-query: skipped ({row['skipped']})")
        return row
    repeated, (k_rep, v_rep) = filled_caches(B, Hkv, S, np.float32, seed=S, repeat_heads=group)
    fns = {f"attend{t}": (lambda c=c: c.attend(0, q, k_new, v_new)) for t, c in caches.items()}
    fns.update({f"repeated{t}": (lambda c=c: c.attend(0, q, k_rep, v_rep))
                for t, c in repeated.items()})
    row["max_abs_diff"] = float(np.abs(grouped - fns[f"repeated{THREADS[0]}"]()).max())
    keys, _ = kv_views(caches[THREADS[0]])
    row.update(measure(fns, dict(plan, min_sample=min_sample_for(keys.nbytes * 2 * group, plan))))
    best_of_threads(row)
    best_of_threads(row, "repeated")
    row["repeated_ratio"] = paired_ratio(row, "repeated", "attend")
    progress.log(f"grouped-query: {row['attend_us']:.0f} us against {row['repeated_us']:.0f} us "
                 f"over repeated K/V; others {others_note(row['others'])}")
    return row


def gqa_table(row, plan):
    title = "4. Grouped-query attention"
    case = f"B={row['B']}, {row['Hq']} query heads over {row['Hkv']} K/V heads, S={row['S']}"
    if "skipped" in row:
        return f"{title}\n\n{case}: skipped, {row['skipped']}\n"
    columns = [("attend1_us", "1thr us", ".0f"), ("attend2_us", "2thr us", ".0f"),
               ("repeated1_us", "repeated 1thr us", ".0f"),
               ("repeated2_us", "repeated 2thr us", ".0f"),
               ("repeated_ratio", "repeated/grouped", ".2f"), *LOAD_COLUMNS,
               ("max_abs_diff", "max|diff|", ".0e")]
    notes = [f"{case}, float32, D = {D}, decode; medians of {plan['repeat']} rounds",
             f"grouped = attend(layer, q[B,{row['Hq']},1,D], k[B,{row['Hkv']},1,D], ...) on a "
             f"{row['Hkv']}-head cache; repeated = attend on a {row['Hq']}-head cache holding each "
             "K/V head repeated"]
    return table([dict(row, **load_cells(row))], columns, title, notes)


def main(argv=None):
    args = parse_args(argv)
    out = results_dir(args.out)
    plan = QUICK if args.quick else FULL
    lib, compiled = compile_plain()
    info = header({"dtype": "float32 (and the dtypes of table 2)", "head_dim": D,
                   "kernel_threads": list(THREADS), "c_loop": compiled,
                   "torch_threads": torch.get_num_threads() if torch is not None else None,
                   "mode": "quick" if args.quick else "full"})
    print_header("kvarena attention kernel", info)
    if lib is None:
        log(f"note: no C loop or read floor columns: {compiled}")
    if torch is None:
        log("note: torch is not importable: no torch column")

    results = {"header": info, "repeat": plan["repeat"], "settle_s": plan["settle"]}
    weights = ([1 + B * H * S / 2**17 for B, H, S in plan["decode"]]
               + [3 * (1 + B * H * S / 2**17) for B, H, S in plan["dtypes"]]
               + [1 + (T / 512) ** 2 for T in plan["prefill"]]
               + [2 * (1 + np.prod(plan["gqa"]) / 2**19)])
    started = time.perf_counter()
    with Progress("kernel", sum(weights)) as progress:
        w = iter(weights)

        def step(label):
            progress.step(label, next(w))
            waited = wait_for_quiet(args.wait, progress.log)
            results["waited_s"] = results.get("waited_s", 0.0) + waited
        results["decode"] = []
        for B, H, S in plan["decode"]:
            step(f"decode B={B} H={H} S={S}")
            results["decode"].append(decode_case(B, H, S, plan, lib, progress))
        results["dtypes"] = []
        for B, H, S in plan["dtypes"]:
            step(f"storage dtypes B={B} H={H} S={S}")
            results["dtypes"] += dtype_case(B, H, S, plan, progress)
        results["prefill"] = []
        for T in plan["prefill"]:
            step(f"prefill T={T}")
            results["prefill"].append(prefill_case(T, plan, progress))
        step("grouped-query B={} Hq={} Hkv={} S={}".format(*plan["gqa"]))
        results["gqa"] = gqa_case(*plan["gqa"], plan, progress)
    results["elapsed_s"] = time.perf_counter() - started

    tables = "\n".join([decode_table(results["decode"], lib is not None, plan),
                        dtype_table(results["dtypes"], plan),
                        prefill_table(results["prefill"], plan),
                        gqa_table(results["gqa"], plan)])
    write_results(out, "kernel", results, tables, results["decode"],
                  note=f", {results['waited_s']:.0f} s of it waiting for other processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
