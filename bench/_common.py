"""Helpers shared by the bench scripts: timing, the run header, tables, output.

Timing is by medians: the machines these run on are shared and noisy, so a
single figure means little, and ratios measured side by side in one run are
what the tables are for.
"""

import csv
import ctypes
import json
import os
import platform
import time

import numpy as np


def log(message):
    """One progress line, flushed at once (the runs are long)."""
    print(message, flush=True)


def median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def _loops_for(fn, min_sample):
    """Calls of ``fn`` per sample so that one sample lasts about ``min_sample`` s."""
    loops = 1
    while True:
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_sample or loops >= 1 << 20:
            return loops
        loops *= 2 if elapsed > min_sample / 10 else 10


def time_many(fns, repeat=7, min_sample=0.005, warmup=0.1, settle=0.0):
    """Median seconds per call of each ``fns[name]()``, sampled in turn.

    Each function is first called for ``warmup`` seconds (at least once)
    and those calls are dropped: the first call pays for page faults and
    thread start-up. The ``repeat`` samples then go round-robin over the
    functions, so that a burst of load from elsewhere on the machine falls
    on all of them alike rather than on whichever was running at the time.
    Before each sample its function is called, untimed, for ``settle``
    seconds (at least once): the thread pool of the function sampled just
    before may still be spinning on the cores (OpenBLAS workers keep busy
    for ~0.1-0.2 s after a threaded call) and would otherwise be charged to
    this one. Each sample loops its function enough times to last about
    ``min_sample`` seconds, so that microsecond calls are not lost in the
    timer's resolution.

    Returns
    -------
    dict: name -> {``median``, ``min`` (seconds per call), ``samples``
    (seconds per call, one per sample), ``loops`` (calls per sample)}
    """
    loops = {}
    for name, fn in fns.items():
        end = time.perf_counter() + warmup
        fn()
        while time.perf_counter() < end:
            fn()
        loops[name] = _loops_for(fn, min_sample)
    samples = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            n = loops[name]
            end = time.perf_counter() + settle
            fn()
            while time.perf_counter() < end:
                fn()
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: {"median": median(s), "min": min(s), "samples": s, "loops": loops[name]}
            for name, s in samples.items()}


def time_call(fn, repeat=7, min_sample=0.005, warmup=0.1):
    """``time_many`` for one function: its dict of median, min, samples, loops."""
    return time_many({"fn": fn}, repeat, min_sample, warmup)["fn"]


# -- the run header --------------------------------------------------------

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def blas_threads():
    """OpenBLAS's thread count, read from the library NumPy loaded, or None.

    Best effort: looks for an openblas shared object among the process's
    mappings and asks it; any failure gives None.
    """
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                     "scipy_openblas_get_num_threads", "openblas_get_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_int
                return int(fn())
    return None


def header(extra=()):
    """Versions, machine and threading context of this run, as a dict."""
    import Cython

    import kvarena

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cython": Cython.__version__,
        "kvarena": kvarena.__version__,
        "kvarena_boundscheck": bool(kvarena._arena.BOUNDSCHECK),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "blas_threads": blas_threads(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                            "MKL_NUM_THREADS", "OMP_WAIT_POLICY")
                if k in os.environ},
    }
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    try:
        import matplotlib
        info["matplotlib"] = matplotlib.__version__
    except ImportError:
        info["matplotlib"] = None
    info.update(extra)
    return info


def print_header(title, info):
    log(title)
    log("=" * len(title))
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "(none set)"
        log(f"{key:<{width}}  {value}")
    log("")


# -- tables and files ------------------------------------------------------

def fmt(value, spec):
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec)


def table(rows, columns, title=None, notes=()):
    """Plain-text table of ``rows`` (dicts); ``columns`` is [(key, heading, format)]."""
    cells = [[fmt(row.get(key), spec) for key, _, spec in columns] for row in rows]
    heads = [heading for _, heading, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    lines = []
    if title:
        lines += [title, ""]
    lines.append("  ".join(h.rjust(w) for h, w in zip(heads, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for c in cells:
        lines.append("  ".join(v.rjust(w) for v, w in zip(c, widths)))
    for note in notes:
        lines.append(note)
    return "\n".join(lines) + "\n"


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=_jsonable)
        f.write("\n")


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_csv(path, rows):
    """``rows`` (dicts of scalars) as CSV; list-valued fields are left out."""
    if not rows:
        return
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def results_dir(path):
    os.makedirs(path, exist_ok=True)
    return path


def default_results_dir():
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
