"""Plots of the results that generation.py and kernel.py wrote.

Reads ``generation.json`` and ``kernel.json`` from the results directory
(each if present) and writes next to them:

- ``generation.png``: tokens per second and the speedup against N;
- ``kernel_decode.png``: decode time per call against S, one panel per B x H,
  with the read floor;
- ``kernel_dtypes.png``: the storage dtypes and grouped-query attention.

Needs matplotlib (``make bench`` installs it into .venv); without it, says
so and writes nothing.

    python bench/plot.py [--out DIR]
"""

import argparse
import json
import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import default_results_dir, log  # noqa: E402


def load(out, name):
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def caption(fig, lines):
    """Explanations under the axes, wrapped to the figure's width."""
    width = int(fig.get_figwidth() * 14)
    text = "\n".join(textwrap.fill(line, width) for line in lines)
    fig.text(0.01, 0.01, text, fontsize=7.5, va="bottom", ha="left", color="0.25")
    return text.count("\n") + 1


def finish(fig, plt, path, caption_lines):
    fig.tight_layout(rect=(0, 0.035 * caption_lines, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"plot: {path}")
    return path


def plot_generation(result, out, plt):
    rows = result["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    skipped = []
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == name]
        n = [r["n_new"] for r in mine]
        done = [r for r in mine if r.get("uncached_s") is not None]
        skipped += [f"{name} N={r['n_new']}" for r in mine if r.get("uncached_s") is None]
        # different markers, line styles and a slight transparency so that
        # curves lying on each other stay visible
        line, = left.plot(n, [r["cached_tok_s"] for r in mine], "o-", label=f"{name}: cached",
                          alpha=0.85)
        color = line.get_color()
        left.plot(n, [r["n_new"] / r["cached2_s"] for r in mine], "s--", color=color,
                  mfc="none", ms=9, label=f"{name}: cached, kernel on 2 threads")
        left.plot([r["n_new"] for r in done], [r["uncached_tok_s"] for r in done], "^:",
                  color=color, label=f"{name}: uncached")
        right.plot([r["n_new"] for r in done], [r["speedup"] for r in done], "o-", color=color,
                   label=name)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("new tokens N")
        ax.grid(True, which="both", alpha=0.3)
    left.set_ylabel("tokens per second")
    left.set_title("throughput")
    left.legend(fontsize=7.5)
    right.set_ylabel("speedup = uncached s / cached s")
    right.set_title("what the cache buys")
    right.axhline(1, color="grey", lw=0.8)
    right.legend(fontsize=8)
    lines = [f"kvarena.models.GPT, greedy, prompt of {len(result['prompt'])} tokens, batch 1, float32; "
             "medians of up to 5 uncached and 7 cached runs (3 and 5 quick); "
             f"BLAS: {result['blas']}. "
             "small: E=128 L=4 H=4; large: E=384 L=6 H=6. Cached: kernel on 1 thread, and on 2 (cached 2thr)."]
    if skipped:
        lines.append("A missing uncached point: that run was skipped because its time, projected "
                     f"as N^2 from the previous one, exceeded the {result['budget_s']:.0f} s "
                     "budget "
                     f"({', '.join(skipped)}).")
    fig.suptitle("Cached against uncached generation (bench/generation.py)")
    return finish(fig, plt, os.path.join(out, "generation.png"), caption(fig, lines))


def plot_decode(result, out, plt):
    rows = result["decode"]
    shapes = list(dict.fromkeys((r["B"], r["H"]) for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.8), squeeze=False)
    series = [("attend1_us", "kvarena, 1 kernel thread", "o-", {}),
              ("attend2_us", "kvarena, 2 kernel threads", "s--", {"mfc": "none", "ms": 9}),
              ("numpy_us", "NumPy textbook", "^-", {}),
              ("c_us", "plain C loop, 2 threads", "D-", {}),
              ("torch_us", "torch SDPA", "v-", {}),
              ("floor_us", "read floor", "k--", {"lw": 2})]
    for ax, (B, H) in zip(axes[0], shapes):
        mine = [r for r in rows if (r["B"], r["H"]) == (B, H)]
        for key, label, style, kw in series:
            pts = [(r["S"], r[key]) for r in mine if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=label, alpha=0.85, **kw)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cached positions S")
        ax.set_ylabel("time per call (us)")
        ax.set_title(f"B={B}, H={H}, D=64, float32, one new token")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7.5)
    lines = ["Read floor: a C loop that only reads (sums) the same K and V bytes with the same 2 "
             "threads; no attention can be faster. Plain C loop: the textbook three passes "
             "compiled with -O3 -march=native -ffast-math. kvarena = KVCache.attend (checks, "
             "write, kernel).",
             f"Medians of {result['repeat']} rounds, methods sampled in turn. A missing line or "
             "point: that method was not available in this run (no compiler, no torch).",
             f"kernel path: {result['header'].get('kernel')}"]
    fig.suptitle("Decode attention against S (bench/kernel.py, table 1)")
    return finish(fig, plt, os.path.join(out, "kernel_decode.png"), caption(fig, lines))


