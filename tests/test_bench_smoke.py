"""The bench scripts run end to end in their quick modes and write their results.

No timing is asserted: the machines are shared and noisy. What is checked
is that each script exits 0, writes its JSON with every section, and that
the contracts its tables report hold (same tokens cached and uncached,
every attention path agreeing with the kernel, resident memory matching
the prediction, get() copying nothing).
"""

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def run_script(name, out):
    """Run bench/<name>.py --quick into ``out``; its JSON, stdout and ``out``."""
    proc = subprocess.run([sys.executable, os.path.join(BENCH, f"{name}.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(out / f"{name}.json") as f:
        return json.load(f), proc.stdout, out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return run_script("sweep", tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    return run_script("memory", tmp_path_factory.mktemp("memory"))


def test_sweep_writes_every_section(sweep):
    result, stdout, out = sweep
    assert {"header", "generation", "kernel", "update"} <= set(result)
    for key in ("python", "numpy", "cython", "kvarena", "cpu", "dtype", "kernel_threads"):
        assert key in result["header"], key
    for section in ("generation", "kernel", "update"):
        assert result[section]["rows"], section
        assert (out / f"{section}.csv").exists()
    assert (out / "sweep.txt").exists()
    for title in ("a. Generation", "b. Kernel", "c. update()"):
        assert title in stdout


def test_sweep_reports_agreeing_results(sweep):
    result, _, _ = sweep
    for row in result["generation"]["rows"]:
        if row["uncached_s"] is not None:
            assert row["identical"], row
    for row in result["kernel"]["rows"]:
        # numpy, torch and KVCache.attend against the kernel, float32
        assert row["max_abs_diff"] < 1e-4, row
        assert row["floor_us"] > 0 and row["kernel_us"] > 0
    assert result["kernel"]["bandwidth"]["bytes_per_s"] > 0


def test_memory_writes_every_section(memory):
    result, stdout, out = memory
    assert {"header", "footprint", "lazy", "generation", "zero_copy"} <= set(result)
    assert (out / "memory.txt").exists()
    assert "1. Footprint" in stdout and "4. Zero copy" in stdout


def test_memory_matches_prediction(memory):
    result, _, _ = memory
    # eager arenas are resident right after construction; the bound is loose
    # because RSS moves in pages and the allocator keeps a little slack
    for row in result["footprint"]:
        assert abs(row["error_pct"]) < 10, row
    lazy = {row["lazy"]: row for row in result["lazy"]}
    assert lazy[True]["measured_mib"] < 0.1 * lazy[True]["predicted_mib"]
    assert lazy[True]["after_touch_mib"] > 0.9 * lazy[True]["predicted_mib"]
    get, copy = result["zero_copy"]
    assert get["traced_per_call"] < 0.01 * get["view_nbytes"], get
    # the contrast row shows that the measurement does see a copy
    assert copy["traced_per_call"] >= copy["view_nbytes"], copy


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    return run_script("ops", tmp_path_factory.mktemp("ops"))


def test_ops_times_every_operation_and_round_trips(ops):
    result, stdout, out = ops
    times = {row["op"]: row["median_ms"] for row in result["rows"]}
    for op in ("floor: copyto", "reorder: all rows", "crop(-1)", "copy_sequence(0, 1)",
               "save", "load", "open", "window: attend+evict"):
        assert times[op] > 0, op
    assert result["checks"]["load_bit_exact"], result["checks"]
    assert (out / "ops.csv").exists() and "Whole-arena operations" in stdout
