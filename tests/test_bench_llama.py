"""bench/llama.py runs end to end in its quick mode; its three generators agree.

No timing is asserted. Needs grouped-query KVCache.attend (the model has
6 query heads over 2 K/V heads).
"""

import json
import os
import statistics
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "llama.py")


def test_llama_bench_quick_gives_the_same_tokens_three_ways(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(tmp_path / "llama.json") as f:
        result = json.load(f)
    assert result["header"]["model"]["n_kv_heads"] == 2
    rows = result["generation"]["rows"]
    assert [row["batch_size"] for row in rows] == [1, 2]
    for row in rows:
        assert row["identical"], row
        assert row["uncached_tok_s"] > 0 and row["numpy_tok_s"] > 0 and row["kvarena_tok_s"] > 0
        # the ratio is taken round by round (the median of per-round ratios)
        per_round = sorted(a / b for a, b in zip(row["numpy_samples_s"], row["kvarena_samples_s"]))
        assert row["kvarena_vs_numpy"] == pytest.approx(statistics.median(per_round), rel=1e-12)
    assert "Greedy generation, tokens per second" in proc.stdout
    assert (tmp_path / "llama.csv").exists()
    assert (tmp_path / "llama.txt").read_text().startswith("Greedy generation, tokens per second")
