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
``forced_prefetch()`` turns asking for the next block's rows ahead on or
off (on by default where it was measured to help: Intel cores, in calls
that read at least ``kernel_info()["prefetch_from_bytes"]``, 8 MiB, of keys
and values; see pyx/kernel.h's kv_ahead).
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
        ``boundscheck``: whether this is the bounds-checked debug build.
    """
    return {
        "isa": _ISA_NAMES[_isa],
        "best_isa": _ISA_NAMES[_arena.BEST_ISA],
        "isas": _ISA_NAMES[:_arena.BEST_ISA + 1],
        "threads": "kvarena pool (pthreads, passive wait)",
        "prefetch": _arena.prefetch_from() >= 0,
        "prefetch_from_bytes": _arena.prefetch_from(),
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


@contextlib.contextmanager
def forced_prefetch(on):
    """Ask (``on`` true) in every call, or in none, for the next block ahead inside the block.

    For tests and benchmarks: every cache in the process is affected. A
    call that asks reads blocks of 32 rows (else up to 256), so the last
    bits of its results can differ; both are held to the reference.
    """
    saved = _arena.prefetch_from()
    _arena.set_prefetch_from(0 if on else -1)
    try:
        yield
    finally:
        _arena.set_prefetch_from(saved)
