"""Llama-style generation: kvarena against the NumPy cache such models write, and against no cache.

One question: for a grouped-query Llama-style model in NumPy, how many
tokens per second does decoding with kvarena's ``KVCache`` give, compared
with the same model on a plain NumPy cache (``kvarena.models.NumpyKVCache``:
preallocated (B, H_kv, S, D) arrays, K/V heads repeated to the query heads
with ``repeat_kv`` and textbook attention, as NumPy ports of Llama write it)
and with no cache (the whole sequence every step)?

The model is ``kvarena.models.Llama`` with llama2.c's stories15M shape
(dim 288, 6 layers, 6 query heads over 2 K/V heads, head_dim 48, SwiGLU
768) and a 512-token vocabulary (llama2.c's small custom tokenizer; 32000
would make the output layer most of each step), float32, seeded random
weights. Greedy generation from an 8-token prompt, batch 1 and 2, of 200
and 1000 new tokens (16 with --quick). All three give the same
tokens; the table says so for every row.

Cached runs: medians of repeated runs (5, 2 with --quick), the NumPy cache
and kvarena sampled round-robin so that load from elsewhere falls on both
alike; ``time_many``'s untimed calls (warm-up, calibration, one before
each sample) are not counted, so a cached row costs about 2 x repeat + 2
runs of each cache. Uncached: one run, and none at
1000 tokens unless --uncached-1000 (its cost grows as N^2: minutes),
after a short warm-up run.

The main job (bench/sweep.py) runs it; alone:

    python bench/llama.py [--quick] [--uncached-1000] [--out DIR]
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (Progress, default_results_dir, header, median_ratio,  # noqa: E402
                     print_header, results_dir, table, time_many, write_results)

from kvarena.models import Llama, NumpyKVCache  # noqa: E402

CONFIG = dict(vocab_size=512, dim=288, n_layers=6, n_heads=6, n_kv_heads=2)
PROMPT = np.array([1, 345, 22, 401, 9, 77, 130, 5])
DTYPE = np.float32
BATCH_SIZES = (1, 2)
MIB = 2 ** 20


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="16 new tokens, 2 runs: a smoke test of a few seconds")
    parser.add_argument("--uncached-1000", action="store_true",
                        help="also time uncached generation of 1000 tokens (minutes)")
    parser.add_argument("--out", default=default_results_dir(),
                        help="directory for llama.json (default bench/results)")
    return parser.parse_args(argv)


def run(args, progress):
    counts = [16] if args.quick else [200, 1000]
    repeat = 2 if args.quick else 5
    max_seq_len = len(PROMPT) + max(counts)
    model = Llama(**CONFIG, max_seq_len=max_seq_len, seed=0, dtype=DTYPE)
    rows = []
    for batch_size in BATCH_SIZES:
        prompt = np.tile(PROMPT, (batch_size, 1))
        shape = (batch_size, max_seq_len, model.n_layers, model.n_kv_heads, model.head_dim)
        caches = {"numpy": NumpyKVCache(*shape, dtype=DTYPE), "kvarena": model.make_cache(
            batch_size, dtype=DTYPE)}
        for n in counts:
            progress.step(f"B={batch_size}, {n} new tokens", weight(batch_size, n, args))
            tokens = {}

            def generate(name):
                def fn():
                    tokens[name] = model.generate(prompt, n, cache=caches[name])
                return fn

            timed = time_many({name: generate(name) for name in caches}, repeat=repeat,
                              min_sample=0.0, warmup=0.0)
            row = {"batch_size": batch_size, "n_new": n,
                   "numpy_s": timed["numpy"]["median"], "kvarena_s": timed["kvarena"]["median"],
                   "numpy_samples_s": timed["numpy"]["samples"],
                   "kvarena_samples_s": timed["kvarena"]["samples"]}
            row["numpy_tok_s"] = batch_size * n / row["numpy_s"]
            row["kvarena_tok_s"] = batch_size * n / row["kvarena_s"]
            # paired, round by round: the host's speed moves within seconds
            row["kvarena_vs_numpy"] = median_ratio(row["numpy_samples_s"], row["kvarena_samples_s"])
            identical = np.array_equal(tokens["numpy"], tokens["kvarena"])
            if n <= 200 or args.uncached_1000:
                model.generate(prompt, 2, use_cache=False)          # warm-up
                start = time.perf_counter()
                uncached = model.generate(prompt, n, use_cache=False)
                row["uncached_s"] = time.perf_counter() - start
                row["uncached_tok_s"] = batch_size * n / row["uncached_s"]
                row["kvarena_vs_uncached"] = row["uncached_s"] / row["kvarena_s"]
                identical = identical and np.array_equal(uncached, tokens["kvarena"])
            row["identical"] = identical
            rows.append(row)
    memory = {name: (cache.get_memory_usage()["total_bytes"] if name == "kvarena"
                     else cache.keys.nbytes + cache.values.nbytes) / MIB
              for name, cache in caches.items()}
    return rows, max_seq_len, memory


COLUMNS = [("batch_size", "B", "d"), ("n_new", "new tokens", "d"),
           ("uncached_tok_s", "uncached tok/s", ",.1f"), ("numpy_tok_s", "NumPy cache tok/s", ",.0f"),
           ("kvarena_tok_s", "kvarena tok/s", ",.0f"), ("kvarena_vs_numpy", "kvarena / NumPy", ".2f"),
           ("kvarena_vs_uncached", "kvarena / uncached", ".1f"), ("identical", "same tokens", "")]


def weight(batch_size, n, args):
    """Proportional to a row's expected time: cached runs grow as n, uncached as n^2."""
    uncached = (n / 200) ** 2 if n <= 200 or args.uncached_1000 else 0
    return batch_size ** 0.5 * (n / 200 + uncached)


def main(argv=None):
    args = parse_args(argv)
    out = results_dir(args.out)
    info = header({"dtype": np.dtype(DTYPE).name, "model": CONFIG, "quick": args.quick})
    print_header("kvarena bench: Llama-style generation (bench/llama.py)", info)
    counts = [16] if args.quick else [200, 1000]
    started = time.perf_counter()
    with Progress("llama", sum(weight(b, n, args) for b in BATCH_SIZES for n in counts)) as progress:
        rows, max_seq_len, memory = run(args, progress)
    notes = [f"model: dim {CONFIG['dim']}, {CONFIG['n_layers']} layers, {CONFIG['n_heads']} query "
             f"/ {CONFIG['n_kv_heads']} K/V heads, vocab {CONFIG['vocab_size']}; max_seq_len "
             f"{max_seq_len}; tok/s counts the tokens of every row",
             f"both caches hold the K/V heads only: {memory['numpy']:.2f} MiB (NumPy) and "
             f"{memory['kvarena']:.2f} MiB (kvarena) at B=2; the NumPy cache repeats them per "
             f"step, kvarena's attend does not",
             "kvarena / NumPy: the median over rounds of each round's ratio; kvarena / "
             "uncached: one uncached run over kvarena's median"]
    result = {"header": info, "elapsed_s": time.perf_counter() - started,
              "generation": {"rows": rows, "max_seq_len": max_seq_len, "cache_mib_b2": memory}}
    write_results(out, "llama", result,
                  table(rows, COLUMNS, title="Greedy generation, tokens per second", notes=notes),
                  rows)
    if not all(row["identical"] for row in rows):
        print("ERROR: the caches and the uncached model gave different tokens", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
