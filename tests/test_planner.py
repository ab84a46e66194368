"""kvarena.planner: footprints match what KVCache allocates; plans sit on the boundary."""

import dataclasses
import os
import re
import tracemalloc
from collections import Counter

import numpy as np
import pytest

from kvarena import KVCache
from kvarena import planner
from kvarena.planner import Footprint, available_memory, footprint, plan

DTYPES = [np.float16, np.float32, np.float64, np.int8]
# (batch_size, max_seq_len, num_layers, num_heads, head_dim): odd and prime
# sizes, so a swapped or dropped factor changes the product
SHAPES = [(1, 1, 1, 1, 1), (3, 7, 5, 3, 11), (5, 13, 2, 7, 3), (2, 101, 3, 1, 17)]
MODEL = (3, 5, 7)   # num_layers, num_heads, head_dim for the plan tests


def numpy_buffers_allocated(make):
    """Sizes of the NumPy data buffers allocated and still held after ``make()``, and its result."""
    # NumPy reports each data buffer to tracemalloc in its own domain with its
    # exact size; Python objects go to domain 0 and are left out here
    only_numpy = [tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot().filter_traces(only_numpy)
        result = make()
        after = tracemalloc.take_snapshot().filter_traces(only_numpy)
    finally:
        tracemalloc.stop()
    new = Counter(t.size for t in after.traces) - Counter(t.size for t in before.traces)
    return sorted(new.elements()), result


# -- footprint -----------------------------------------------------------------

def test_footprint_worked_by_hand():
    fp = footprint(2, 10, 3, 4, 8, dtype=np.float16)
    # arena: 3 layers x K,V x 2 rows x 4 heads x 10 positions x 8 dims x 2 bytes
    assert fp.arena_bytes == 3 * 2 * 2 * 4 * 10 * 8 * 2 == 7680
    # and 63 bytes of room in which the arena starts on a 64-byte boundary;
    # the kernel holds no buffer per cache
    assert fp.total_bytes == fp.arena_bytes + planner.ARENA_ALIGN - 1 == 7743
    assert (fp.batch_size, fp.max_seq_len, fp.num_layers, fp.num_heads, fp.head_dim,
            fp.dtype) == (2, 10, 3, 4, 8, "float16")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_footprint_is_what_kvcache_allocates(shape, dtype):
    fp = footprint(*shape, dtype=dtype)
    buffers, cache = numpy_buffers_allocated(lambda: KVCache(*shape, dtype=dtype, lazy=True))
    assert fp.arena_bytes == cache._arena.nbytes
    # the arena (an int8 one with its scales) is one NumPy buffer of exactly
    # the predicted size
    assert fp.total_bytes in buffers, (buffers, fp)
    buffers.remove(fp.total_bytes)
    # what remains is bookkeeping footprint leaves out: a few intp per row
    # (row lengths, offsets), nothing that grows with max_seq_len, layers or
    # heads. Allow 8 intp per row and 8 more; the cache holds one or two a row.
    # Counting Python objects too (all tracemalloc domains) would add 3-6 kB
    # that vary with the interpreter's free lists, so those are left out.
    intp = np.dtype(np.intp).itemsize
    assert sum(buffers) <= 8 * intp * (shape[0] + 1), (buffers, shape, dtype)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 2), (3, 7, 5, 3, 12), (2, 101, 3, 1, 18)])
