"""Which compiled attention path runs: the one place that decides it.

The kernel (pyx/kernel.h) is compiled for several instruction sets and
picks the widest the CPU has; every storage dtype has a compiled path:

    storage     computed in   queries and outputs
    float16     float32       float32 or float64 (q's dtype)
    float32     float32       float32 or float64 (q's dtype)
    float64     float64       float32 or float64 (q's dtype)
    int8        float32       float32 or float64 (q's dtype); rows dequantized in registers

``kernel_info()`` says what runs here; ``forced_isa()`` pins a narrower
instruction set, so that the tests exercise every path on one machine, and
``forced_reads()`` how the rows are read. By default, where it was measured
to help (Intel cores), calls that read at least
``kernel_info()["prefetch_from_bytes"]`` (8 MiB) of keys and values ask for
each next block ahead (pyx/kernel.h's kv_ahead), and those that read at
least ``kernel_info()["stream_from_bytes"]`` (128 MiB), with at most two
queries per K/V row and float32 or float64 storage, stream instead
(kv_stream_from); calls below ``prefetch_from_bytes``, and every call
elsewhere, read plainly.
"""

import contextlib

import numpy as np

from kvarena import _arena

_ISA_NAMES = _arena.ISA_NAMES
_isa = _arena.BEST_ISA          # what KVCache.attend runs; forced_isa changes it


def compute_dtype(storage):
    """The dtype the kernel computes in for an arena of ``storage`` dtype."""
    return np.dtype(np.float64 if storage == np.float64 else np.float32)


def current_isa():
    """Index into ``kernel_info()["isas"]`` of the instruction set in use."""
    return _isa


def kernel_info():
    """What the attention kernel runs on this machine.

    Returns
    -------
    dict
        ``isa``: the instruction set in use (``"avx512"``, ``"avx2"`` or
        ``"baseline"``); ``best_isa``: the widest this CPU runs; ``isas``:
        every one it can run, narrowest first; ``threads``: how the kernel
        spreads work (its own pool; see ``KVCache(num_threads=...)``);
        ``prefetch``: whether the kernel asks for each next block of K
        and V rows while it computes one (software prefetch), in calls
        that read at least ``prefetch_from_bytes`` of K and V;
        ``stream_from_bytes``: calls that read at least this many, with
        at most two queries per K/V row and float32 or float64 storage
        (rows not converted as read), instead stream: they leave the
        rows to the CPU's own prefetchers, read with 256-bit loads (the
        AVX2 body on an AVX-512 CPU), keys and values in step (-1: none);
        ``boundscheck``: whether this is the bounds-checked debug build.
    """
    ask_from, stream_from = _arena.read_bounds()
    return {
        "isa": _ISA_NAMES[_isa],
        "best_isa": _ISA_NAMES[_arena.BEST_ISA],
        "isas": _ISA_NAMES[:_arena.BEST_ISA + 1],
        "threads": "kvarena pool (pthreads, passive wait)",
        "prefetch": ask_from >= 0,
        "prefetch_from_bytes": ask_from,
        "stream_from_bytes": stream_from,
        "boundscheck": bool(_arena.BOUNDSCHECK),
    }


@contextlib.contextmanager
def forced_isa(name):
    """Run the kernel on instruction set ``name`` inside the ``with`` block.

    For tests and benchmarks: every cache in the process is affected.

    Raises
    ------
    ValueError
        ``name`` is not one this CPU runs (see ``kernel_info()["isas"]``).
    """
    global _isa
    isas = kernel_info()["isas"]
    if name not in isas:
        raise ValueError(f"name must be one of {isas} (the instruction sets this CPU "
                         f"runs); got {name!r}")
    saved, _isa = _isa, _ISA_NAMES.index(name)
    try:
        yield
    finally:
        _isa = saved


#: How a call reads its rows, for forced_reads: as planned by its size (kernel.h's kv_attend)
READS = ("plain", "ask", "stream")


@contextlib.contextmanager
def forced_reads(how):
    """Read the rows of every call inside the ``with`` block as ``how`` says.

    ``"plain"``: blocks of up to 256 rows, the CPU's prefetchers left to
    themselves; ``"ask"``: blocks of 32 rows, each next one asked for ahead
    (software prefetch); ``"stream"``: float32 and float64 calls with at
    most two queries per K/V row stream (the AVX2 body at most, keys and
    values in step), the others read plainly. For tests and benchmarks:
    every cache in the process is affected. The ways sum in other orders,
    so the last bits of their results can differ; each is held to the
    reference.

    Raises
    ------
    ValueError
        ``how`` is not one of ``READS``.
    """
    if how not in READS:
        raise ValueError(f"how must be one of {READS}; got {how!r}")
    saved = _arena.read_bounds()
    _arena.set_read_bounds(0 if how == "ask" else -1, 0 if how == "stream" else -1)
    try:
        yield
    finally:
        _arena.set_read_bounds(*saved)
