"""What does writing one token cost, and does it depend on the position?

``KVCache.update`` of one new token (T = 1) at the start, the middle and
the end of the cache, next to the two bare slice assignments it amounts to
(``layer[0|1, :, :, pos:pos+1] = k, v``, no checks) and ``get`` (two
read-only views). All positions and calls are sampled in turn (medians of
rounds, see ``_common.time_many``); the cost should be flat in the position.
Beside it, the same ``update`` into an int8 cache, which quantizes the
token (one scale per vector) on the way in: issue 12 allows it at most
twice float32's cost.

    python bench/update.py [--quick] [--out DIR]
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (Progress, default_results_dir, header, median_ratio,  # noqa: E402
                     others_note, print_header, results_dir, table, time_many, write_results)

import kvarena  # noqa: E402

NUM_LAYERS, HEAD_DIM = 4, 64


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (seconds)")
    parser.add_argument("--out", default=default_results_dir(),
                        help="directory for update.json, .csv, .txt (default: bench/results)")
    return parser.parse_args(argv)


def bench_shape(B, H, max_seq_len, repeat, rng):
    k = rng.standard_normal((B, H, 1, HEAD_DIM), dtype=np.float32)
    v = rng.standard_normal((B, H, 1, HEAD_DIM), dtype=np.float32)
    layer = NUM_LAYERS - 1
    positions = (0, max_seq_len // 2, max_seq_len - 1)
    # one cache per position, so that every position is sampled in turn
    caches, int8_caches = {}, {}
    for pos in positions:
        caches[pos] = kvarena.KVCache(B, max_seq_len, NUM_LAYERS, H, HEAD_DIM)
        int8_caches[pos] = kvarena.KVCache(B, max_seq_len, NUM_LAYERS, H, HEAD_DIM,
                                           dtype=np.int8)
        if pos:
            caches[pos].advance(pos)
            int8_caches[pos].advance(pos)
    # a writable layer of the same shape for the bare assignments
    # (the cache's own arena is read-only from outside)
    plain = np.zeros(caches[0].arena.shape[1:], dtype=np.float32)   # (2, B, H, S, D)

    def calls(cache, int8_cache, pos):
        def assign():
            # what update() does, without its checks: two slice assignments
            plain[0, :, :, pos:pos + 1] = k
            plain[1, :, :, pos:pos + 1] = v
        return {f"update@{pos}": lambda: cache.update(layer, k, v),
                f"update_i8@{pos}": lambda: int8_cache.update(layer, k, v),
                f"assign@{pos}": assign,
                f"get@{pos}": lambda: cache.get(layer)}
    fns = {}
    for pos in positions:
        fns.update(calls(caches[pos], int8_caches[pos], pos))
    t = time_many(fns, repeat=repeat)
    rows = []
    for pos in positions:
        row = {"B": B, "H": H, "D": HEAD_DIM, "max_seq_len": max_seq_len,
               "num_layers": NUM_LAYERS, "seq_pos": pos,
               "update_us": t[f"update@{pos}"]["median"] * 1e6,
               "assign_us": t[f"assign@{pos}"]["median"] * 1e6,
               "get_us": t[f"get@{pos}"]["median"] * 1e6,
               "update_i8_us": t[f"update_i8@{pos}"]["median"] * 1e6,
               "others": t[f"update@{pos}"]["others"]}
        samples = {name: t[f"{name}@{pos}"]["samples"]
                   for name in ("update", "update_i8", "assign")}
        row["update_over_assign"] = median_ratio(samples["update"], samples["assign"])
        row["i8_over_f32"] = median_ratio(samples["update_i8"], samples["update"])
        rows.append(row)
    return rows


def update_table(result):
    columns = [("B", "B", "d"), ("H", "H", "d"), ("max_seq_len", "max_seq_len", "d"),
               ("seq_pos", "seq_pos", "d"), ("update_us", "update us", ".2f"),
               ("assign_us", "slice assign us", ".2f"),
               ("update_over_assign", "update/assign", ".2f"), ("get_us", "get us", ".2f"),
               ("update_i8_us", "int8 update us", ".2f"), ("i8_over_f32", "int8/float32", ".2f"),
               ("others_txt", "others", "")]
    rows = [dict(r, others_txt=others_note(r["others"])) for r in result["rows"]]
    notes = [f"one token (T=1), D={HEAD_DIM}, float32, {NUM_LAYERS} layers; per-call medians of "
             f"{result['repeat']} rounds, all positions and calls sampled in turn",
             "slice assign = layer[0|1, :, :, pos:pos+1] = k, v into a writable array of one "
             "layer's shape, no checks; "
             "update = KVCache.update (checks, then the Cython block copy)",
             "get = KVCache.get (two read-only views); others = cores used by other processes, "
             "! = disturbed; update/assign and int8/float32 are medians over rounds of each "
             "round's ratio",
             "int8 update = KVCache.update on an int8 cache (checks, conversion to float32, "
             "compiled quantization: int8 values and one scale per vector); int8/float32 = "
             "its time over float32 update's (issue 12's target: <= 2)"]
    return table(rows, columns, "update(): the cost of writing one token", notes)


def main(argv=None):
    args = parse_args(argv)
    out = results_dir(args.out)
    max_seq_len = 1024 if args.quick else 8192
    shapes = [(1, 12)] if args.quick else [(1, 12), (8, 12)]
    repeat = 3 if args.quick else 9
    info = header({"dtype": "float32 (and int8 for the int8 update column)",
                   "mode": "quick" if args.quick else "full"})
    print_header("kvarena update(): writing one token", info)
    started = time.perf_counter()
    rng = np.random.default_rng(1)
    rows = []
    with Progress("update", len(shapes)) as progress:
        for B, H in shapes:
            progress.step(f"B={B} H={H} max_seq_len={max_seq_len}")
            rows += bench_shape(B, H, max_seq_len, repeat, rng)
            for r in rows[-3:]:
                progress.log(f"B={B} H={H} seq_pos={r['seq_pos']}: update {r['update_us']:.2f} us, "
                             f"slice assignment {r['assign_us']:.2f} us, get {r['get_us']:.2f} us, "
                             f"int8 update {r['update_i8_us']:.2f} us")
    result = {"header": info, "repeat": repeat, "rows": rows,
              "elapsed_s": time.perf_counter() - started}
    write_results(out, "update", result, update_table(result), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
