"""Sequence-length sweep: what the cache buys, and how close the kernel is to the floor.

Three questions, each answered by a table:

a. generation: cached against uncached greedy generation of N new tokens
   with kvarena.GPT (same model, same prompt, same tokens), N = 10 .. 1000;
b. kernel: decode attention (one new token) over S cached positions: the
   Cython kernel, the validated ``KVCache.attend``, the textbook NumPy path
   and (if installed) torch's scaled_dot_product_attention, all on the same
   arena, against the memory-bandwidth floor (K and V read once);
c. update: the cost of writing one token, at the start and at the end of
   the cache (it should not depend on the position).

Speedups and ratios are times measured side by side in this run; absolute
times vary with the machine and its load. Times are medians of repeats
after a warm-up call.

    python bench/sweep.py [--quick] [--out DIR] [--only generation,kernel,update]
"""

import argparse
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (default_results_dir, header, log, median, print_header,  # noqa: E402
                     results_dir, table, time_call, time_many, write_csv, write_json)

import kvarena  # noqa: E402
import kvarena.models  # noqa: E402
from kvarena import _arena  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None

SECTIONS = ("generation", "kernel", "update")
PROMPT = np.array([3, 14, 15, 92, 65, 35, 89, 79], dtype=np.int64)   # 8 tokens
GPT_CONFIGS = {
    "small": dict(vocab_size=256, embed_dim=128, num_layers=4, num_heads=4),
    "large": dict(vocab_size=256, embed_dim=384, num_layers=6, num_heads=6),
}
DTYPE = np.float32
THREADS = os.cpu_count() or 1   # for the standalone kernel, torch and the bandwidth probe
DEFAULT_THREADS = kvarena.KVCache(1, 1, 1, 1, 1).num_threads   # what generate() uses


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes only (a smoke run of a minute or less)")
    parser.add_argument("--out", default=default_results_dir(),
                        help="directory for sweep.json, the CSV files and plots "
                             "(default: bench/results)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds: skip an uncached generation run projected to take "
                             "longer (default 60, 10 with --quick)")
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        parser.error(f"--only takes {', '.join(SECTIONS)}; got {', '.join(sorted(unknown))}")
    if args.budget is None:
        args.budget = 10.0 if args.quick else 60.0
    return args


# -- a. generation ---------------------------------------------------------

def time_generation(model, n_new, use_cache, max_runs, run_budget=2.0):
    """Median seconds of ``generate(PROMPT, n_new)`` and the tokens it gave.

    Repeats while the runs so far took less than ``run_budget`` seconds in
    all (at most ``max_runs``): short runs get a median, long ones one run.
    """
    times = []
    tokens = None
    while len(times) < max_runs and sum(times) < run_budget:
        start = time.perf_counter()
        tokens = model.generate(PROMPT, n_new, use_cache=use_cache)
        times.append(time.perf_counter() - start)
    return median(times), times, tokens


