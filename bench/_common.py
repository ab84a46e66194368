"""Helpers shared by the bench scripts: timing, machine load, progress, the
run header, tables, output.

Timing is by medians: the machines these run on are shared and noisy, so a
single figure means little, and ratios measured side by side in one run are
what the tables are for. Each measurement also records how much CPU other
processes used while it ran (``MachineLoad``), so a figure taken on a busy
machine says so, and ``time_many`` re-takes rounds that were disturbed; and,
where asked, how fast the host let the process read memory
(``host_read_rate``), which no process count shows.
"""

import csv
import ctypes
import json
import os
import platform
import threading
import time

import numpy as np


def log(message):
    """One progress line, flushed at once (the runs are long)."""
    print(message, flush=True)


def median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def median_ratio(numerators, denominators):
    """The median over rounds of each round's ``numerator / denominator``.

    The methods of a round run seconds apart, the rounds up to minutes
    apart on a shared machine whose speed drifts: a ratio of two medians
    mixes rounds taken at different speeds, the median of per-round ratios
    does not. The two sequences hold one time per round, in round order.
    """
    return median([a / b for a, b in zip(numerators, denominators, strict=True)])


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


# -- how busy the rest of the machine is -------------------------------------

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100   # /proc counts in these
# a round is disturbed when other processes used more than this many cores
# during it, beyond the two clock ticks that reading /proc twice can be off by
DISTURBED_CORES = 0.25


def _cpu_ticks():
    """(busy ticks of the whole machine, ticks of this process), or None off Linux.

    Busy is user + nice + system + irq + softirq + steal from /proc/stat
    (steal: time the hypervisor gave to other machines). This process's
    ticks (utime + stime of all its threads, /proc/self/stat) include its
    BLAS and OpenMP workers, so what remains is other processes.
    """
    try:
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    busy = cpu[0] + cpu[1] + cpu[2] + sum(cpu[5:8])
    return busy, int(own[11]) + int(own[12])


class MachineLoad:
    """CPU used by other processes while a block runs, in cores.

    ``with MachineLoad() as load: ...`` then ``load.cores`` is the average
    number of cores other processes kept busy (0 on an idle machine, up to
    ``os.cpu_count()``), or None where /proc is missing. ``load.disturbed``
    says whether that exceeds ``DISTURBED_CORES`` by more than the clock
    tick resolution allows to be noise.
    """

    def __enter__(self):
        self._start = _cpu_ticks()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        end = _cpu_ticks()
        if self._start is None or end is None:
            self.cores, self.disturbed = None, False
            return False
        others = (end[0] - self._start[0]) - (end[1] - self._start[1])
        self.cores = max(0.0, others / TICK / self.seconds) if self.seconds > 0 else 0.0
        self.disturbed = (others - 2) / TICK > DISTURBED_CORES * self.seconds
        return False


def wait_for_quiet(max_wait, say=None, probe=0.5, every=8.0):
    """Wait up to ``max_wait`` seconds for other processes to leave the CPU.

    Returns as soon as a ``probe``-second window is undisturbed (at once
    on an idle machine, or off Linux); ``say(message)``, if given, hears
    every ``every`` seconds how long it has waited. Returns the seconds
    waited. On 2 cores a figure taken while another process holds one is
    not worth much: a 2-thread loop waits a scheduler time slice for its
    second thread (12 ms for a 16 us call, measured here), so waiting
    a little is cheaper than measuring badly.
    """
    start = last = time.perf_counter()
    while True:
        with MachineLoad() as load:
            time.sleep(probe)
        now = time.perf_counter()
        if not load.disturbed or now - start >= max_wait:
            return now - start
        if say is not None and now - last >= every:
            say(f"waiting for the machine to quiet down: others use {load.cores:.2f} cores "
                f"({now - start:.0f} of at most {max_wait:.0f} s)")
            last = now


def others_note(cores):
    """The load column's text: cores used by other processes, '!' when disturbed."""
    if cores is None:
        return "?"
    return f"{cores:.2f}" + ("!" if cores > DISTURBED_CORES else "")


# -- how fast the host lets this process read memory ---------------------------

# /proc/stat cannot see what slows a virtual machine's memory reads: other
# tenants' traffic on the host. On the 2-core EPYC VM these figures come
# from, the same C read loop over 768 MiB took 14.2 ms in one run and 25.5 ms
# in another twenty minutes later, with no other process on the machine. So
# each round of ``time_many(probe=True)`` first times one thread reading a
# buffer larger than that machine's last-level cache (32 MiB).
PROBE_BYTES = 64 << 20
_probe_buffer = None


