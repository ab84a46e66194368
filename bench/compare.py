"""Do two runs of the main job agree? Every ratio of one against the other.

A ratio is what the README quotes: two methods timed side by side in one
run (kvarena against NumPy, the C loop, the read floor, another dtype or
thread count; cached against uncached). Absolute times move with the
machine; ratios should not. For each script whose JSON both directories
hold (``kernel``, ``generation``, ``llama``, ``update``), this prints every
ratio that moved by more than the tolerance between the runs, and how many
agreed.

    make bench && cp -r bench/results /tmp/run1
    make bench && python bench/compare.py /tmp/run1 bench/results

Exit status 0 whatever it finds: it reports, it does not judge.
"""

import argparse
import json
import math
import os
import sys


def kernel_ratios(d):
    """{ratio: value}, and {ratio: its case's host read rates, (slowest, fastest)}."""
    out, hosts = {}, {}

    def add(row, ratios):
        out.update(ratios)
        if "host_gb_s_range" in row:
            hosts.update(dict.fromkeys(ratios, tuple(row["host_gb_s_range"])))
    for r in d["decode"]:
        case = f"decode {r['B']} x {r['H']} x {r['S']}"
        add(r, {f"{case} 2thr/1thr": r["attend_2v1"], f"{case} numpy/kv": r["numpy_ratio"]})
        if "c_ratio" in r:
            add(r, {f"{case} C/kv": r["c_ratio"], f"{case} % floor": r["of_floor_pct"]})
    for r in d["dtypes"]:
        if "skipped" in r:
            continue
        case = f"{r['dtype']} {r['B']} x {r['H']} x {r['S']}"
        add(r, {f"{case} 2thr/1thr": r["attend_2v1"], f"{case} f32 kv/kv": r["f32_ratio"],
                f"{case} numpy f32/kv": r["numpy32_ratio"]})
    for r in d["prefill"]:
        case = f"prefill T={r['T']}"
        add(r, {f"{case} 2thr/1thr": r["attend_2v1"], f"{case} numpy/kv": r["numpy_ratio"]})
    if "repeated_ratio" in d.get("gqa", {}):
        add(d["gqa"], {"grouped-query repeated/grouped": d["gqa"]["repeated_ratio"]})
    return out, hosts


def generation_ratios(d):
    out = {}
    for r in d["rows"]:
        case = f"{r['config']} N={r['n_new']}"
        if "speedup" in r:
            out[f"{case} speedup"] = r["speedup"]
        if r.get("threads_ratio") is not None:
            out[f"{case} 2thr/1thr"] = r["threads_ratio"]
    return out, {}


def llama_ratios(d):
    out = {}
    for r in d["generation"]["rows"]:
        case = f"B={r['batch_size']} N={r['n_new']}"
        out[f"{case} kvarena/NumPy"] = r["kvarena_vs_numpy"]
        if "kvarena_vs_uncached" in r:
            out[f"{case} kvarena/uncached"] = r["kvarena_vs_uncached"]
    return out, {}


def update_ratios(d):
    out = {}
    for r in d["rows"]:
        case = f"B={r['B']} pos={r['seq_pos']}"
        out[f"{case} update/assign"] = r["update_over_assign"]
        if r.get("i8_over_f32") is not None:
            out[f"{case} int8/float32"] = r["i8_over_f32"]
    return out, {}


RATIOS = {"kernel": kernel_ratios, "generation": generation_ratios, "llama": llama_ratios,
          "update": update_ratios}


def load(directory, name):
    """``({ratio: value}, {ratio: host read rates})`` of one script's JSON (the
    second empty where the script records none); None when absent; the error's
    text when unreadable."""
    path = os.path.join(directory, f"{name}.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return RATIOS[name](json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{path}: unreadable ({type(exc).__name__}: {exc})"


def agree(x, y, tolerance):
    """Whether two positive, finite ratios are within ``tolerance`` of each other."""
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in (x, y))
    return ok and abs(y / x - 1) <= tolerance


def show(key, x, y, host_x=None, host_y=None):
    """One moved ratio's line; with the host read rates of its case in both runs."""
    change = f"x{y / x:.2f}" if agree(x, y, math.inf) else "not comparable"
    host = ""
    if host_x or host_y:        # a run made before the host column: '?'
        def rates(r):
            return "?" if r is None else "{:.0f}-{:.0f}".format(*r)
        host = f"  (host read {rates(host_x)} -> {rates(host_y)} GB/s)"
    return f"  {key:44s} {x:9.2f} {y:9.2f}  {change:>6s}{host}"


def compare(first, second, tolerance):
    """Lines of the report, and (agreed, compared) over every script."""
    lines, agreed, compared = [], 0, 0
    for name in RATIOS:
        a, b = load(first, name), load(second, name)
        unreadable = [x for x in (a, b) if isinstance(x, str)]
        if unreadable:
            lines += [f"{name}: {x}" for x in unreadable]
            continue
        if a is None or b is None:
            lines.append(f"{name}: not in both runs")
            continue
        (a, host_a), (b, host_b) = a, b
        common = [key for key in a if key in b]
        moved = [key for key in common if not agree(a[key], b[key], tolerance)]
        agreed += len(common) - len(moved)
        compared += len(common)
        alone = len(a) + len(b) - 2 * len(common)
        lines.append(f"{name}: {len(common) - len(moved)} of {len(common)} ratios within "
                     f"{tolerance:.0%}" + (f" ({alone} in one run only)" if alone else ""))
        lines += [show(key, a[key], b[key], host_a.get(key), host_b.get(key)) for key in moved]
    return lines, agreed, compared


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("first", help="a results directory (make bench writes bench/results)")
    parser.add_argument("second", help="another one")
    parser.add_argument("--tolerance", type=float, default=0.10,
                        help="relative change beyond which a ratio has moved (default 0.10)")
    args = parser.parse_args(argv)
    for directory in (args.first, args.second):
        if not os.path.isdir(directory):
            parser.error(f"{directory!r} is not a directory")
    lines, agreed, compared = compare(args.first, args.second, args.tolerance)
    print(f"{args.first} against {args.second} (moved: first, second, second / first)")
    print("\n".join(lines))
    print(f"all: {agreed} of {compared} ratios within {args.tolerance:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