def plot_dtypes(result, out, plt):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6),
                                      gridspec_kw={"width_ratios": [2, 1]})
    rows = [r for r in result["dtypes"] if "skipped" not in r]
    cases = list(dict.fromkeys((r["B"], r["H"], r["S"]) for r in rows))
    labels, groups = [], []
    for case in cases:
        mine = {r["dtype"]: r for r in rows if (r["B"], r["H"], r["S"]) == case}
        any_row = next(iter(mine.values()))
        bars = [("float32", any_row["f32attend_us"])]
        bars += [(name, r["attend_us"]) for name, r in mine.items()]
        bars.append(("NumPy on float32", any_row["numpy32_us"]))
        groups.append(bars)
        labels.append("B x H x S = {} x {} x {}".format(*case))
    width = 0.8 / max(len(g) for g in groups) if groups else 0.8
    names = list(dict.fromkeys(name for g in groups for name, _ in g))
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j, g in enumerate(groups)
              if name in dict(g)]
        ys = [dict(g)[name] for g in groups if name in dict(g)]
        bars = left.bar(xs, ys, width,
                        label=name if name.startswith("NumPy") else f"kvarena, {name}")
        left.bar_label(bars, [f"{y:,.0f}" for y in ys], fontsize=7)
    left.set_xticks(range(len(labels)), labels)
    left.set_yscale("log")
    left.set_ylabel("time per call (us), lower is better")
    left.set_title("storage dtypes, decode (best of 1 and 2 kernel threads)")
    left.legend(fontsize=8)
    gqa = result["gqa"]
    right.set_title("grouped-query attention")
    if "skipped" in gqa:
        right.axis("off")
        right.text(0.0, 0.5, textwrap.fill("skipped: " + gqa["skipped"], 40), fontsize=8,
                   va="center")
    else:
        bars = right.bar([0, 1], [gqa["attend_us"], gqa["repeated_us"]], 0.6)
        right.bar_label(bars, [f"{gqa['attend_us']:,.0f}", f"{gqa['repeated_us']:,.0f}"],
                        fontsize=7)
        right.set_xticks([0, 1], [f"{gqa['Hq']} q heads over\n{gqa['Hkv']} K/V heads",
                                  f"K/V repeated to\n{gqa['Hq']} heads"])
        right.set_ylabel("time per call (us)")
    skipped = [f"{r['dtype']} ({r['skipped']})" for r in result["dtypes"] if "skipped" in r]
    lines = ["Each bar: the same keys and values stored in that dtype; KVCache.attend, the better "
             "of 1 and 2 kernel threads, float32 queries (float64 for float64). The axis is "
             "logarithmic: compare the figures on the bars, not their areas."]
    if skipped:
        lines.append("Missing bars: " + "; ".join(skipped))
    fig.suptitle("Storage dtypes and grouped-query attention (bench/kernel.py, tables 2 and 4)")
    return finish(fig, plt, os.path.join(out, "kernel_dtypes.png"), caption(fig, lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=default_results_dir(),
                        help="the results directory to read and write (default: bench/results)")
    args = parser.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no plots: matplotlib is not importable in this Python "
            f"({sys.executable}); `make bench` installs it into .venv")
        return 0
    written = []
    generation, kernel = load(args.out, "generation"), load(args.out, "kernel")
    if generation:
        written.append(plot_generation(generation, args.out, plt))
    if kernel:
        written.append(plot_decode(kernel, args.out, plt))
        written.append(plot_dtypes(kernel, args.out, plt))
    if not written:
        log(f"no plots: neither generation.json nor kernel.json in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
