"""What does the cache buy? Cached against uncached greedy generation.

kvarena.models.GPT generates N new tokens from the same 8-token prompt three ways,
interleaved run by run: uncached (the whole sequence through the model at
every step), cached with the kernel on 1 thread (a prefill call, then one
token per call) and cached with the kernel on 2 threads (the KVCache
default on this 2-core machine: every CPU, the count timed per call). All three must give the same tokens. A run during which other
processes used the CPU (``_common.MachineLoad``) is run again, a bounded
number of times; the figure is flagged when disturbed runs had to be kept.
Before each N the script waits, up to ``--wait`` seconds, for the machine
to be quiet.

Thread policy: BLAS is limited to one thread for the whole script
(threadpoolctl when importable, else OPENBLAS_NUM_THREADS and friends set
before NumPy is imported), and the header records it. Why: the model's
matrices are small (E <= 384), so a second BLAS thread buys little, and it
makes every matmul wait for a worker that the scheduler may not be
running. The uncached side does the larger matmuls (the whole sequence),
which OpenBLAS splits across its threads; the cached side's 1-row matmuls
it does not. When another process holds a core, each split matmul can wait
a scheduler time slice for its worker, and the uncached time, hence the
speedup, jumps: three quick runs here with 2 BLAS threads gave uncached
N = 25 in 0.35 s and 5.2 s (speedups 9.6x and 141x), with 1 BLAS thread
0.043 s and 0.054 s (3.1x both), all with the other core busy. The
kernel's OpenMP workers wait the same way, next to BLAS's spinning ones
(issue 15: a 2-thread kernel call of 12 ms where 1 thread took 40 us).
``--blas-threads N`` measures the other policy.

    python bench/generation.py [--quick] [--out DIR] [--budget S] [--blas-threads N]
"""

import argparse
import os
import sys
import time


def _blas_threads_argument(argv):
    for i, arg in enumerate(argv):
        if arg == "--blas-threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--blas-threads="):
            return arg.split("=", 1)[1]
    return "1"


if __name__ == "__main__":
    # threadpoolctl may be missing: then only the environment, read by
    # OpenBLAS when NumPy loads it, can set the pool's size
    for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        os.environ.setdefault(_var, _blas_threads_argument(sys.argv[1:]))

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (MachineLoad, Progress, default_results_dir, header, median,  # noqa: E402
                     median_ratio, others_note, print_header, results_dir, table, thread_pools,
                     wait_for_quiet, write_results)

import kvarena  # noqa: E402
import kvarena.models  # noqa: E402

PROMPT = np.array([3, 14, 15, 92, 65, 35, 89, 79], dtype=np.int64)   # 8 tokens
CONFIGS = {
    "small": dict(vocab_size=256, embed_dim=128, num_layers=4, num_heads=4),
    "large": dict(vocab_size=256, embed_dim=384, num_layers=6, num_heads=6),
}
KERNEL_THREADS = 2          # the cached run beside the 1-thread one


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (under a minute)")
    parser.add_argument("--out", default=default_results_dir(),
                        help="directory for generation.json, .csv, .txt (default: bench/results)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds: skip an uncached run projected to take longer "
                             "(default 60, 5 with --quick)")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="BLAS threads for the whole run (default 1; see the docstring)")
    parser.add_argument("--wait", type=float, default=None,
                        help="seconds to wait, before each N, for other processes to leave "
                             "the CPU (default 30, 0 with --quick)")
    args = parser.parse_args(argv)
    if args.budget is None:
        args.budget = 5.0 if args.quick else 60.0
    if args.wait is None:
        args.wait = 0.0 if args.quick else 30.0
    return args