def test_footprint_with_rope_is_what_kvcache_allocates(shape):
    fp = footprint(*shape, rope=True)
    buffers, cache = numpy_buffers_allocated(lambda: KVCache(*shape, rope_theta=1e4, lazy=True))
    # the arena's buffer, then the cos and sin tables: float32 (max_seq_len,
    # head_dim / 2) each
    room = planner.ARENA_ALIGN - 1
    for size in (fp.arena_bytes + room, fp.rope_bytes // 2, fp.rope_bytes // 2):
        assert size in buffers, (buffers, fp)
        buffers.remove(size)
    assert fp.total_bytes == fp.arena_bytes + room + fp.rope_bytes \
        == cache.get_memory_usage()["total_bytes"]
    intp = np.dtype(np.intp).itemsize
    assert sum(buffers) <= 8 * intp * (shape[0] + 1), (buffers, shape)


def test_footprint_with_rope_needs_an_even_head_dim():
    with pytest.raises(ValueError, match=r"^head_dim must be even with rope=True .*got 7$"):
        footprint(1, 8, 1, 1, 7, rope=True)
    with pytest.raises(TypeError, match="^rope must be True or False"):
        footprint(1, 8, 1, 1, 8, rope=1)


def test_footprint_normalises_and_freezes():
    fp = footprint(np.int64(2), np.int32(3), 1, 1, 1, dtype=">f8")
    assert type(fp.batch_size) is int and type(fp.max_seq_len) is int
    assert type(fp.total_bytes) is int
    assert fp.dtype == "float64"
    with pytest.raises(dataclasses.FrozenInstanceError):
        fp.total_bytes = 0


# -- plan ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("available", [10_000, 123_457, 9_999_991])
def test_plan_for_batch_size_is_the_longest_context_that_fits(dtype, available):
    fp = plan(*MODEL, dtype=dtype, batch_size=3, available_bytes=available)
    assert fp.batch_size == 3
    assert fp.total_bytes <= available
    assert footprint(3, fp.max_seq_len + 1, *MODEL, dtype=dtype).total_bytes > available
    assert fp == footprint(3, fp.max_seq_len, *MODEL, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("available", [10_000, 123_457, 9_999_991])
def test_plan_for_max_seq_len_is_the_largest_batch_that_fits(dtype, available):
    fp = plan(*MODEL, dtype=dtype, max_seq_len=4, available_bytes=available)
    assert fp.max_seq_len == 4
    assert fp.total_bytes <= available
    assert footprint(fp.batch_size + 1, 4, *MODEL, dtype=dtype).total_bytes > available
    assert fp == footprint(fp.batch_size, 4, *MODEL, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_plan_exact_budget_and_one_byte_less(dtype):
    exact = footprint(3, 10, *MODEL, dtype=dtype)
    budget = exact.total_bytes
    assert plan(*MODEL, dtype=dtype, batch_size=3, available_bytes=budget) == exact
    assert plan(*MODEL, dtype=dtype, max_seq_len=10, available_bytes=budget) == exact
    assert plan(*MODEL, dtype=dtype, batch_size=3, available_bytes=budget - 1).max_seq_len == 9
    assert plan(*MODEL, dtype=dtype, max_seq_len=10, available_bytes=budget - 1).batch_size == 2


def test_plan_arithmetic_is_exact_for_huge_budgets():
    # beyond 2**53 a float division would round; the boundary must still hold
    available = 2**70 + 12_345
    fp = plan(*MODEL, batch_size=3, available_bytes=available)
    assert fp.total_bytes <= available < footprint(3, fp.max_seq_len + 1, *MODEL).total_bytes


def test_plan_defaults_to_available_memory(monkeypatch):
    monkeypatch.setattr(planner, "available_memory", lambda: 123_457)
    assert (plan(*MODEL, batch_size=3)
            == plan(*MODEL, batch_size=3, available_bytes=123_457))


def test_plan_with_the_real_available_memory():
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    fp = plan(*MODEL, batch_size=1)
    assert 0 < fp.total_bytes <= total


# -- available_memory -------------------------------------------------------------

def physical_memory():
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_available_memory_is_positive_and_at_most_physical():
    assert 0 < available_memory() <= physical_memory()


def test_available_memory_reads_meminfo(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  2000 kB\nMemFree:  1000 kB\nMemAvailable:  1500 kB\n")
    monkeypatch.setattr(planner, "_MEMINFO", str(meminfo))
    assert available_memory() == 1500 * 1024


@pytest.mark.parametrize("meminfo_text", [None, "MemTotal:  2000 kB\nMemFree:  1000 kB\n"],
                         ids=["no-file", "no-MemAvailable"])
def test_available_memory_falls_back_to_sysconf(monkeypatch, tmp_path, meminfo_text):
    meminfo = tmp_path / "meminfo"
    if meminfo_text is not None:
        meminfo.write_text(meminfo_text)
    monkeypatch.setattr(planner, "_MEMINFO", str(meminfo))
    sysconf = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(planner.os, "sysconf", sysconf.__getitem__)
    assert available_memory() == 1000 * 4096


def test_available_memory_without_any_source(monkeypatch, tmp_path):
    monkeypatch.setattr(planner, "_MEMINFO", str(tmp_path / "missing"))

    def no_sysconf(name):
        raise ValueError(f"unrecognized configuration name {name!r}")

    monkeypatch.setattr(planner.os, "sysconf", no_sysconf)
    with pytest.raises(OSError, match="pass available_bytes explicitly"):
        available_memory()
    # an explicit budget needs neither source
    assert plan(*MODEL, batch_size=1, available_bytes=10_000).total_bytes <= 10_000


# -- bad input ---------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, {"batch_size": 2, "max_seq_len": 8}],
                         ids=["neither", "both"])
def test_plan_needs_exactly_one_of_batch_size_and_max_seq_len(kwargs):
    with pytest.raises(ValueError, match="exactly one of batch_size and max_seq_len"):
        plan(*MODEL, available_bytes=10_000, **kwargs)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"batch_size": 1.5}, TypeError, "batch_size must be an int; got 1.5"),
    ({"batch_size": True}, TypeError, "batch_size must be an int; got True"),
    ({"batch_size": 0}, ValueError, "batch_size must be a positive int; got 0"),
    ({"max_seq_len": -3}, ValueError, "max_seq_len must be a positive int; got -3"),
    ({"max_seq_len": "8"}, TypeError, "max_seq_len must be an int; got '8'"),
    ({"batch_size": 1, "available_bytes": 0}, ValueError,
     "available_bytes must be a positive int; got 0"),
    ({"batch_size": 1, "available_bytes": -1}, ValueError,
     "available_bytes must be a positive int; got -1"),
    ({"batch_size": 1, "available_bytes": 1e6}, TypeError,
     "available_bytes must be an int; got 1000000.0"),
    ({"batch_size": 1, "available_bytes": False}, TypeError,
     "available_bytes must be an int; got False"),
    ({"batch_size": 1, "dtype": np.int32}, TypeError, "dtype must be one of .*; got int32"),
    ({"batch_size": 1, "dtype": "complex64"}, TypeError, "dtype must be one of .*; got complex64"),
    ({"batch_size": 1, "dtype": None}, TypeError, "dtype must be one of .*; got None"),
])
def test_plan_rejects_bad_arguments(kwargs, error, message):
    kwargs = {"available_bytes": 10_000, **kwargs}
    with pytest.raises(error, match=message):
        plan(*MODEL, **kwargs)