def bench_generation(args):
    names = ["small"] if args.quick else ["small", "large"]
    counts = [10, 25] if args.quick else [10, 25, 50, 100, 200, 500, 1000]
    max_runs = 3 if args.quick else 5
    max_seq_len = len(PROMPT) + max(counts)
    rows = []
    for name in names:
        config = dict(GPT_CONFIGS[name], max_seq_len=max_seq_len)
        model = kvarena.models.GPT(**config, seed=0)
        head_dim = config["embed_dim"] // config["num_heads"]
        # the cache generate() builds for this model (batch 1, max_seq_len positions)
        probe = kvarena.KVCache(1, max_seq_len, config["num_layers"], config["num_heads"],
                                head_dim, dtype=DTYPE)
        cache_mb = probe.get_memory_usage()["total_mb"]
        del probe
        label = (f"{name}: E={config['embed_dim']}, L={config['num_layers']}, "
                 f"H={config['num_heads']}, D={head_dim}, max_seq_len={max_seq_len}")
        log(f"[generation] {label}: warm-up")
        model.generate(PROMPT, 5, use_cache=True)
        model.generate(PROMPT, 5, use_cache=False)
        last = None          # (n, seconds) of the last uncached run
        stopped = None       # why the uncached side stopped, once it has
        for n in counts:
            row = {"config": name, "embed_dim": config["embed_dim"],
                   "num_layers": config["num_layers"], "num_heads": config["num_heads"],
                   "n_new": n, "cache_mb": cache_mb}
            if stopped is None and last is not None:
                projected = last[1] * (n / last[0]) ** 2
                if projected > args.budget:
                    stopped = (f"projected {projected:.0f} s from {last[1]:.1f} s at N={last[0]} "
                               f"(x (N/{last[0]})^2) > budget {args.budget:.0f} s")
            cached_s, cached_runs, cached_tokens = time_generation(model, n, True, max_runs)
            row.update(cached_s=cached_s, cached_runs=cached_runs,
                       cached_tok_s=n / cached_s)
            # the same with the kernel on every core (generate() then uses
            # the model's enabled cache, reset before each call)
            kvarena.enable_kv_cache(model, num_threads=THREADS)
            try:
                serial_s, serial_runs, serial_tokens = time_generation(model, n, True, max_runs)
            finally:
                kvarena.disable_kv_cache(model)
            row.update(cached_nthr_s=serial_s, cached_nthr_runs=serial_runs,
                       threads_speedup=serial_s / cached_s)
            if stopped is None:
                uncached_s, uncached_runs, uncached_tokens = time_generation(model, n, False, max_runs)
                last = (n, uncached_s)
                row.update(uncached_s=uncached_s, uncached_runs=uncached_runs,
                           uncached_tok_s=n / uncached_s, speedup=uncached_s / cached_s,
                           identical=bool(np.array_equal(cached_tokens, uncached_tokens)
                                          and np.array_equal(serial_tokens, uncached_tokens)))
                log(f"[generation] {name} N={n:5d}: uncached {uncached_s:8.3f} s, "
                    f"cached {cached_s:7.3f} s ({THREADS} kernel threads {serial_s:7.3f} s), "
                    f"speedup {row['speedup']:6.1f}x, identical tokens: {row['identical']}")
            else:
                row.update(uncached_s=None, uncached_tok_s=None, speedup=None, identical=None,
                           uncached_skipped=stopped)
                log(f"[generation] {name} N={n:5d}: cached {cached_s:7.3f} s "
                    f"({THREADS} kernel threads {serial_s:7.3f} s); uncached skipped "
                    f"({stopped})")
            rows.append(row)
    return {"prompt": PROMPT.tolist(), "max_seq_len": max_seq_len, "budget_s": args.budget,
            "dtype": np.dtype(DTYPE).name, "rows": rows}


def generation_table(result):
    columns = [("config", "config", ""), ("n_new", "N", "d"),
               ("uncached_s", "uncached s", ".3f"), ("uncached_tok_s", "tok/s", ".1f"),
               ("cached_s", "cached s", ".3f"), ("cached_tok_s", "tok/s", ".1f"),
               ("speedup", "speedup", ".1f"), ("cached_nthr_s", f"cached {THREADS}thr s", ".3f"),
               ("threads_speedup", f"{THREADS}thr/{DEFAULT_THREADS}thr", ".2f"), ("cache_mb", "cache MiB", ".2f"),
               ("identical", "same tokens", "")]
    notes = [f"greedy, prompt of {len(result['prompt'])} tokens, batch 1, {result['dtype']}; "
             f"speedup = uncached s / cached s (medians of up to 5 runs, all cached on "
             f"{DEFAULT_THREADS} kernel thread(s), the KVCache default, unless said)",
             "cached time includes building and filling the temporary cache generate() makes; "
             "cache MiB = KVCache.get_memory_usage()['total_mb'] for that model",
             f"cached {THREADS}thr = the same with enable_kv_cache(model, num_threads={THREADS}) "
             f"(one cache, reset per call); {THREADS}thr/{DEFAULT_THREADS}thr = its time / cached s "
             "(above 1: the default is faster)",
             f"same tokens: uncached, cached and cached {THREADS}thr all give the same tokens",
             "small: E=128 L=4 H=4; large: E=384 L=6 H=6"]
    skipped = {r["config"]: r["uncached_skipped"] for r in result["rows"] if "uncached_skipped" in r}
    for name, why in skipped.items():
        notes.append(f"'-' in the uncached columns ({name}): skipped, {why}")
    return table(result["rows"], columns, "a. Generation: cached vs uncached", notes)


# -- b. kernel ---------------------------------------------------------------

