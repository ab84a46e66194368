"""Does the process hold what KVCache.get_memory_usage() says it holds?

Four checks, each printed as a table:

1. footprint: for arenas of 16 MiB to 1 GiB, float32, float16 and int8
   (whose one allocation also holds a float32 scale per vector), the
   resident memory (RSS) before and after constructing a KVCache and the
   peak during construction (memory_profiler.memory_usage), against the
   prediction ``get_memory_usage()['total_bytes']``;
2. lazy commit: ``lazy=True`` holds ~nothing until the positions are written;
3. steady state: generating 1000 tokens with the cached GPT does not grow
   the process beyond a small constant after the cache is built;
4. zero copy: ``cache.get(layer)`` allocates no array data (tracemalloc),
   next to a copy (``np.array(view)``) that shows the measurement sees one.

Each measurement of 1-3 runs in a fresh Python process, so that what one
leaves behind (freed pages the allocator keeps, imported modules) does not
count in the next. RSS moves in pages (4 KiB), so errors are only
meaningful for arenas of many pages.

    python bench/memory.py [--quick] [--out DIR]
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (Progress, default_results_dir, header, log, print_header,  # noqa: E402
                     results_dir, table, write_results)

MIB = 2 ** 20
INTERVAL = 0.005          # memory_profiler sampling period, seconds
# arena (L, 2, B, H, S, D) = (8, 2, 1, 8, S, 64): 32 KiB per position in float32
SHAPE = dict(batch_size=1, num_layers=8, num_heads=8, head_dim=64)


def rss_mib():
    import psutil
    return psutil.Process().memory_info().rss / MIB


def settle():
    gc.collect()
    time.sleep(0.05)


# -- children: each runs in its own process and prints one JSON line ----------

def child_footprint(max_seq_len, dtype, lazy, touch):
    """Construct one KVCache and measure RSS around it; optionally write every position."""
    from memory_profiler import memory_usage

    import kvarena

    # warm the code paths used below (a tiny cache, memory_profiler's
    # sampling process and pipe) so that imports and first-call
    # allocations are not charged to the arena
    memory_usage((kvarena.KVCache, (1, 8, 1, 1, 8), {"dtype": dtype, "lazy": lazy}),
                 interval=INTERVAL, max_usage=True, max_iterations=1)
    settle()
    before = rss_mib()
    # max_iterations=1: memory_usage otherwise re-runs a call that was too
    # quick to sample, and a re-run would build a second arena
    peak, cache = memory_usage(
        (kvarena.KVCache, (SHAPE["batch_size"], max_seq_len, SHAPE["num_layers"],
                           SHAPE["num_heads"], SHAPE["head_dim"]), {"dtype": dtype, "lazy": lazy}),
        interval=INTERVAL, max_usage=True, retval=True, max_iterations=1)
    settle()
    after = rss_mib()
    result = {"predicted_mib": cache.get_memory_usage()["total_bytes"] / MIB,
              "report_dtype": cache.get_memory_usage()["dtype"],
              "before_mib": before, "after_mib": after, "peak_mib": peak}
    if touch:
        # write every position of every layer, one layer-sized block at a time
        B, H, S, D = cache.batch_size, cache.num_heads, cache.max_seq_len, cache.head_dim
        block = np.ones((B, H, S, D), dtype=cache.dtype)
        settle()
        base = rss_mib()
        for layer in range(cache.num_layers):
            cache.update(layer, block, block)
        settle()
        result["touched_mib"] = rss_mib() - base
    return result


def child_generation(n_new, embed_dim, num_layers, num_heads):
    """RSS after building a cached GPT, during and after generating ``n_new`` tokens."""
    from memory_profiler import memory_usage

    import kvarena
    import kvarena.models

    prompt = np.arange(8) % 256
    memory_usage((time.sleep, (0.01,), {}), interval=INTERVAL, max_iterations=1)   # warm-up
    model = kvarena.models.GPT(256, embed_dim, num_layers, num_heads, len(prompt) + n_new, seed=0)
    cache = kvarena.enable_kv_cache(model)
    settle()
    constructed = rss_mib()
    runs = []
    for _ in range(2):
        samples, tokens = memory_usage((model.generate, (prompt, n_new), {}),
                                       interval=INTERVAL, retval=True, max_iterations=1)
        settle()
        runs.append({"peak_mib": max(samples), "after_mib": rss_mib(),
                     "samples": len(samples), "tokens": len(tokens)})
    return {"cache_mib": cache.get_memory_usage()["total_mb"], "constructed_mib": constructed,
            "runs": runs}


def run_child(kind, **params):
    """Run ``child_<kind>(**params)`` in a fresh interpreter; its dict result."""
    code = (f"import sys, json; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import memory; print(json.dumps(memory.child_{kind}(**json.loads(sys.argv[1]))))")
    # run from bench/: `python -c` puts the working directory first on
    # sys.path, and the source tree's kvarena/ has no extension after `pip install .`
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(params)],
                          capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    if proc.returncode != 0:
        raise RuntimeError(f"child_{kind}({params}) failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the four checks -----------------------------------------------------------

def check_footprint(sizes_mib):
    rows = []
    for dtype in ("float32", "float16", "int8"):
        # bytes of one vector: its D values, and for int8 its float32 scale
        vector = SHAPE["head_dim"] * np.dtype(dtype).itemsize + (4 if dtype == "int8" else 0)
        per_position = 2 * SHAPE["num_layers"] * SHAPE["batch_size"] * SHAPE["num_heads"] * vector
        for size in sizes_mib:
            max_seq_len = size * MIB // per_position
            r = run_child("footprint", max_seq_len=max_seq_len, dtype=dtype, lazy=False, touch=False)
            row = {"dtype": dtype, "max_seq_len": max_seq_len, "lazy": False, **r}
            row["measured_mib"] = r["after_mib"] - r["before_mib"]
            row["peak_delta_mib"] = r["peak_mib"] - r["before_mib"]
            row["error_pct"] = 100 * (row["measured_mib"] - r["predicted_mib"]) / r["predicted_mib"]
            elements = 2 * SHAPE["num_layers"] * SHAPE["batch_size"] * SHAPE["num_heads"] \
                * max_seq_len * SHAPE["head_dim"]
            row["bytes_per_element"] = r["predicted_mib"] * MIB / elements
            rows.append(row)
            log(f"[footprint] {dtype} {r['predicted_mib']:7.1f} MiB predicted: "
                f"{row['measured_mib']:7.1f} MiB resident after construction "
                f"(peak {row['peak_delta_mib']:7.1f}), error {row['error_pct']:+.2f}%")
    return rows


def check_lazy(size_mib):
    per_position = 2 * SHAPE["num_layers"] * SHAPE["num_heads"] * SHAPE["head_dim"] * 4
    max_seq_len = size_mib * MIB // per_position
    rows = []
    for lazy in (False, True):
        r = run_child("footprint", max_seq_len=max_seq_len, dtype="float32", lazy=lazy, touch=True)
        row = {"dtype": "float32", "max_seq_len": max_seq_len, "lazy": lazy, **r}
        row["measured_mib"] = r["after_mib"] - r["before_mib"]
        row["peak_delta_mib"] = r["peak_mib"] - r["before_mib"]
        row["after_touch_mib"] = row["measured_mib"] + r["touched_mib"]
        rows.append(row)
        log(f"[lazy] lazy={lazy}: {row['measured_mib']:.1f} MiB resident after construction, "
            f"{row['after_touch_mib']:.1f} MiB after writing every position "
            f"(predicted {r['predicted_mib']:.1f})")
    return rows


def check_generation(n_new, configs):
    rows = []
    for name, (E, L, H) in configs.items():
        r = run_child("generation", n_new=n_new, embed_dim=E, num_layers=L, num_heads=H)
        for i, run in enumerate(r["runs"], 1):
            row = {"config": name, "embed_dim": E, "num_layers": L, "num_heads": H,
                   "n_new": n_new, "run": i, "cache_mib": r["cache_mib"],
                   "constructed_mib": r["constructed_mib"], **run}
            row["peak_growth_mib"] = run["peak_mib"] - r["constructed_mib"]
            row["after_growth_mib"] = run["after_mib"] - r["constructed_mib"]
            rows.append(row)
            log(f"[generation] {name} run {i}: {n_new} tokens; RSS after construction "
                f"{r['constructed_mib']:.1f} MiB, peak +{row['peak_growth_mib']:.1f} MiB, "
                f"after +{row['after_growth_mib']:.1f} MiB")
    return rows


def check_zero_copy(calls):
    import kvarena

    cache = kvarena.KVCache(1, 4096, 4, 12, 64)
    block = np.ones((1, 12, 4000, 64), dtype=np.float32)
    for layer in range(4):
        cache.update(layer, block, block)
    cache.advance(4000)
    del block
    view_nbytes = sum(a.nbytes for a in cache.get(1))

    def per_call(fn, n):
        # keep every result alive so that nothing is freed and re-used
        # between calls; the growth per call is what one call holds on to
        fn()
        settle()
        kept = []
        tracemalloc.start()
        start, _ = tracemalloc.get_traced_memory()
        for _ in range(n):
            kept.append(fn())
        end, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return (end - start) / n, (peak - start) / n

    rows = []
    # the copy holds ~23 MiB per call: measured over fewer calls
    for label, fn, n in [("cache.get(layer)", lambda: cache.get(1), calls),
                         ("np.array(view) (a copy, for contrast)",
                          lambda: tuple(np.array(a) for a in cache.get(1)), max(1, calls // 100))]:
        held, peak = per_call(fn, n)
        rows.append({"call": label, "calls": n, "view_nbytes": view_nbytes,
                     "traced_per_call": held, "peak_per_call": peak,
                     "fraction_of_view": held / view_nbytes})
        log(f"[zero-copy] {label}: {held:,.0f} bytes traced per call over {n} calls "
            f"(the views hold {view_nbytes:,} bytes)")
    return rows


# -- tables ---------------------------------------------------------------------

def footprint_table(rows):
    columns = [("dtype", "dtype", ""), ("max_seq_len", "max_seq_len", "d"),
               ("predicted_mib", "predicted MiB", ".2f"), ("measured_mib", "RSS delta MiB", ".2f"),
               ("peak_delta_mib", "peak delta MiB", ".2f"), ("error_pct", "error %", "+.2f"),
               ("bytes_per_element", "bytes/element", ".4f")]
    notes = [f"arena (L, 2, B, H, S, D) = ({SHAPE['num_layers']}, 2, {SHAPE['batch_size']}, "
             f"{SHAPE['num_heads']}, max_seq_len, {SHAPE['head_dim']}); lazy=False (the default)",
             "predicted = get_memory_usage()['total_bytes']; RSS delta = RSS after construction "
             "- RSS before, in a fresh process",
             f"peak delta = highest RSS sampled by memory_profiler (every {INTERVAL * 1e3:.0f} ms) "
             "during construction - RSS before; error = (RSS delta - predicted) / predicted",
             "bytes/element = predicted bytes per cached key or value element; int8: (D + 4) "
             f"/ D = {(SHAPE['head_dim'] + 4) / SHAPE['head_dim']:.4f} at D = {SHAPE['head_dim']} "
             "(data and scales, one allocation)"]
    return table(rows, columns, "1. Footprint: predicted vs resident", notes)


def lazy_table(rows):
    rows = [dict(r, lazy=str(r["lazy"])) for r in rows]
    columns = [("lazy", "lazy", ""), ("max_seq_len", "max_seq_len", "d"),
               ("predicted_mib", "predicted MiB", ".2f"),
               ("measured_mib", "after construction MiB", ".2f"),
               ("after_touch_mib", "after writing all MiB", ".2f")]
    notes = ["RSS deltas from before construction; 'after writing all' = after update() of every "
             "position of every layer"]
    return table(rows, columns, "2. Lazy commit", notes)


def generation_table(rows):
    columns = [("config", "config", ""), ("n_new", "tokens", "d"), ("run", "run", "d"),
               ("cache_mib", "cache MiB", ".2f"), ("constructed_mib", "RSS built MiB", ".1f"),
               ("peak_growth_mib", "peak growth MiB", "+.2f"),
               ("after_growth_mib", "growth after MiB", "+.2f"), ("samples", "samples", "d")]
    notes = ["RSS built = process RSS after GPT(...) and enable_kv_cache(model); growth = RSS during "
             "(peak) and after generate() minus that",
             "run 2 repeats run 1 in the same process; for scale, a copy of every new key and "
             "value kept per token would add about 'cache MiB' per run"]
    return table(rows, columns, "3. Cached generation: resident memory after construction", notes)


def zero_copy_table(rows):
    columns = [("call", "call", ""), ("calls", "calls", "d"),
               ("view_nbytes", "view nbytes", ",d"),
               ("traced_per_call", "traced B/call", ",.0f"),
               ("peak_per_call", "peak B/call", ",.0f"),
               ("fraction_of_view", "traced/nbytes", ".2e")]
    notes = ["tracemalloc, all results kept alive; NumPy reports its data buffers to tracemalloc, "
             "so a copy shows up as its nbytes",
             "cache.get on a (1, 12, 4096, 64) float32 cache of 4 layers at seq_pos 4000"]
    return table(rows, columns, "4. Zero copy: bytes allocated by get()", notes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    parser.add_argument("--out", default=default_results_dir(),
                        help="directory for memory.json (default: bench/results)")
    args = parser.parse_args(argv)
    out = results_dir(args.out)

    sizes = [16, 64] if args.quick else [16, 64, 256, 1024]
    lazy_size = 64 if args.quick else 256
    n_new = 100 if args.quick else 1000
    configs = {"small": (128, 4, 4)} if args.quick else {"small": (128, 4, 4), "large": (384, 6, 6)}

    import memory_profiler
    info = header({"memory_profiler": memory_profiler.__version__,
                   "page_size": os.sysconf("SC_PAGE_SIZE"),
                   "mode": "quick" if args.quick else "full"})
    print_header("kvarena memory check", info)

    started = time.perf_counter()
    results = {"header": info}
    # rough weights for the estimate of the time left, in ~0.4 s units: a
    # fresh process plus the arena it builds; the tokens times the model's E * L
    weights = {"footprint": 2 * (len(sizes) + sum(sizes) / 256), "lazy": 2 + lazy_size / 64,
               "generation": n_new * sum(E * L for E, L, _ in configs.values()) / 30000,
               "zero copy": 1}
    with Progress("memory", sum(weights.values())) as progress:
        progress.step("1. footprint: one fresh process per arena", weights["footprint"])
        results["footprint"] = check_footprint(sizes)
        progress.step("2. lazy commit", weights["lazy"])
        results["lazy"] = check_lazy(lazy_size)
        progress.step(f"3. cached generation of {n_new} tokens", weights["generation"])
        results["generation"] = check_generation(n_new, configs)
        progress.step("4. zero copy", weights["zero copy"])
        results["zero_copy"] = check_zero_copy(100 if args.quick else 1000)
    results["elapsed_s"] = time.perf_counter() - started
    tables = "\n".join([footprint_table(results["footprint"]), lazy_table(results["lazy"]),
                        generation_table(results["generation"]),
                        zero_copy_table(results["zero_copy"])])
    write_results(out, "memory", results, tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