@pytest.mark.parametrize("model, error, message", [
    ((0, 5, 7), ValueError, "num_layers must be a positive int; got 0"),
    ((3, -5, 7), ValueError, "num_heads must be a positive int; got -5"),
    ((3, 5, 7.0), TypeError, "head_dim must be an int; got 7.0"),
    ((3, np.True_, 7), TypeError, "num_heads must be an int; got np.True_"),
])
def test_plan_rejects_bad_model_sizes(model, error, message):
    with pytest.raises(error, match=re.escape(message)):
        plan(*model, batch_size=1, available_bytes=10_000)


@pytest.mark.parametrize("shape, dtype, error, message", [
    ((0, 1, 1, 1, 1), np.float32, ValueError, "batch_size must be a positive int; got 0"),
    ((1, 2.0, 1, 1, 1), np.float32, TypeError, "max_seq_len must be an int; got 2.0"),
    ((1, 1, True, 1, 1), np.float32, TypeError, "num_layers must be an int; got True"),
    ((1, 1, 1, 1, -1), np.float32, ValueError, "head_dim must be a positive int; got -1"),
    ((1, 1, 1, 1, 1), np.int16, TypeError, "dtype must be one of .*; got int16"),
])
def test_footprint_rejects_bad_arguments(shape, dtype, error, message):
    with pytest.raises(error, match=message):
        footprint(*shape, dtype=dtype)


def test_plan_budget_too_small_for_one_position():
    # one position of 3 rows: 3 rows x 5 heads x 3 layers x K,V x 7 dims x 4 bytes
    # = 3 * 5 * 168 = 2520 bytes, and 63 bytes of room to align the arena
    assert footprint(3, 1, *MODEL).total_bytes == 2520 + 63
    assert plan(*MODEL, batch_size=3, available_bytes=2583).max_seq_len == 1
    with pytest.raises(ValueError, match=re.escape(
            "available_bytes=2582 cannot hold one position for batch_size=3: "
            "that needs 2583 bytes")):
        plan(*MODEL, batch_size=3, available_bytes=2582)


def test_plan_budget_too_small_for_one_row():
    # one row of 10 positions, float64: 10 x 5 heads x 3 layers x K,V x 7 dims x 8 bytes = 16800
    # (and 63 bytes of room to align the arena)
    assert footprint(1, 10, *MODEL, dtype=np.float64).total_bytes == 16800 + 63
    with pytest.raises(ValueError, match=re.escape(
            "available_bytes=16862 cannot hold one row for max_seq_len=10: "
            "that needs 16863 bytes")):
        plan(*MODEL, dtype=np.float64, max_seq_len=10, available_bytes=16862)


def test_footprint_type_is_exported():
    assert isinstance(footprint(1, 1, 1, 1, 1), Footprint)