def _reduce_threads(parts):
    threads = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def measure_bandwidth(nbytes, repeat):
    """Streaming-read bandwidth in bytes/s, the best of three honest methods.

    Each reads a float32 array far larger than the caches once per call and
    does one add (or multiply-add) per element, which the CPU does faster
    than memory delivers, so memory is the limit:
      - ``np.add.reduce`` on one thread (NumPy reductions are single-threaded);
      - the same split in ``THREADS`` contiguous parts, one Python thread each
        (the reduction releases the GIL), which is what a kernel on
        ``THREADS`` threads can draw;
      - ``np.dot(a, a)``: BLAS sdot, with BLAS's own threads, each element
        read once and used twice.
    Each method's figure is its fastest of ``repeat`` reads (a floor is a
    lower bound: what the machine can do, not what it usually does), and
    the highest of the three is used: a higher bandwidth gives a lower,
    stricter floor.
    """
    a = np.ones(nbytes // 4, dtype=np.float32)    # ones() writes every page
    parts = np.array_split(a, THREADS)
    methods = {
        "add.reduce, 1 thread": lambda: np.add.reduce(a),
        f"add.reduce, {THREADS} threads": lambda: _reduce_threads(parts),
        "BLAS sdot (np.dot)": lambda: np.dot(a, a),
    }
    found = {}
    for name, fn in methods.items():
        t = time_call(fn, repeat=repeat, min_sample=0.0, warmup=0.0)
        found[name] = a.nbytes / t["min"]
        log(f"[kernel] bandwidth, {name}: {found[name] / 1e9:.1f} GB/s "
            f"(fastest of {repeat} reads of {a.nbytes / 2**20:.0f} MiB; "
            f"median {a.nbytes / t['median'] / 1e9:.1f})")
    best = max(found, key=found.get)
    return {"array_mib": a.nbytes / 2**20, "methods_gb_s": {k: v / 1e9 for k, v in found.items()},
            "best_method": best, "bytes_per_s": found[best]}


def numpy_attention(q, keys, values):
    """Textbook decode attention in float32: q @ K^T / sqrt(D), softmax, @ V."""
    scores = (q @ keys.swapaxes(-1, -2)) / np.float32(np.sqrt(q.shape[-1]))   # (B, H, 1, n)
    scores -= scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return weights @ values                                                 # (B, H, 1, D)


def raw_kernel(accessor, starts, q, k, v, out):
    """A no-argument call of the accessor's attention on layer 0.

    ``ArenaAccessor.attend`` is internal and has had two forms: (layer,
    starts, q, out), and (layer, starts, q, key, value, out), which also
    writes the new key and value. Whichever this build has is used.
    """
    try:
        accessor.attend(0, starts, q, k, v, out)
        return lambda: accessor.attend(0, starts, q, k, v, out)
    except TypeError as exc:
        if "positional argument" not in str(exc):
            raise
    accessor.attend(0, starts, q, out)
    return lambda: accessor.attend(0, starts, q, out)


def bench_kernel(args):
    shapes = [(1, 12)] if args.quick else [(1, 12), (8, 12)]
    lengths = [16, 256, 1024] if args.quick else [16, 64, 256, 1024, 4096, 16384]
    repeat = 3 if args.quick else 9
    # untimed calls before each sample, long enough for the previous
    # method's BLAS / OpenMP workers to stop spinning (see time_many)
    settle = 0.05 if args.quick else 0.25
    head_dim = 64
    bw = measure_bandwidth((64 if args.quick else 512) * 2**20, repeat=repeat)
    if torch is None:
        log("[kernel] torch is not importable: no torch column")
    else:
        torch.set_num_threads(THREADS)
    rng = np.random.default_rng(0)
    rows = []
    for B, H in shapes:
        for S in lengths:
            # S cached positions plus the one the new token is written to:
            # every method reads n = S + 1 keys and values
            n = S + 1
            cache = kvarena.KVCache(B, n, 1, H, head_dim, dtype=DTYPE, num_threads=THREADS)
            rng.standard_normal(out=cache._arena, dtype=np.float32)
            cache.advance(S)
            q = rng.standard_normal((B, H, 1, head_dim), dtype=np.float32)
            k_new = cache._arena[0, 0, :, :, S:n].copy()   # the data already there
            v_new = cache._arena[0, 1, :, :, S:n].copy()
            out = np.empty_like(q)
            keys, values = cache._arena[0, 0], cache._arena[0, 1]   # (B, H, n, D) views
            serial = _arena.ArenaAccessor(cache._arena, 1)
            kernel = raw_kernel(cache._accessor, cache._seq_lens, q, k_new, v_new, out)
            methods = {
                "kernel": kernel,
                "kernel_1thr": raw_kernel(serial, cache._seq_lens, q, k_new, v_new, out),
                "attend": lambda: cache.attend(0, q, k_new, v_new),
                "numpy": lambda: numpy_attention(q, keys, values),
            }
            if torch is not None:
                qt, kt, vt = (torch.from_numpy(x) for x in (q, keys, values))

                def sdpa():
                    with torch.inference_mode():
                        return F.scaled_dot_product_attention(qt, kt, vt)
                methods["torch"] = sdpa
            row = {"B": B, "H": H, "D": head_dim, "S": S, "n_read": n,
                   "kv_bytes": keys.nbytes + values.nbytes, "threads": cache.num_threads}
            kernel()
            reference = out.copy()
            diffs = {"attend": np.abs(cache.attend(0, q, k_new, v_new) - reference).max(),
                     "numpy": np.abs(numpy_attention(q, keys, values) - reference).max()}
            if torch is not None:
                diffs["torch"] = np.abs(sdpa().numpy() - reference).max()
            row["max_abs_diff"] = float(max(diffs.values()))
            # a long case takes ~0.1 s per call: sample each call on its own
            min_sample = 0.0 if row["kv_bytes"] > 64 * 2**20 else 0.02
            timed = time_many(methods, repeat=repeat, min_sample=min_sample, settle=settle)
            for name, t in timed.items():
                row[f"{name}_us"] = t["median"] * 1e6
                row[f"{name}_samples_us"] = [s * 1e6 for s in t["samples"]]
            floor = row["kv_bytes"] / bw["bytes_per_s"]
            row["floor_us"] = floor * 1e6
            row["kernel_gb_s"] = row["kv_bytes"] / (row["kernel_us"] * 1e-6) / 1e9
            row["numpy_over_kernel"] = row["numpy_us"] / row["kernel_us"]
            row["attend_over_kernel"] = row["attend_us"] / row["kernel_us"]
            row["kernel_1thr_over_kernel"] = row["kernel_1thr_us"] / row["kernel_us"]
            if torch is not None:
                row["torch_over_kernel"] = row["torch_us"] / row["kernel_us"]
            row["kernel_over_floor"] = row["kernel_us"] / row["floor_us"]
            rows.append(row)
            log(f"[kernel] B={B} H={H} S={S:6d}: kernel {row['kernel_us']:10.1f} us, "
                f"numpy {row['numpy_us']:10.1f} us"
                + (f", torch {row['torch_us']:10.1f} us" if torch is not None else "")
                + f", floor {row['floor_us']:9.1f} us, max |diff| {row['max_abs_diff']:.1e}")
            # drop this arena before the next one is built
            cache = serial = kernel = methods = keys = values = None
    return {"dtype": np.dtype(DTYPE).name, "head_dim": head_dim, "threads": THREADS,
            "repeat": repeat, "settle_s": settle,
            "torch": torch is not None, "bandwidth": bw, "rows": rows}


def kernel_table(result):
    bw = result["bandwidth"]
    has_torch = result["torch"]
    columns = [("B", "B", "d"), ("H", "H", "d"), ("S", "S", "d"),
               ("kv_bytes", "K+V MiB", ""),
               ("kernel_us", "kernel us", ".1f"), ("attend_us", "attend us", ".1f"),
               ("numpy_us", "numpy us", ".1f")]
    if has_torch:
        columns.append(("torch_us", "torch us", ".1f"))
    columns += [("floor_us", "floor us", ".1f"), ("kernel_gb_s", "kernel GB/s", ".1f"),
                ("numpy_over_kernel", "numpy/kern", ".2f")]
    if has_torch:
        columns.append(("torch_over_kernel", "torch/kern", ".2f"))
    columns += [("attend_over_kernel", "attend/kern", ".2f"),
                ("kernel_1thr_over_kernel", "1thr/kern", ".2f"),
                ("kernel_over_floor", "kern/floor", ".2f"),
                ("max_abs_diff", "max|diff|", ".0e")]
    rows = [dict(r, kv_bytes=f"{r['kv_bytes'] / 2**20:.2f}") for r in result["rows"]]
    methods = "; ".join(f"{k}: {v:.1f}" for k, v in bw["methods_gb_s"].items())
    notes = [f"decode attention, T=1, D={result['head_dim']}, {result['dtype']}; each call reads "
             f"S+1 positions (S cached + the new one); "
             f"medians of {result['repeat']} samples per method, taken round-robin, each after "
             f"{result['settle_s']} s of untimed calls",
             f"kernel = ArenaAccessor.attend on {result['threads']} threads (num_threads={result['threads']}); "
             "attend = KVCache.attend (validation + write + kernel); "
             "1thr = the kernel on 1 thread",
             "numpy = q @ K^T / sqrt(D), max-subtracted softmax, @ V on views of the same arena"
             + ("; torch = F.scaled_dot_product_attention on torch.from_numpy views"
                if has_torch else "; torch not installed: no torch column"),
             f"floor = (K+V bytes) / {bw['bytes_per_s'] / 1e9:.1f} GB/s, the fastest streaming read "
             f"measured in this run over {bw['array_mib']:.0f} MiB",
             f"  (GB/s, {methods})",
             "kern/floor = kernel us / floor us; below 1, K and V came from CPU caches, not DRAM",
             "x/kern > 1: the kernel is faster than x; max|diff| = largest difference of "
             "attend/numpy/torch from the kernel"]
    return table(rows, columns, "b. Kernel: decode attention over S cached positions", notes)


# -- c. update ---------------------------------------------------------------

def bench_update(args):
    max_seq_len = 1024 if args.quick else 8192
    num_layers, head_dim = 4, 64
    shapes = [(1, 12)] if args.quick else [(1, 12), (8, 12)]
    repeat = 3 if args.quick else 9
    positions = (0, max_seq_len // 2, max_seq_len - 1)
    rng = np.random.default_rng(1)
    layer = num_layers - 1
    rows = []
    for B, H in shapes:
        k = rng.standard_normal((B, H, 1, head_dim), dtype=np.float32)
        v = rng.standard_normal((B, H, 1, head_dim), dtype=np.float32)
        # one cache per position, so that all positions are sampled in turn
        caches = {}
        for pos in positions:
            caches[pos] = kvarena.KVCache(B, max_seq_len, num_layers, H, head_dim, dtype=DTYPE)
            if pos:
                caches[pos].advance(pos)

        def calls(cache, pos):
            def assign():
                # what update() does, without its checks: two slice assignments
                cache._arena[layer, 0, :, :, pos:pos + 1] = k
                cache._arena[layer, 1, :, :, pos:pos + 1] = v
            return {f"update@{pos}": lambda: cache.update(layer, k, v),
                    f"assign@{pos}": assign,
                    f"get@{pos}": lambda: cache.get(layer)}
        fns = {}
        for pos, cache in caches.items():
            fns.update(calls(cache, pos))
        t = time_many(fns, repeat=repeat)
        for pos in positions:
            row = {"B": B, "H": H, "D": head_dim, "max_seq_len": max_seq_len,
                   "num_layers": num_layers, "seq_pos": pos,
                   "update_us": t[f"update@{pos}"]["median"] * 1e6,
                   "assign_us": t[f"assign@{pos}"]["median"] * 1e6,
                   "get_us": t[f"get@{pos}"]["median"] * 1e6}
            row["update_over_assign"] = row["update_us"] / row["assign_us"]
            rows.append(row)
            log(f"[update] B={B} H={H} seq_pos={pos:5d}: update {row['update_us']:.2f} us, "
                f"slice assignment {row['assign_us']:.2f} us, get {row['get_us']:.2f} us")
        del caches, fns
    return {"dtype": np.dtype(DTYPE).name, "repeat": repeat, "rows": rows}


def update_table(result):
    columns = [("B", "B", "d"), ("H", "H", "d"), ("max_seq_len", "max_seq_len", "d"),
               ("seq_pos", "seq_pos", "d"), ("update_us", "update us", ".2f"),
               ("assign_us", "slice assign us", ".2f"),
               ("update_over_assign", "update/assign", ".2f"), ("get_us", "get us", ".2f")]
    notes = [f"one token (T=1), D=64, {result['dtype']}, 4 layers; per-call medians of "
             f"{result['repeat']} samples, all positions and calls sampled round-robin",
             "slice assign = arena[l, 0|1, :, :, pos:pos+1] = k, v with no checks; "
             "update = KVCache.update (checks, then the Cython block copy)",
             "get = KVCache.get (two read-only views)"]
    return table(result["rows"], columns, "c. update(): cost of writing one token", notes)


# -- plots ---------------------------------------------------------------------

def plot(results, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not importable: no plots (pip install matplotlib for PNGs)")
        return []
    written = []
    gen = results.get("generation")
    if gen:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in dict.fromkeys(r["config"] for r in gen["rows"]):
            pts = [(r["n_new"], r["speedup"]) for r in gen["rows"]
                   if r["config"] == name and r["speedup"] is not None]
            if pts:
                line, = ax.plot(*zip(*pts), marker="o", label=f"{name}, kernel on {DEFAULT_THREADS} thread(s)")
                serial = [(r["n_new"], r["uncached_s"] / r["cached_nthr_s"]) for r in gen["rows"]
                          if r["config"] == name and r["speedup"] is not None]
                ax.plot(*zip(*serial), marker="o", ls=":", color=line.get_color(),
                        label=f"{name}, kernel on {THREADS} threads")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("new tokens N")
        ax.set_ylabel("speedup (uncached s / cached s)")
        ax.set_title("kvarena.GPT greedy generation")
        ax.axhline(1, color="grey", lw=0.8)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out, "generation_speedup.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    ker = results.get("kernel")
    if ker:
        shapes = list(dict.fromkeys((r["B"], r["H"]) for r in ker["rows"]))
        fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
        for ax, (B, H) in zip(axes[0], shapes):
            rows = [r for r in ker["rows"] if (r["B"], r["H"]) == (B, H)]
            S = [r["S"] for r in rows]
            for key, label, style in [("kernel_us", f"kernel ({ker['threads']} threads)", "o-"),
                                      ("kernel_1thr_us", "kernel (1 thread)", "o:"),
                                      ("attend_us", "KVCache.attend", "s-"),
                                      ("numpy_us", "NumPy textbook", "^-"),
                                      ("torch_us", "torch SDPA", "v-"),
                                      ("floor_us", "bandwidth floor", "k--")]:
                if key in rows[0]:
                    ax.plot(S, [r[key] for r in rows], style, label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("cached positions S")
            ax.set_ylabel("time per call (us)")
            ax.set_title(f"decode attention, B={B} H={H} D={ker['head_dim']}, {ker['dtype']}")
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, "kernel_vs_S.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    for path in written:
        log(f"plot: {path}")
    return written


def main(argv=None):
    args = parse_args(argv)
    out = results_dir(args.out)
    info = header({"dtype": np.dtype(DTYPE).name, "kernel_threads": THREADS,
                   "torch_threads": torch.get_num_threads() if torch is not None else None,
                   "mode": "quick" if args.quick else "full"})
    print_header("kvarena sequence-length sweep", info)
    log("Speedups and ratios compare times measured side by side in this run "
        "(medians of repeats after a warm-up).\n")
    results = {"header": info}
    path = os.path.join(out, "sweep.json")
    runners = {"generation": (bench_generation, generation_table),
               "kernel": (bench_kernel, kernel_table),
               "update": (bench_update, update_table)}
    started = time.perf_counter()
    for name in SECTIONS:
        if name in args.only:
            results[name] = runners[name][0](args)
            write_json(path, results)           # partial results survive a later failure
            write_csv(os.path.join(out, f"{name}.csv"), results[name]["rows"])
    results["elapsed_s"] = time.perf_counter() - started
    results["plots"] = plot(results, out)
    write_json(path, results)
    tables = "\n".join(runners[name][1](results[name]) for name in SECTIONS if name in results)
    with open(os.path.join(out, "sweep.txt"), "w") as f:
        f.write(tables)
    log("")
    log(tables)
    log(f"results: {path} (and {', '.join(f'{n}.csv' for n in args.only)}, sweep.txt) "
        f"in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