def limit_blas(threads):
    """Limit BLAS to ``threads`` for the rest of the process; how it was done."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')} (no threadpoolctl)"
    threadpool_limits(limits=threads, user_api="blas")     # until the process ends
    return f"threadpoolctl.threadpool_limits({threads}, user_api='blas')"


def generator(model, n_new, mode):
    """A no-argument generate() of ``n_new`` tokens: uncached, cached (kernel on
    1 thread) or cached2 (on KERNEL_THREADS)."""
    if mode == "uncached":
        return lambda: model.generate(PROMPT, n_new, use_cache=False)
    threads = 1 if mode == "cached" else KERNEL_THREADS

    def cached():
        # generate() uses the model's enabled cache (reset per call) when there is one
        kvarena.enable_kv_cache(model, num_threads=threads)
        try:
            return model.generate(PROMPT, n_new, use_cache=True)
        finally:
            kvarena.disable_kv_cache(model)
    return cached


def time_runs(fns, max_runs, run_budget, retries, min_runs=1):
    """Median seconds of each ``fns[mode]()``, run in turn; the last tokens of each.

    Rounds (one run of every function, in reverse order every other round,
    so that neither pays for following the other) repeat while they took
    less than ``run_budget`` seconds in all, at least ``min_runs`` and at
    most ``max_runs`` kept. A round disturbed by other processes is run
    again, at most ``retries`` times and only if it lasted less than
    ``run_budget``; past that it is kept, and the result is flagged. The
    third value also holds the kept rounds ({mode: seconds} each).
    """
    kept, disturbed, tokens = [], 0, {}
    flagged = False
    while len(kept) < max_runs and (len(kept) < min_runs
                                    or sum(sum(r.values()) for r in kept) < run_budget):
        round_ = {}
        order = list(fns.items())
        with MachineLoad() as load:
            for mode, fn in order if (len(kept) + disturbed) % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                tokens[mode] = fn()
                round_[mode] = time.perf_counter() - start
        if load.disturbed:
            disturbed += 1
            if disturbed <= retries and load.seconds < run_budget:
                continue
            flagged = True
        kept.append(round_)
    times = {mode: median([r[mode] for r in kept]) for mode in fns}
    return times, tokens, {"runs": len(kept), "disturbed": disturbed, "flagged": flagged,
                           "rounds": kept}


def bench_config(name, counts, args, progress, max_runs):
    max_seq_len = len(PROMPT) + max(counts)
    config = dict(CONFIGS[name], max_seq_len=max_seq_len)
    model = kvarena.models.GPT(**config, seed=0)
    head_dim = config["embed_dim"] // config["num_heads"]
    probe = kvarena.KVCache(1, max_seq_len, config["num_layers"], config["num_heads"], head_dim)
    cache_mb = probe.get_memory_usage()["total_mb"]
    del probe
    for mode in ("uncached", "cached", "cached2"):       # warm-up
        generator(model, 5, mode)()
    rows, last = [], None
    for n in counts:
        progress.step(f"{name} N={n}", n * (1 + n / 100))   # uncached grows as N^2
        wait_for_quiet(args.wait, progress.log)
        row = {"config": name, "embed_dim": config["embed_dim"],
               "num_layers": config["num_layers"], "num_heads": config["num_heads"],
               "n_new": n, "cache_mb": cache_mb}
        modes = ["cached", "cached2"]
        if last is not None:
            projected = last[1] * (n / last[0]) ** 2
            if projected > args.budget:
                row["uncached_skipped"] = (f"projected {projected:.0f} s from {last[1]:.1f} s at "
                                           f"N={last[0]} (x (N/{last[0]})^2) > budget "
                                           f"{args.budget:.0f} s")
        if "uncached_skipped" not in row:
            modes.insert(0, "uncached")
        with MachineLoad() as load:
            # the two cached runs timed on their own: beside an uncached run
            # of seconds, a budget of rounds leaves them two samples each; and
            # at least 2 * max_runs - 1 rounds (9; 5 with --quick), since their
            # ratio is taken round by round: single rounds of runs of 0.2-0.4 s
            # read 0.84-1.33, and with five such rounds rows read 1.11 and 1.14
            # (run AC: small N = 500, 1000); short runs take up to five times
            # the uncached rounds: the host's speed flips within a second, and
            # with seven rounds rows of short runs read 1.06-1.07 (run V: small
            # N = 200, large N = 10)
            times, tokens, runs = time_runs({m: generator(model, n, m) for m in modes[-2:]},
                                            max_runs=5 * max_runs, run_budget=2.0, retries=2,
                                            min_runs=2 * max_runs - 1)
            pairs = runs.pop("rounds")
            if modes[0] == "uncached":
                slow, slow_tokens, slow_runs = time_runs(
                    {"uncached": generator(model, n, "uncached")},
                    max_runs=max_runs, run_budget=2.0, retries=2)
                del slow_runs["rounds"]
                times.update(slow)
                tokens.update(slow_tokens)
                runs.update(uncached_runs=slow_runs["runs"],
                            disturbed=runs["disturbed"] + slow_runs["disturbed"],
                            flagged=runs["flagged"] or slow_runs["flagged"])
        row.update(runs, others=load.cores)
        row.update({f"{m}_s": t for m, t in times.items()})
        row["cached_tok_s"] = n / row["cached_s"]
        # paired: the host's speed moves within seconds, a round's two runs
        # are taken back to back
        for mode in ("cached", "cached2"):
            row[f"{mode}_samples_s"] = [r[mode] for r in pairs]
        row["threads_ratio"] = median_ratio(row["cached2_samples_s"], row["cached_samples_s"])
        row["identical"] = bool(np.array_equal(tokens["cached"], tokens["cached2"]))
        if "uncached" in times:
            last = (n, times["uncached"])
            row["uncached_tok_s"] = n / row["uncached_s"]
            row["speedup"] = row["uncached_s"] / row["cached_s"]
            row["identical"] &= bool(np.array_equal(tokens["cached"], tokens["uncached"]))
        progress.log(f"{name} N={n}: cached {row['cached_s']:.3f} s (2 kernel threads "
                     f"{row['cached2_s']:.3f} s)"
                     + (f", uncached {row['uncached_s']:.3f} s, speedup {row['speedup']:.1f}x"
                        if "uncached" in times else ", uncached skipped")
                     + f"; same tokens: {row['identical']}; others {others_note(load.cores)}")
        rows.append(row)
    return rows


def generation_table(result):
    columns = [("config", "config", ""), ("n_new", "N", "d"),
               ("uncached_s", "uncached s", ".3f"), ("uncached_tok_s", "tok/s", ".1f"),
               ("cached_s", "cached s", ".3f"), ("cached_tok_s", "tok/s", ".1f"),
               ("speedup", "speedup", ".1f"), ("cached2_s", "cached 2thr s", ".3f"),
               ("threads_ratio", "2thr/1thr", ".2f"), ("cache_mb", "cache MiB", ".2f"),
               ("identical", "same tokens", ""), ("others_txt", "others", "")]
    rows = [dict(r, others_txt=others_note(r["others"]) + (" (kept disturbed)" if r["flagged"]
                                                          else ""))
            for r in result["rows"]]
    notes = [f"greedy, prompt of {len(result['prompt'])} tokens, batch 1, float32; BLAS threads: "
             f"{result['blas']}",
             "speedup = uncached s / cached s; medians of up to 5 uncached runs (3 with --quick), "
             "and of 9 to 25 (5 to 15) rounds of the two cached runs, as many as 2 s hold, each "
             "run in turn, the order reversed every other round",
             "cached = generate(use_cache=True) with enable_kv_cache(model, num_threads=1); "
             "cached 2thr = with num_threads=2",
             "2thr/1thr = the median over rounds of each round's cached 2thr s / cached s "
             "(below 1: the second kernel thread pays)",
             "cache MiB = the cache generate() builds for that model; "
             "small: E=128 L=4 H=4, large: E=384 L=6 H=6",
             "others = cores used by other processes during the row; ! = disturbed"]
    for r in result["rows"]:
        if "uncached_skipped" in r:
            notes.append(f"'-' in the uncached columns ({r['config']}, N={r['n_new']}): skipped, "
                         f"{r['uncached_skipped']}")
    return table(rows, columns, "Generation: cached vs uncached", notes)


def main(argv=None):
    args = parse_args(argv)
    out = results_dir(args.out)
    blas = limit_blas(args.blas_threads)
    names = ["small"] if args.quick else ["small", "large"]
    counts = {"small": [10, 25] if args.quick else [10, 25, 50, 100, 200, 500, 1000],
              "large": [10, 100, 500]}
    info = header({"blas_policy": blas, "blas_pools_now": thread_pools(),
                   "kernel_threads": [1, KERNEL_THREADS],
                   "mode": "quick" if args.quick else "full"})
    print_header("kvarena generation: cached vs uncached", info)
    started = time.perf_counter()
    rows = []
    total = sum(n * (1 + n / 100) for name in names for n in counts[name])
    with Progress("generation", total) as progress:
        for name in names:
            rows += bench_config(name, counts[name], args, progress,
                                 max_runs=3 if args.quick else 5)
    result = {"header": info, "prompt": PROMPT.tolist(), "budget_s": args.budget,
              "blas": blas, "rows": rows, "elapsed_s": time.perf_counter() - started}
    write_results(out, "generation", result, generation_table(result), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
