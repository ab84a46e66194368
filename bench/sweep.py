"""The main job: every bench question in turn, then the plots.

Runs, each in a fresh interpreter (so that one question's thread pools and
memory do not carry into the next), with the same ``--quick`` and ``--out``:

1. ``generation.py``: what the cache buys (cached vs uncached generation);
2. ``llama.py``: a grouped-query Llama-style model on kvarena against the
   NumPy cache such models write (repeat_kv) and against no cache;
3. ``kernel.py``: how fast attention is against NumPy, a plain C loop and
   the read floor (decode, storage dtypes, prefill, grouped-query);
4. ``update.py``: what writing one token costs (float32 and int8);
5. ``quality.py``: what int8 and float16 caches cost in generation quality;
6. ``plot.py``: the PNGs of 1 and 3.

Each script prints its own progress and tables; this one prints where the
sweep stands. ``make memory`` and ``make ops`` are separate runs.

    python bench/sweep.py [--quick] [--out DIR] [--only generation,llama,kernel,update,quality]
"""

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import default_results_dir, log, results_dir  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ("generation", "llama", "kernel", "update", "quality")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (about 2 minutes)")
    parser.add_argument("--out", default=default_results_dir(),
                        help="directory for every script's results (default: bench/results)")
    parser.add_argument("--only", default=",".join(SCRIPTS),
                        help=f"comma-separated subset of {', '.join(SCRIPTS)}")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SCRIPTS)
    if unknown:
        parser.error(f"--only takes {', '.join(SCRIPTS)}; got {', '.join(sorted(unknown))}")
    out = results_dir(args.out)
    steps = [(name, ["--quick"] if args.quick else []) for name in SCRIPTS if name in only]
    steps.append(("plot", []))
    started = time.perf_counter()
    failed = []
    for i, (name, flags) in enumerate(steps, 1):
        log(f"\n[sweep] {i}/{len(steps)}: bench/{name}.py {' '.join(flags)} "
            f"({time.perf_counter() - started:.0f} s elapsed)\n")
        code = subprocess.call([sys.executable, os.path.join(BENCH, f"{name}.py"), *flags,
                                "--out", out])
        if code != 0:
            failed.append(name)
            log(f"[sweep] bench/{name}.py exited with {code}")
    log(f"\n[sweep] done in {time.perf_counter() - started:.0f} s; results in {out}"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
