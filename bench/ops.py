"""Cost of the cache's whole-arena operations, against the cost of touching every byte once.

On one fully used float32 arena (every row holds max_seq_len positions
of random data; 256 MiB: B=4, L=8, H=8, S=2048, D=64; 16 MiB, S=128,
with --quick) this times:

- floor: ``np.copyto`` of the whole arena into a preallocated buffer, the
  cost of reading and writing every byte once; ``arena.copy()`` adds a
  fresh allocation (page faults). Every other operation is also given as a
  multiple of the floor;
- reorder: a permutation of all rows, the beam-search typical case of one
  row replaced by a copy of another (``[0, 0, 2, 3]``), and the identity.
  Moved rows go through a temporary, so expect ~2x the floor for the moved
  share of the arena, and the identity to cost only its validation;
- crop(-1) and crop(S//2): bookkeeping only, microseconds whatever the
  arena size;
- copy_sequence of a full row (1/B of the arena);
- save to a temporary directory and load back (MB/s of the payload, the
  committed positions), and load of a half-full cache, whose file holds
  only the committed half; the time also pays for a new arena (zeroed in
  full) and the crc32;
- KVCache.open of a file-backed cache (``KVCache(..., path=...)``) of the
  same size and of one 1/16 the size: it maps the file and reads only its
  header, so expect well under a millisecond to a few, the same for both
  sizes, and nothing of the arena resident until it is touched;
- sliding-window eviction: ``attend`` at one layer, T=1, on a full cache
  with ``n_sink=4`` (each step first evicts the oldest window position of
  every row: the row's ring turns, nothing moves), then ``advance(1)``,
  against the same attend on a cache without a window holding S-1
  positions (the same S positions attended). The difference is the
  eviction, expected to be ~0 (a few microseconds of bookkeeping)
  whatever the window's size; ``bench/streaming.py`` compares windows of
  64 and 16,384 positions.

Times are medians of repeated samples (9, 3 with --quick), all operations
sampled round-robin so that load from elsewhere on the machine falls on
all alike; multiples of the floor are ratios of medians from this run.
Temporary files are removed at the end.

    python bench/ops.py [--quick] [--out DIR]
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (Progress, default_results_dir, header, log, others_note,  # noqa: E402
                     print_header, results_dir, table, time_many, write_csv, write_json)

import kvarena  # noqa: E402

MIB = 2 ** 20
DTYPE = np.float32
N_SINK = 4
# (batch_size, max_seq_len, num_layers, num_heads, head_dim)
SHAPES = {"full": (4, 2048, 8, 8, 64),    # 8*2*4*8*2048*64*4 B = 256 MiB
          "quick": (4, 128, 8, 8, 64)}    # 16 MiB
SMALL_FACTOR = 16                          # the open() control: 1/16 the arena


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a 16 MiB arena and 3 samples (a smoke run of a few seconds)")
    parser.add_argument("--out", default=default_results_dir(),
                        help="directory for ops.json and ops.csv (default: bench/results)")
    return parser.parse_args(argv)


# -- caches ----------------------------------------------------------------------

def filled(shape, rng, length=None, **kwargs):
    """A KVCache of ``shape`` with random data everywhere, ``length`` (default all) committed."""
    B, S, L, H, D = shape
    cache = kvarena.KVCache(B, S, L, H, D, dtype=DTYPE, **kwargs)
    rng.standard_normal(out=cache._arena, dtype=np.float32)
    cache.seq_pos = S if length is None else length
    return cache


def make_mapped(path, shape, rng):
    """Create the file-backed cache at ``path``, full of random data, and close it."""
    filled(shape, rng, path=path)   # dropped at once: unmapped, the data stays in the file


def resident_after_open(path, layer_bytes):
    """Resident arena bytes of a fresh ``KVCache.open``, then after reading layer 0."""
    cache = kvarena.KVCache.open(path)
    opened = cache.get_memory_usage()["resident_bytes"]
    float(cache.arena[0].sum())     # touch layer 0: its pages come from the file
    touched = cache.get_memory_usage()["resident_bytes"]
    del cache
    return {"resident_after_open": opened, "resident_after_layer0": touched,
            "layer_bytes": layer_bytes}


def check_snapshots(cache, full_path, half_path):
    """Loads are bit-exact: the full snapshot, and the committed half of the half one."""
    S = cache.max_seq_len
    full = kvarena.KVCache.load(full_path)
    half = kvarena.KVCache.load(half_path)
    ok_full = np.array_equal(full._arena, cache._arena) and full.seq_pos == S
    ok_half = (np.array_equal(half._arena[..., :S // 2, :], cache._arena[..., :S // 2, :])
               and half.seq_pos == S // 2 and not half._arena[..., S // 2:, :].any())
    return bool(ok_full and ok_half)


# -- the operations ------------------------------------------------------------------

def operations(shape, tmp, rng):
    """Everything to time: name -> (function, bytes it moves or None, detail), and checks."""
    B, S, L, H, D = shape
    arena_bytes = 2 * B * S * L * H * D * np.dtype(DTYPE).itemsize
    row_bytes = arena_bytes // B
    main = filled(shape, rng)
    floor_buffer = np.empty_like(main._arena)
    floor_buffer.fill(0)                       # touch every page now
    crops = filled(shape, rng)
    stream = filled(shape, rng, n_sink=N_SINK)
    plain = filled(shape, rng, length=S - 1)
    q, k, v = (rng.standard_normal((B, H, 1, D), dtype=np.float32) for _ in range(3))

    snap, half_snap = os.path.join(tmp, "full.kvasnap"), os.path.join(tmp, "half.kvasnap")
    main.crop(S // 2)
    main.save(half_snap)
    main.seq_pos = S                           # the data past S//2 was never touched
    main.save(snap)
    checks = {"load_bit_exact": check_snapshots(main, snap, half_snap)}
    small = (B, S // SMALL_FACTOR, L, H, D)
    mapped, small_mapped = os.path.join(tmp, "full.kvammap"), os.path.join(tmp, "small.kvammap")
    make_mapped(mapped, shape, rng)
    make_mapped(small_mapped, small, rng)
    residency = resident_after_open(mapped, arena_bytes // L)

    def crop_one():
        if crops.seq_pos <= 1:                 # once per S-1 calls: refill, bookkeeping too
            crops.seq_pos = S
        crops.crop(-1)

    def window_step():
        stream.attend(0, q, k, v)              # evicts one position of every row, all layers
        stream.advance(1)

    perm = np.roll(np.arange(B), 1)            # every row moves
    one = np.arange(B)
    one[1] = 0                                 # row 1 becomes a copy of row 0
    identity = np.arange(B)
    ops = {
        "floor: copyto": (lambda: np.copyto(floor_buffer, main._arena), arena_bytes, ""),
        "arena.copy()": (lambda: main._arena.copy(), arena_bytes, "allocates"),
        "reorder: all rows": (lambda: main.reorder(perm), arena_bytes, f"beam_idx {perm.tolist()}"),
        "reorder: 1 row": (lambda: main.reorder(one), row_bytes, f"beam_idx {one.tolist()}"),
        "reorder: identity": (lambda: main.reorder(identity), None, "nothing moves"),
        "crop(-1)": (crop_one, None, ""),
        "crop(S//2)": (lambda: crops.crop(S // 2), None, ""),
        "copy_sequence(0, 1)": (lambda: main.copy_sequence(0, 1), row_bytes, "a full row"),
        "save": (lambda: main.save(snap), arena_bytes,
                 f"file {os.path.getsize(snap) / MIB:.1f} MiB"),
        "load": (lambda: kvarena.KVCache.load(snap), arena_bytes,
                 f"file {os.path.getsize(snap) / MIB:.1f} MiB"),
        "load: half full": (lambda: kvarena.KVCache.load(half_snap), arena_bytes // 2,
                            f"file {os.path.getsize(half_snap) / MIB:.1f} MiB"),
        "open": (lambda: kvarena.KVCache.open(mapped), None,
                 f"resident {residency['resident_after_open'] / MIB:.1f} MiB after open"),
        f"open: 1/{SMALL_FACTOR} size": (lambda: kvarena.KVCache.open(small_mapped), None,
                                         f"{arena_bytes / SMALL_FACTOR / MIB:.1f} MiB arena"),
        "window: attend+evict": (window_step, None, f"n_sink={N_SINK}, full"),
        "no window: attend": (lambda: plain.attend(0, q, k, v), None, f"seq_pos={S - 1}"),
    }
    checks.update(residency)
    return ops, checks, arena_bytes


def measure(shape, repeat, warmup, tmp):
    rng = np.random.default_rng(0)
    log(f"[ops] building the caches and files in {tmp}")
    ops, checks, arena_bytes = operations(shape, tmp, rng)
    log(f"[ops] load bit-exact: {checks['load_bit_exact']}; resident after open: "
        f"{checks['resident_after_open']} B, after reading layer 0: "
        f"{checks['resident_after_layer0']} B (layer = {checks['layer_bytes']} B)")
    # one stage, timed as a whole: Progress's heartbeat keeps it from going silent
    with Progress("ops", 1) as progress:
        progress.step(f"timing {len(ops)} operations, {repeat} samples each, round-robin")
        timed = time_many({name: fn for name, (fn, _, _) in ops.items()},
                          repeat=repeat, warmup=warmup)
    floor = timed["floor: copyto"]["median"]
    rows = []
    for name, (_, nbytes, detail) in ops.items():
        t = timed[name]
        rows.append({"op": name, "mib": None if nbytes is None else nbytes / MIB,
                     "median_ms": t["median"] * 1e3, "min_ms": t["min"] * 1e3,
                     "mb_s": None if nbytes is None else nbytes / t["median"] / 1e6,
                     "x_floor": t["median"] / floor, "loops": t["loops"], "detail": detail,
                     "samples_ms": [s * 1e3 for s in t["samples"]]})
    by_name = {r["op"]: r for r in rows}
    evict_ms = by_name["window: attend+evict"]["median_ms"] - by_name["no window: attend"]["median_ms"]
    rows.append({"op": "window: difference", "mib": None, "median_ms": evict_ms, "min_ms": None,
                 "mb_s": None, "x_floor": evict_ms / (floor * 1e3), "loops": None,
                 "detail": "attend+evict - attend", "samples_ms": []})
    load = {k: timed["floor: copyto"][k] for k in ("others", "disturbed", "rounds", "flagged")}
    return {"arena_bytes": arena_bytes, "checks": checks, "rows": rows, "load": load}


def ops_table(result, shape, repeat):
    B, S, L, H, D = shape
    columns = [("op", "operation", ""), ("mib", "MiB", ".1f"), ("median_ms", "median ms", ".3f"),
               ("min_ms", "min ms", ".3f"), ("mb_s", "MB/s", ".0f"), ("x_floor", "x floor", ".3g"),
               ("detail", "detail", "")]
    c = result["checks"]
    notes = [f"arena {result['arena_bytes'] / MIB:.0f} MiB float32: B={B}, L={L}, H={H}, S={S}, "
             f"D={D}; every row full of random data unless stated; medians of {repeat} "
             f"samples, all operations sampled round-robin",
             "MiB = the bytes the operation moves (payload for save/load); "
             "MB/s = those bytes / median (MB = 1e6 B); x floor = median / median of "
             "'floor: copyto' (read + write the whole arena once)",
             "crop(-1) resets seq_pos to S once every S-1 calls (inside the timing); "
             "open = KVCache.open + dropping the cache (the munmap)",
             f"load bit-exact (full, and committed half): {c['load_bit_exact']}; resident after "
             f"open {c['resident_after_open']} B, after reading layer 0 "
             f"{c['resident_after_layer0'] / MIB:.1f} MiB "
             f"(one layer = {c['layer_bytes'] / MIB:.1f} MiB)",
             f"window: attend at layer 0, T=1, on a full n_sink={N_SINK} cache, then advance(1); "
             "no window: the same attend on a plain cache holding S-1 positions; "
             "difference = the eviction per decoding step",
             f"others = {others_note(result['load']['others'])} cores used by other processes "
             f"during the timing; {result['load']['disturbed']} of {result['load']['rounds']} "
             "rounds disturbed"
             + ("; too few clean ones, so the medians include disturbed rounds"
                if result["load"]["flagged"] else "")]
    return table(result["rows"], columns, "Whole-arena operations", notes)


def main(argv=None):
    args = parse_args(argv)
    out = results_dir(args.out)
    mode = "quick" if args.quick else "full"
    shape = SHAPES[mode]
    repeat = 3 if args.quick else 9
    warmup = 0.02 if args.quick else 0.1
    info = header({"dtype": np.dtype(DTYPE).name, "mode": mode,
                   "shape_B_S_L_H_D": list(shape), "repeat": repeat})
    print_header("kvarena whole-arena operations", info)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvarena-ops-") as tmp:
        result = measure(shape, repeat, warmup, tmp)
    result = {"header": info, **result, "elapsed_s": time.perf_counter() - started}
    write_json(os.path.join(out, "ops.json"), result)
    write_csv(os.path.join(out, "ops.csv"), result["rows"])
    log("")
    log(ops_table(result, shape, repeat))
    log(f"results: {os.path.join(out, 'ops.json')} (and ops.csv) in {result['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