def host_read_rate():
    """GB/s at which one thread of this process sums ``PROBE_BYTES`` of float32 just now.

    The buffer is allocated on the first call and kept for the process.
    """
    global _probe_buffer
    if _probe_buffer is None:
        _probe_buffer = np.ones(PROBE_BYTES // 4, dtype=np.float32)
    start = time.perf_counter()
    _probe_buffer.sum()
    return PROBE_BYTES / (time.perf_counter() - start) / 1e9


# a case's reads were slowed when its slowest round's rate is below this
# fraction of its fastest
HOST_SLOWED = 0.8


def host_note(rates):
    """The host column's text for a case's (slowest, fastest) read rates: 'lo-hi' GB/s,
    '!' when the slowest is more than ``1 - HOST_SLOWED`` (20%) below the fastest."""
    low, high = rates
    return f"{low:.0f}-{high:.0f}" + ("!" if low < HOST_SLOWED * high else "")


# -- timing ------------------------------------------------------------------

def time_many(fns, repeat=7, min_sample=0.005, warmup=0.1, settle=0.0, retries=None,
              probe=False):
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

    Each round (one sample of every function) is watched with
    ``MachineLoad``. A round during which other processes used the CPU is
    disturbed: it is taken again, up to ``retries`` more rounds in all
    (default ``repeat``), and the medians are over the undisturbed rounds
    when at least half of ``repeat`` are, over all rounds otherwise.

    With ``probe``, each round starts with ``host_read_rate``: how fast the
    host let this process read memory then, which /proc/stat cannot tell
    (it evicts the caches: only for callers that settle each method first).

    Returns
    -------
    dict: name -> {``median``, ``min`` (seconds per call), ``samples``
    (seconds per call, one per kept sample), ``loops`` (calls per sample),
    ``others`` (cores used by other processes over all rounds, None off
    Linux), ``disturbed`` (rounds disturbed), ``rounds`` (rounds taken),
    ``flagged`` (True when disturbed rounds had to be kept); with
    ``probe``, ``host_gb_s_samples`` (the read rate before each kept
    round, GB/s), ``host_gb_s`` (their median) and ``host_gb_s_range``
    (their smallest and largest)}
    """
    loops = {}
    for name, fn in fns.items():
        end = time.perf_counter() + warmup
        fn()
        while time.perf_counter() < end:
            fn()
        loops[name] = _loops_for(fn, min_sample)
    retries = repeat if retries is None else retries
    rounds = []                     # ({name: seconds per call}, disturbed, read rate)
    with MachineLoad() as overall:
        while True:
            clean = sum(not disturbed for _, disturbed, _ in rounds)
            if clean >= repeat or len(rounds) >= repeat + retries:
                break
            rate = host_read_rate() if probe else None
            sample = {}
            with MachineLoad() as load:
                for name, fn in fns.items():
                    n = loops[name]
                    end = time.perf_counter() + settle
                    fn()
                    while time.perf_counter() < end:
                        fn()
                    start = time.perf_counter()
                    for _ in range(n):
                        fn()
                    sample[name] = (time.perf_counter() - start) / n
            rounds.append((sample, load.disturbed, rate))
    kept = [r for r in rounds if not r[1]]
    flagged = len(kept) < (repeat + 1) // 2
    if flagged:
        kept = rounds
    disturbed = sum(d for _, d, _ in rounds)
    host = {}
    if probe:
        rates = [rate for _, _, rate in kept]
        host = {"host_gb_s_samples": rates, "host_gb_s": median(rates),
                "host_gb_s_range": [min(rates), max(rates)]}
    result = {}
    for name in fns:
        s = [sample[name] for sample, _, _ in kept]
        result[name] = {"median": median(s), "min": min(s), "samples": s, "loops": loops[name],
                        "others": overall.cores, "disturbed": disturbed,
                        "rounds": len(rounds), "flagged": flagged, **host}
    return result


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


def thread_pools():
    """The thread pools loaded in this process, from threadpoolctl, or None.

    One "api library: N" entry per pool (OpenBLAS, OpenMP, ...); None when
    threadpoolctl is not importable.
    """
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return {f"{p['user_api']} {p.get('internal_api', '')} "
            f"{os.path.basename(p.get('filepath', ''))}".strip(): p["num_threads"]
            for p in threadpool_info()}


def kernel_info():
    """``kvarena.kernel_info()`` (the compiled path in use), or "unknown" before it exists."""
    import kvarena

    fn = getattr(kvarena, "kernel_info", None)
    if fn is None:
        return "unknown"
    try:
        return fn()
    except Exception as exc:   # a header must not stop the bench
        return f"unknown ({type(exc).__name__}: {exc})"


def machine_load_now(seconds=0.5):
    """Cores used by other processes over the next ``seconds`` (None off Linux)."""
    with MachineLoad() as load:
        time.sleep(seconds)
    return load.cores


def header(extra=()):
    """Versions, machine, threading context and current load of this run, as a dict."""
    import kvarena

    try:
        import Cython        # a build requirement only: absent after `pip install .`
        cython = Cython.__version__
    except ImportError:
        cython = None
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cython": cython,
        "kvarena": kvarena.__version__,
        "kvarena_boundscheck": bool(getattr(kvarena._arena, "BOUNDSCHECK", False)),
        "kernel": kernel_info(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "blas_threads": blas_threads(),
        "thread_pools": thread_pools(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                            "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
                                            "GOMP_SPINCOUNT", "OPENBLAS_CORETYPE")
                if k in os.environ},
        "others_cores_at_start": machine_load_now(),
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
        elif key == "others_cores_at_start" and value is not None:
            value = f"{value:.2f} (cores used by other processes; a figure marked ! was " \
                    f"measured while others used more than {DISTURBED_CORES})"
        log(f"{key:<{width}}  {value}")
    log("")


# -- progress ------------------------------------------------------------------

class Progress:
    """Progress lines for one stage, with an estimate of the time left.

    ``step(label, weight)`` announces the next item of work; the estimate
    is the time per unit of weight so far times the weight left (weights
    need only be proportional to the expected time). While an item runs,
    a background thread prints a line whenever nothing has been printed
    for ``every`` seconds, so no stage is silent for long. Use as a
    context manager (the thread stops at exit).
    """

    def __init__(self, stage, total_weight, every=8.0):
        self.stage, self.total, self.every = stage, float(total_weight), every
        self.done = 0.0
        self.label, self.weight = None, 0.0
        self.t0 = self.item_t0 = self.last = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False

    def left(self):
        """Estimated seconds left in the stage, or None before any work is done.

        The time per unit of weight of the items done, times what is left of
        the running item (its weight less the time it has run, at least 0)
        and of the items after it.
        """
        if self.done <= 0:
            return None
        rate = (self.item_t0 - self.t0) / self.done
        running = max(0.0, rate * self.weight - (time.perf_counter() - self.item_t0))
        return running + rate * max(0.0, self.total - self.done - self.weight)

    def _eta(self):
        left = self.left()
        return "" if left is None else f", ~{_duration(left)} left"

    def log(self, message):
        self.last = time.perf_counter()
        log(f"[{self.stage}] {message}")

    def step(self, label, weight=1.0):
        """Finish the previous item, announce ``label``."""
        self.done += self.weight
        self.label, self.weight = label, float(weight)
        self.item_t0 = time.perf_counter()
        elapsed = self.item_t0 - self.t0
        self.log(f"{label} ({_duration(elapsed)} elapsed{self._eta()})")

    def _beat(self):
        while not self._stop.wait(1.0):
            now = time.perf_counter()
            if self.label is not None and now - self.last >= self.every:
                self.log(f"... {self.label}: running for {_duration(now - self.item_t0)}"
                         f"{self._eta()}")


def _duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min {seconds % 60:02d} s"


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


def write_results(out, name, result, text, rows=None, note=""):
    """Write ``name``.json (``result``), ``name``.csv (``rows``, if given) and
    ``name``.txt (``text``) into ``out``, then print the text and where it went."""
    path = os.path.join(out, f"{name}.json")
    write_json(path, result)
    also = [f"{name}.txt"]
    if rows is not None:
        write_csv(os.path.join(out, f"{name}.csv"), rows)
        also.insert(0, f"{name}.csv")
    with open(os.path.join(out, f"{name}.txt"), "w") as f:
        f.write(text)
    log("")
    log(text)
    log(f"results: {path} (and {', '.join(also)}) in {result['elapsed_s']:.0f} s{note}")


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
