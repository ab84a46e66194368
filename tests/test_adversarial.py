"""Adversarial use: no crash, no silent corruption, no lost or stray file (issue 14).

Every attack runs in a fresh interpreter (``run``), so that a crash (a
signal: SIGSEGV, SIGBUS, SIGABRT) fails the test instead of killing the
test run. Inside the child, ``refused(...)`` asserts the exception's type
and message, and that the cache's arena and bookkeeping are unchanged; the
parent checks files (bytes, mtime, directory listing) where the attack is
on files. Attacks are batched per subject to keep the module fast.

1. two handles on one state: copies, two "r+" opens, "r+" against "c" in
   one and in two processes, a forked child, lengths changed behind the
   cache's back;
2. one cache from two threads;
3. arrays that lie (a subclass whose .shape or .dtype disagrees with its
   buffer), masked, object, bool, empty, negatively or oddly strided, or
   views of the cache's own arena;
4. huge sizes, numpy scalar sizes, RLIMIT_AS;
5. a full filesystem (a 4 MiB tmpfs when this process may mount one,
   RLIMIT_FSIZE otherwise), a read-only one;
6. save onto the file of an open cache, onto FIFOs, devices, sockets,
   directories and symlinks, with bytes paths; load and open of them;
7. a constructor that fails leaves no file;
8. crafted snapshot headers with valid checksums, crafted mapped state;
9. lazy=True then reset() commits nothing untouched;
10. kill -9 or Ctrl-C during save leaves no temporary and the old file;
11. what cannot be prevented: truncating a mapped file is a SIGBUS.
"""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

# the attacks use /proc, flock, O_TMPFILE, posix_fallocate and mount: Linux's
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux-specific attacks")

PRELUDE = textwrap.dedent('''
    import copy, errno, gc, hashlib, json, os, re, resource, struct, sys, threading, time, zlib
    import numpy as np
    from kvarena import KVCache, CacheFileError

    def refused(exc, pattern, fn, *args, cache=None, **kwargs):
        """Call fn; it must raise exc matching pattern and leave cache unchanged."""
        before = None if cache is None else (cache._arena.tobytes(), cache._state.tobytes())
        try:
            fn(*args, **kwargs)
        except exc as e:
            assert re.search(pattern, str(e)), f"{type(e).__name__}: {e} does not match {pattern!r}"
            if cache is not None:
                assert (cache._arena.tobytes(), cache._state.tobytes()) == before, \\
                    "a refused call changed the cache"
            return e
        except BaseException as e:
            raise AssertionError(f"expected {exc.__name__} matching {pattern!r}, "
                                 f"got {type(e).__name__}: {e}") from e
        raise AssertionError(f"expected {exc.__name__} matching {pattern!r}; nothing raised")

    def filled(B=2, S=8, L=2, H=2, D=4, n=3, seed=0, **kwargs):
        """A cache with n committed positions in every layer."""
        cache = KVCache(B, S, L, H, D, **kwargs)
        rng = np.random.default_rng(seed)
        for layer in range(L):
            cache.update(layer, rng.standard_normal((B, H, n, D)), rng.standard_normal((B, H, n, D)))
        cache.advance(n)
        return cache

    def block(cache, T=1, seed=1):
        shape = (cache.batch_size, cache.num_heads, T, cache.head_dim)
        return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)

    def digest(path):
        """Bytes, mtime and size of a file: what a refused call must not change."""
        st = os.stat(path)
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest(), st.st_mtime_ns, st.st_size

    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    # top level again: code indented by mistake is a syntax error, not dead code
    # in the function above
    PRELUDE_DONE = True
''')

DONE = "attack finished"


def run(code, cwd, timeout=60):
    """Run ``code`` after PRELUDE in a new interpreter in ``cwd``; return its stdout.

    A child killed by a signal, or one that fails an assertion or stops
    early, fails the test.
    """
    source = PRELUDE + textwrap.dedent(code) + f"\nprint({DONE!r})\n"
    proc = subprocess.run([sys.executable, "-c", source], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode >= 0, \
        f"the child crashed with {signal.Signals(-proc.returncode).name}:\n{proc.stderr}"
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith(DONE), proc.stdout
    return proc.stdout


def spawn(code, cwd):
    """Start ``code`` after PRELUDE in a new interpreter; it reads stdin to know when to end."""
    return subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=cwd,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# -- 1. two handles on one state --------------------------------------------------

def test_copies_are_independent_and_pickling_is_refused(tmp_path):
    run('''
        import pickle
        for make in (copy.copy, copy.deepcopy):
            cache = filled()
            twin = make(cache)
            assert not np.shares_memory(twin._arena, cache._arena)
            assert not np.shares_memory(twin._state, cache._state)
            # the issue's crash: advance through one, update through the other past
            # what the first's lengths allow
            cache.advance(cache.max_seq_len - cache.seq_pos)
            k = block(twin, T=twin.max_seq_len - twin.seq_pos)
            twin.update(0, k, k)
            twin.advance(k.shape[2])
            assert cache.seq_lens.tolist() == twin.seq_lens.tolist() == [8, 8]
            assert twin.get(0)[0][:, :, 3:].tobytes() == k.tobytes()
            assert not np.array_equal(twin.get(0)[0], cache.get(0)[0])
            refused(ValueError, "max_seq_len", twin.update, 1, k[:, :, :1], k[:, :, :1], cache=twin)

        mapped = filled(path="m.kvm")
        twin = copy.deepcopy(mapped)
        assert twin.path is None and twin.seq_lens.tolist() == mapped.seq_lens.tolist()
        assert twin.arena.tobytes() == mapped.arena.tobytes()
        refused(TypeError, "cannot be pickled.*save", pickle.dumps, mapped, cache=mapped)
    ''', tmp_path)


def test_lengths_changed_behind_the_cache_are_checked_live(tmp_path):
    run('''
        cache = filled()                     # seq_lens [3, 3] of 8
        cache.save("good.kva")
        saved = digest("good.kva")
        lens = cache.seq_lens
        lens.flags.writeable = True          # NumPy allows this on a view of writable memory
        k = block(cache, T=2)
        for bad in ([9, 3], [3, -1], [2**40, 0]):
            lens[:] = bad
            # the cached seq_pos says 3: a check against it would let the kernel
            # write past a row (or before one)
            refused(RuntimeError, r"seq_lens = \\[.*\\] were changed outside", cache.update, 0, k, k,
                    cache=cache)
            refused(RuntimeError, "changed outside", cache.attend, 1, k, k, k, cache=cache)
            # nor a snapshot load would refuse, in place of a good one
            refused(RuntimeError, "changed outside", cache.save, "good.kva", cache=cache)
            assert digest("good.kva") == saved
        lens[:] = [3, 3]
        evicted = cache.evicted
        evicted.flags.writeable = True
        evicted[1] = -2
        refused(RuntimeError, r"evicted = \\[0, -2\\] were changed outside.*nothing was written",
                cache.save, "good.kva", cache=cache)
        assert digest("good.kva") == saved and sorted(os.listdir(".")) == ["good.kva"]
        evicted[1] = 0
        for lengths, longest in (([8, 3], 8), ([7, 0], 7)):
            lens[:] = lengths                # in range: honoured, so a 2-block no longer fits
            refused(ValueError, rf"seq_pos {longest} . T must not exceed max_seq_len = 8",
                    cache.update, 0, k, k, cache=cache)
        cache.update(0, k[:, :, :1], k[:, :, :1])
        assert cache.seq_pos == 7
    ''', tmp_path)


def test_no_guarded_method_takes_bad_lengths_in(tmp_path):
    # a method that returned without looking at the lengths (an identity
    # reorder, advance) recorded them as seen, and the next attend gave
    # the kernel 10**7 positions of an 8-slot arena: a segfault
    run('''
        cache = filled()
        base = cache.seq_lens.base           # the cache's whole state, writable
        k = block(cache)
        calls = [("reorder", cache.reorder, [0, 1]), ("advance", cache.advance, 1),
                 ("advance", cache.advance, [1, 0]), ("crop", cache.crop, -1),
                 ("copy_sequence", cache.copy_sequence, 0, 1),
                 ("deepcopy", copy.deepcopy, cache),
                 ("seq_pos", setattr, cache, "seq_pos", 2), ("save", cache.save, "s.kva")]
        for name, fn, *args in calls:
            base[0] = 10**7
            refused(RuntimeError, r"seq_lens = \\[10000000, 3\\] were changed outside", fn, *args,
                    cache=cache)
            refused(RuntimeError, "changed outside", cache.attend, 0, k, k, k, cache=cache)
            base[0] = 3
        assert not os.path.exists("s.kva")
        base[0] = 10**7
        cache.reset()                        # how such a cache is made usable again
        assert cache.seq_lens.tolist() == [0, 0] and not cache.arena.any()
        cache.attend(0, k, k, k)
    ''', tmp_path)


def test_lengths_taken_in_by_a_refused_call_are_not_mistaken_later(tmp_path):
    # a call that took lengths changed outside in and was then refused left
    # them unrecorded: changed back, they looked unchanged against the stale
    # record, and attend wrote at the old seq_pos while attending at the new
    run('''
        cache, fresh = filled(B=1, n=4), filled(B=1, n=4)
        q, k = block(cache, seed=2), block(cache, seed=3)
        base = cache.seq_lens.base
        base[0] = 0
        refused(ValueError, "T >= 1", cache.attend, 0, q, k[:, :, :0], k[:, :, :0])
        base[0] = 4
        assert cache.attend(0, q, k, k).tobytes() == fresh.attend(0, q, k, k).tobytes()
        assert cache.seq_pos == 4
    ''', tmp_path)


def test_mapped_file_has_one_writer_in_one_process(tmp_path):
    run('''
        cache = filled(path="m.kvm")
        before = digest("m.kvm")
        refused(BlockingIOError, "m.kvm is in use by another file-backed cache", KVCache.open, "m.kvm")
        refused(BlockingIOError, "in use", KVCache.open, b"m.kvm", "r+")
        refused(BlockingIOError, "in use", KVCache.open, "m.kvm", "c")
        refused(FileExistsError, "m.kvm", KVCache, 2, 8, 2, 2, 4, path="m.kvm")
        assert digest("m.kvm") == before

        # the lock lives as long as the mapping: a view kept past the cache holds it
        keys = cache.get(0)[0]
        del cache
        gc.collect()
        refused(BlockingIOError, "in use", KVCache.open, "m.kvm")
        del keys
        gc.collect()

        readers = [KVCache.open("m.kvm", "c"), KVCache.open("m.kvm", "c")]   # many readers
        refused(BlockingIOError, "in use", KVCache.open, "m.kvm", "r+")
        # a "c" cache reads the lengths once: another writer (here one that ignores
        # the lock) changing them in the file is not seen
        with open("m.kvm", "r+b") as f:
            header_len = struct.unpack_from("<8sII", f.read(16))[2]
            state_offset = -(-(16 + header_len) // 8) * 8
            os.pwrite(f.fileno(), np.array([8, 8], "<i8").tobytes(), state_offset)
        assert readers[0].seq_lens.tolist() == [3, 3]
        k = block(readers[0], T=5)
        readers[0].update(0, k, k)            # fits only at the lengths it read
        readers[0].advance(5)
        assert readers[0].seq_lens.tolist() == [8, 8] and readers[1].seq_lens.tolist() == [3, 3]
        del readers
        gc.collect()
        assert KVCache.open("m.kvm").seq_lens.tolist() == [8, 8]   # what the file says
    ''', tmp_path)


def test_a_forked_child_does_not_write_its_parents_file(tmp_path):
    # fork copies the descriptor that holds the file's lock: only the guard can refuse
    run('''
        import traceback
        writer = filled(path="w.kvm")
        memory, reader = filled(), None
        k = block(writer)
        pid = os.fork()
        if pid == 0:
            try:
                refused(RuntimeError, "w.kvm, which belongs to the process that created",
                        writer.update, 0, k, k, cache=writer)
                for call in (writer.advance, writer.reset, lambda: writer.crop(0),
                             lambda: writer.attend(0, k, k, k), lambda: copy.deepcopy(writer)):
                    refused(RuntimeError, "a forked child shares that mapping", call, cache=writer)
                assert writer.get(0)[0].shape[2] == 3          # reading is fine
                memory.update(0, k, k)                         # an in-memory cache is the child's own
                memory.advance(1)
                os._exit(0)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        writer.update(0, k, k)                                 # the parent still writes
        writer.advance(1)
        assert writer.seq_lens.tolist() == [4, 4] and memory.seq_lens.tolist() == [3, 3]
    ''', tmp_path)


OWNER = '''
    cache = filled(path="m.kvm")
    open("owner.ready", "w").close()
    sys.stdin.read()                         # hold the file until told
'''


@pytest.mark.parametrize("owner_mode", ["creator", "c"])
def test_mapped_file_has_one_writer_across_processes(tmp_path, owner_mode):
    if owner_mode == "c":
        run('filled(path="m.kvm")', tmp_path)
        owner = spawn(OWNER.replace('filled(path="m.kvm")', 'KVCache.open("m.kvm", "c")'), tmp_path)
    else:
        owner = spawn(OWNER, tmp_path)
    try:
        wait_for(tmp_path / "owner.ready", owner)
        before = (sha256(tmp_path / "m.kvm"), os.stat(tmp_path / "m.kvm").st_mtime_ns)
        run(f'''
            refused(BlockingIOError, "in use by another file-backed cache", KVCache.open, "m.kvm")
            if {owner_mode!r} == "creator":
                refused(BlockingIOError, "in use", KVCache.open, "m.kvm", "c")
            else:
                assert KVCache.open("m.kvm", "c").seq_lens.tolist() == [3, 3]
            other = filled(seed=5)
            refused(ValueError, "the file of an open file-backed cache", other.save, "m.kvm",
                    cache=other)
        ''', tmp_path)
        assert (sha256(tmp_path / "m.kvm"), os.stat(tmp_path / "m.kvm").st_mtime_ns) == before
    finally:
        owner.communicate("", timeout=60)
    assert owner.returncode == 0
    run('assert KVCache.open("m.kvm").seq_lens.tolist() == [3, 3]', tmp_path)   # released


# -- 2. threads -------------------------------------------------------------------

def test_one_cache_from_two_threads_raises_instead_of_corrupting(tmp_path):
    run('''
        B, S, H, D = 2, 2048, 8, 64
        cache = KVCache(B, S, 1, H, D, num_threads=1)
        rng = np.random.default_rng(1)
        n = S - 8
        cache.update(0, rng.standard_normal((B, H, n, D)), rng.standard_normal((B, H, n, D)))
        cache.advance(n)
        inputs = [[rng.standard_normal((B, H, 1, D)).astype(np.float32) for _ in range(3)]
                  for _ in range(2)]
        # attend writes its own k, v at the same position before attending, so
        # each thread's output is fixed whatever the other thread did before
        want = [cache.attend(0, *inp).tobytes() for inp in inputs]
        ok, wrong, refusals, other = [], [], [], []
        start = threading.Barrier(2)

        def attend(i):
            start.wait()
            deadline = time.monotonic() + 20
            calls = 0
            while calls < 300 or (not refusals and time.monotonic() < deadline):
                calls += 1
                try:
                    out = cache.attend(0, *inputs[i])
                except RuntimeError as e:
                    (refusals if "two threads at once" in str(e) else other).append(e)
                    continue
                except BaseException as e:
                    other.append(e)
                    continue
                (ok if out.tobytes() == want[i] else wrong).append(i)

        threads = [threading.Thread(target=attend, args=(i,)) for i in range(2)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert not other, other
        assert not wrong, f"{len(wrong)} of {len(ok) + len(wrong)} outputs were wrong"
        assert refusals, "the threads never overlapped: the test proves nothing"
        assert ok
        print("attend:", len(ok), "right,", len(refusals), "refused")

        # writers racing: update + advance against crop and reset
        small = KVCache(2, 64, 2, 4, 16)
        k = np.ones((2, 4, 1, 16), np.float32)
        errors, refusals = [], []
        def decode():
            for step in range(3000):
                try:
                    if small.seq_pos >= small.max_seq_len - 1:
                        small.crop(0)
                    for layer in range(2):
                        small.update(layer, k, k)
                    small.advance(1)
                except RuntimeError as e:
                    (refusals if "two threads at once" in str(e) else errors).append(e)
                except ValueError as e:      # the other thread moved the lengths meanwhile
                    if "max_seq_len" not in str(e):
                        errors.append(e)
        def trim():
            for step in range(3000):
                try:
                    small.crop(-1) if step % 3 else small.reset()
                except RuntimeError as e:
                    (refusals if "two threads at once" in str(e) else errors).append(e)
                except ValueError as e:      # crop(-1) of an empty row
                    if "length must be in" not in str(e):
                        errors.append(e)
        threads = [threading.Thread(target=decode), threading.Thread(target=trim)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert not errors, errors
        lens = small.seq_lens
        assert ((0 <= lens) & (lens <= small.max_seq_len)).all()
        # nothing was written beyond the written end
        assert not small._arena[..., int(small._written[0]):, :].any()
    ''', tmp_path, timeout=120)


# -- 3. arrays that lie, and other odd arrays -----------------------------------

def test_arrays_are_validated_as_they_really_are(tmp_path):
    run('''
        cache = filled()                     # (B, H, T, D) = (2, 2, T, 4)

        class ShapeLiar(np.ndarray):
            @property
            def shape(self):
                return (2, 2, 1, 4)          # what the cache wants to hear

        class DtypeLiar(np.ndarray):
            @property
            def dtype(self):
                return np.dtype(np.float32)

        small = np.ones((1, 1, 1, 1), np.float32).view(ShapeLiar)
        large = np.ones((2, 2, 5, 4), np.float32).view(ShapeLiar)
        refused(ValueError, r"^key must have shape .*got \\(1, 1, 1, 1\\)", cache.update, 0, small,
                small, cache=cache)
        refused(ValueError, r"^k must have shape .*got \\(1, 1, 1, 1\\)", cache.attend, 0, small,
                small, small, cache=cache)
        refused(ValueError, r"^q must have shape .*got \\(2, 2, 5, 4\\)", cache.attend, 0, large,
                block(cache), block(cache), cache=cache)

        class Tensor:
            def __init__(self, data):
                self.data = data
        refused(ValueError, r"^value must have shape", cache.update, 0, block(cache),
                Tensor(small), cache=cache)
        ints = np.ones((2, 2, 1, 4), np.int64).view(DtypeLiar)
        refused(TypeError, r"^key must hold real floating-point values; got dtype int64",
                cache.update, 0, ints, ints, cache=cache)

        masked = np.ma.masked_array(block(cache), mask=block(cache) > 0)
        refused(TypeError, r"^key must not be a masked array", cache.update, 0, masked, block(cache),
                cache=cache)
        refused(TypeError, r"^q must not be a masked array", cache.attend, 0, masked, block(cache),
                block(cache), cache=cache)
        for odd, dtype in [(np.ones((2, 2, 1, 4), object), "object"),
                           (np.ones((2, 2, 1, 4), bool), "bool"),
                           (np.ones((2, 2, 1, 4), "datetime64[s]"), "datetime64"),
                           (np.ones((2, 2, 1, 4), "V4"), r"\\|V4")]:
            refused(TypeError, rf"^value must hold real floating-point values; got dtype {dtype}",
                    cache.update, 0, block(cache), odd, cache=cache)
        for empty in [np.ones((2, 2, 0, 4)), np.ones((0, 2, 1, 4)), np.ones((2, 2, 1, 0))]:
            refused(ValueError, r"^key must (have shape|hold at least one position)", cache.update,
                    0, empty, empty, cache=cache)

        # odd layouts are accepted and equal a C-contiguous copy
        k = block(cache, T=2, seed=3)
        backwards = np.ascontiguousarray(k[:, ::-1, ::-1, ::-1])[:, ::-1, ::-1, ::-1]
        raw = np.zeros(k.nbytes + 1, np.uint8)
        unaligned = np.frombuffer(raw.data, np.float32, k.size, offset=1).reshape(k.shape)
        unaligned[...] = k
        assert not unaligned.flags.aligned
        wide = np.zeros((2, 3, 2, 9), np.float32)[:, ::2, :, 1::2]
        wide[...] = k
        want = copy.deepcopy(cache)
        want.update(0, k, k)
        for odd in (backwards, unaligned, wide, np.asfortranarray(k)):
            got = copy.deepcopy(cache)
            got.update(0, odd, odd)
            assert got._arena.tobytes() == want._arena.tobytes()
    ''', tmp_path)


ALIASED = textwrap.dedent('''
    # blocks that are views of the cache's own arena, against a twin fed copies
    def fed_views(op):
        got, want = filled(B=1, H=1, S=8, n=6, n_sink=0), filled(B=1, H=1, S=8, n=6, n_sink=0)
        outs = []
        for cache, fresh in ((got, False), (want, True)):
            keys, values = cache.get(0)                      # positions 0..5, C-contiguous
            # the write evicts 4 positions and shifts the rest under the views
            k, v = (np.array(keys), np.array(values)) if fresh else (keys, values)
            outs.append(op(cache, k, v))
            tail = cache.caches[1][0][:, :, 1:3]             # positions 1, 2 of layer 1
            k = np.array(tail) if fresh else tail
            cache.crop(2)
            cache.update(1, k, k)                            # writes 2, 3: overlaps its source
        assert got._arena.tobytes() == want._arena.tobytes(), "a view of the arena was written wrong"
        got_out, want_out = outs
        assert got_out is None or got_out.tobytes() == want_out.tobytes(), \
            "a view of the arena was written wrong"
''')


def test_update_with_views_of_its_own_arena(tmp_path):
    run(ALIASED + 'fed_views(lambda cache, k, v: cache.update(0, k, v))', tmp_path)


def test_attend_with_views_of_its_own_arena(tmp_path):
    run(ALIASED + 'fed_views(lambda cache, k, v: cache.attend(0, k, k, v))', tmp_path)


def test_attend_with_a_query_viewing_its_own_int8_scales(tmp_path):
    # writing the new key writes its scale, under a query that views the scales
    run('''
        got = filled(B=1, L=1, H=1, n=4, dtype=np.int8)
        want = copy.deepcopy(got)
        q = got.scales[0, 0, 0, 0, 1:5].reshape(1, 1, 1, 4)   # key scales of positions 1..4
        k, v = block(got, seed=2) * 10, block(got, seed=3)
        expected = want.attend(0, np.array(q), k, v)
        assert got.attend(0, q, k, v).tobytes() == expected.tobytes()
        assert got._arena.tobytes() == want._arena.tobytes()
    ''', tmp_path)


# -- 4. sizes -----------------------------------------------------------------------

def test_huge_and_odd_sizes_are_clear_errors(tmp_path):
    run('''
        refused(MemoryError, r"needs 8796093022271 bytes, more than the \\d+ bytes of memory "
                r"available now; use a smaller cache or lazy=True", KVCache, 2**40, 1, 1, 1, 1)
        refused(MemoryError, r"cannot allocate an arena of shape \\(1, 2, 1099511627776, 1, 1, 1\\)",
                KVCache, 2**40, 1, 1, 1, 1, lazy=True)
        refused(MemoryError, "more than this platform can address", KVCache, 2**62, 2**62, 1, 1, 1)
        refused(MemoryError, "more than this platform can address", KVCache, 2**31, 2**31, 2**31,
                1, 1, path="never.kvm")
        assert os.listdir(".") == []

        # numpy integers are sizes; numpy floats and bools are not
        cache = KVCache(np.int8(2), np.uint64(8), np.int32(1), np.int16(2), np.intp(4))
        assert (cache.batch_size, cache.max_seq_len) == (2, 8) and type(cache.batch_size) is int
        refused(TypeError, r"^batch_size must be an int; got np.float32\\(2.0\\)", KVCache,
                np.float32(2), 8, 1, 2, 4)
        refused(TypeError, r"^head_dim must be an int", KVCache, 2, 8, 1, 2, np.True_)
        refused(TypeError, r"^layer_idx must be an int", cache.update, np.float64(0),
                block(cache), block(cache), cache=cache)

        # an address-space limit: allocation and mapping fail cleanly
        shape = (1, 2**16, 4, 4, 64)                 # 512 MiB
        made = KVCache(*shape, lazy=True, path="made.kvm")     # a sparse file, before the limit
        del made
        gc.collect()
        vm = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20),) * 2)
        refused(MemoryError, r"cannot allocate an arena .* \\(536870975 bytes\\)", KVCache, *shape)
        refused(MemoryError, "cannot allocate", KVCache, *shape, lazy=True)
        refused(OSError, r"cannot map the 536870912-byte arena of big.kvm", KVCache, *shape,
                path="big.kvm")
        # a refused open holds no map, and so no lock, while its error lives
        for mode in ("r+", "c"):
            held = refused(OSError, "cannot map the 536870912-byte arena of made.kvm", KVCache.open,
                           "made.kvm", mode)
            refused(OSError, "cannot map", KVCache.open, "made.kvm", "r+")
            del held
        assert os.listdir(".") == ["made.kvm"]
    ''', tmp_path)


def test_reset_wipes_what_an_attend_that_ran_out_of_memory_stored(tmp_path):
    # the kernel's scratch cannot be had (a huge head_dim under an address-space
    # limit): attend raises after storing k and v, and reset() still wipes them
    run('''
        wide = KVCache(1, 4, 1, 1, 1 << 20)            # 32 MiB; the kernel wants ~270 MiB more
        x = np.ones((1, 1, 1, 1 << 20), np.float32)
        vm = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (vm + (100 << 20), resource.RLIM_INFINITY))
        try:
            wide.attend(0, x, x, x)
        except MemoryError:
            pass
        else:
            raise AssertionError("the kernel's scratch was expected to fail under the limit")
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)
        assert wide._arena.any(), "attend was expected to store k and v before the kernel"
        wide.reset()
        assert not wide._arena.any(), "reset() left what a failed attend stored"
    ''', tmp_path)


# -- 5. full and read-only filesystems -----------------------------------------------

FULL_DISK = textwrap.dedent('''
    # a 32 MiB arena, lazy or not, on a filesystem that cannot hold it
    for lazy in (False, True):
        e = refused(OSError, r"cannot reserve 335\\d{5} bytes on disk for the file-backed arena "
                    r"fs/arena.kvm \\((No space left on device|File too large)\\)",
                    KVCache, 4, 1024, 4, 4, 64, lazy=lazy, path="fs/arena.kvm")
        assert e.errno in (errno.ENOSPC, errno.EFBIG)
        assert os.listdir("fs") == ["old.kva"], os.listdir("fs")

    # a snapshot that does not fit: the old file stays, whole, and no temporary
    cache = filled(B=1, S=8192, L=1, H=1, D=128, n=8000)         # 8 MiB of payload
    before = digest("fs/old.kva")
    e = refused(OSError, r"cannot write the 819\\d{4}-byte snapshot fs/old.kva", cache.save,
                "fs/old.kva", cache=cache)
    assert e.errno in (errno.ENOSPC, errno.EFBIG)
    assert os.listdir("fs") == ["old.kva"] and digest("fs/old.kva") == before
    assert KVCache.load("fs/old.kva").seq_lens.tolist() == [3, 3]
''')


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs at tmp_path/fs, or None where this process cannot mount one."""
    fs = tmp_path / "fs"
    fs.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(fs)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        yield None
        return
    try:
        yield fs
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=True)


def test_full_tmpfs_and_read_only_filesystem(tmp_path, small_fs):
    if small_fs is None:
        pytest.skip("cannot mount a tmpfs here (needs root); "
                    "test_file_size_limit covers the full-disk case with RLIMIT_FSIZE")
    run('filled().save("fs/old.kva")', tmp_path)
    run(FULL_DISK, tmp_path)
    before = sha256(small_fs / "old.kva")
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    run('''
        cache = filled()
        refused(OSError, "Read-only file system", cache.save, "fs/old.kva", cache=cache)
        refused(OSError, "Read-only file system", cache.save, "fs/new.kva", cache=cache)
        refused(OSError, "Read-only file system", KVCache, 2, 8, 2, 2, 4, path="fs/new.kvm")
        refused(OSError, "Read-only file system", KVCache.open, "fs/old.kva")
        assert os.listdir("fs") == ["old.kva"]
        assert KVCache.load("fs/old.kva").seq_lens.tolist() == [3, 3]
    ''', tmp_path)
    assert sha256(small_fs / "old.kva") == before


def test_file_size_limit(tmp_path):
    # the same attack where no tmpfs can be mounted; RLIMIT_FSIZE refuses a
    # sparse file's size as well, so only the tmpfs test can tell a reserved
    # file from a sparse one (which would SIGBUS there)
    (tmp_path / "fs").mkdir()
    limit = 'filled().save("fs/old.kva")\nresource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20,) * 2)\n'
    run(limit + FULL_DISK, tmp_path)


# -- 6. save onto what must not be replaced -------------------------------------------

def test_save_refuses_what_it_must_not_replace(tmp_path):
    run('''
        import socket, stat
        cache = filled()
        mapped = filled(path="m.kvm", seed=7)
        before = digest("m.kvm")
        for target in (mapped.path, os.fsencode(mapped.path), os.path.abspath("m.kvm")):
            refused(ValueError, r"path '.*m.kvm' is the file of an open file-backed cache",
                    mapped.save, target, cache=mapped)
            refused(ValueError, "the file of an open file-backed cache", cache.save, target,
                    cache=cache)
        os.symlink("m.kvm", "to-mapped")
        refused(ValueError, "the file of an open file-backed cache", cache.save, "to-mapped")
        assert digest("m.kvm") == before

        os.mkfifo("fifo")
        os.mkdir("dir")
        sock = socket.socket(socket.AF_UNIX)
        sock.bind("sock")
        specials = {"fifo": "a FIFO", "dir": "a directory", "sock": "a socket"}
        try:                     # a private /dev/null twin, never the real one
            os.mknod("null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
            specials["null"] = "a character device"
        except PermissionError:  # not root, or no CAP_MKNOD
            pass
        for name, kind in specials.items():
            mode = os.lstat(name).st_mode
            refused(ValueError, rf"^path must be a regular file or a new name; '{name}' is {kind}",
                    cache.save, name, cache=cache)
            assert os.lstat(name).st_mode == mode
        refused(TypeError, r"^path must be a str, bytes or os.PathLike; got 3", cache.save, 3)
        refused(ValueError, r"^path must name a file", cache.save, "")

        # a symlink: its target is replaced and the link kept; bytes paths work
        open("target.kva", "wb").close()
        os.symlink("target.kva", "link.kva")
        cache.save(b"link.kva")
        assert os.path.islink("link.kva") and os.readlink("link.kva") == "target.kva"
        assert KVCache.load(b"target.kva").seq_lens.tolist() == [3, 3]
        os.symlink("made-by-save.kva", "dangling.kva")
        cache.save("dangling.kva")
        assert os.path.islink("dangling.kva") and os.path.isfile("made-by-save.kva")
        assert sorted(os.listdir(".")) == sorted(["m.kvm", "to-mapped", "link.kva",
            "target.kva", "dangling.kva", "made-by-save.kva", *specials]), os.listdir(".")

        # a batch whose header load would not read: refused, the old file kept
        huge = KVCache(200_000, 2, 1, 1, 1, lazy=True)
        saved = digest("target.kva")
        refused(ValueError, r"a snapshot of batch_size 200000 needs a \\d+-byte header, more "
                r"than the 1048576 bytes load reads; nothing was written", huge.save,
                "target.kva", cache=huge)
        assert digest("target.kva") == saved
        assert KVCache.load("target.kva").seq_lens.tolist() == [3, 3]
    ''', tmp_path)


def test_load_and_open_refuse_what_is_not_a_regular_file(tmp_path):
    # a FIFO with no writer would block open() or the first read forever
    run('''
        import stat
        os.mkfifo("fifo")
        os.mkdir("dir")
        kinds = {"fifo": "a FIFO", "dir": "a directory"}
        try:
            os.mknod("zero", stat.S_IFCHR | 0o600, os.makedev(1, 5))     # a /dev/zero twin
            kinds["zero"] = "a character device"
        except PermissionError:
            pass
        for name, kind in kinds.items():
            refused(CacheFileError, rf"^{name} is {kind}, not a kvarena file", KVCache.load, name)
            refused(CacheFileError, rf"^{name} is {kind}", KVCache.open, name, "c")
            if name != "dir":                 # O_RDWR on a directory: IsADirectoryError first
                refused(CacheFileError, rf"^{name} is {kind}", KVCache.open, name, "r+")
        refused(IsADirectoryError, "dir", KVCache.open, "dir", "r+")
        refused(ValueError, "^path must not contain a NUL character", KVCache.load, "a\\0b")
        assert sorted(os.listdir(".")) == sorted(kinds)
    ''', tmp_path, timeout=30)


# -- 7. a failing constructor leaves no file --------------------------------------------

def test_failed_constructor_leaves_no_file(tmp_path):
    run('''
        bad = [
            (dict(num_threads=2**31), ValueError, r"^num_threads must be in \\[1, 2147483647\\]; got 2147483648"),
            (dict(num_threads=0), ValueError, r"^num_threads must be in"),
            (dict(lazy="no"), TypeError, r"^lazy must be True or False; got 'no'"),
            (dict(check_finite="no"), TypeError, r"^check_finite must be True or False; got 'no'"),
            (dict(lazy=None), TypeError, r"^lazy must be True or False"),
            (dict(dtype=np.int16), TypeError, r"^dtype must be one of"),
            (dict(n_sink=8), ValueError, r"^n_sink must be None or in \\[0, max_seq_len = 8\\)"),
            (dict(path=3.5), TypeError, r"^path must be a str, bytes or os.PathLike"),
        ]
        for kwargs, exc, pattern in bad:
            refused(exc, pattern, KVCache, 2, 8, 2, 2, 4, **{"path": "a.kvm", **kwargs})
            assert os.listdir(".") == [], (kwargs, os.listdir("."))
        refused(ValueError, r"^max_seq_len must be a positive int", KVCache, 2, 0, 2, 2, 4,
                path="a.kvm")
        assert os.listdir(".") == []
        # the corrected retry works, with a bytes path as well
        KVCache(2, 8, 2, 2, 4, path="a.kvm", num_threads=2)
        assert KVCache(2, 8, 2, 2, 4, path=b"b.kvm").path == "b.kvm"
        assert sorted(os.listdir(".")) == ["a.kvm", "b.kvm"]
        for kwargs, exc, pattern in [(dict(lazy="no"), TypeError, "^lazy"),
                                     (dict(check_finite=1), TypeError, "^check_finite"),
                                     (dict(num_threads=2**31), ValueError, "^num_threads"),
                                     (dict(max_arena_bytes=0), ValueError, "^max_arena_bytes"),
                                     (dict(max_arena_bytes="1"), TypeError, "^max_arena_bytes")]:
            refused(exc, pattern, KVCache.load, "missing.kva", **kwargs)
        refused(TypeError, "^check_finite", KVCache.open, "a.kvm", check_finite="yes")
        refused(ValueError, "^num_threads", KVCache.open, "a.kvm", num_threads=2**40)
    ''', tmp_path)


# -- 8. crafted files -------------------------------------------------------------------

def test_crafted_snapshot_headers_are_cache_file_errors(tmp_path):
    run('''
        import tracemalloc
        PREFIX = struct.Struct("<8sIIII")
        filled().save("good.kva")             # (L, 2, B, H, S, D) = (2, 2, 2, 2, 8, 4), seq_lens [3, 3]
        raw = open("good.kva", "rb").read()
        _, version, header_len = PREFIX.unpack_from(raw)[:3]
        good = json.loads(raw[PREFIX.size:PREFIX.size + header_len])
        payload = raw[PREFIX.size + header_len:]

        def crafted(payload=payload, **changes):
            """The good snapshot with header changes and checksums that match them."""
            header = json.dumps({**good, **changes}).encode()
            with open("crafted.kva", "wb") as f:
                f.write(PREFIX.pack(b"KVASNAP\\0", version, len(header), zlib.crc32(header),
                                    zlib.crc32(payload)) + header + payload)
            return "crafted.kva"

        cases = [
            (dict(evicted=[2**64, 0]), r"evicted must be 2 ints in \\[0, 9223372036854775807\\]"),
            (dict(evicted=[2**63, 0]), "evicted must be"),
            (dict(seq_lens=[2**64, 3]), "seq_lens must be"),
            (dict(shape=[2, 2, 2, 2, 2**64, 4]), "shape must be 6 positive ints"),
            (dict(shape=[2, 2, 2, 2**62, 2**62, 4]), "more elements than this platform can address"),
            (dict(n_sink=2**64), "n_sink must be"),
            (dict(payload_bytes=2**64), "payload_bytes"),
            (dict(rope_theta=-1.0, rope_style="half"), "rope_theta and rope_style must"),
            (dict(rope_theta=10**400, rope_style="half"), "rope_theta and rope_style must"),
            (dict(rope_theta=1e4, rope_style="sideways"), "rope_theta and rope_style must"),
            (dict(rope_theta=1e4), "rope_theta and rope_style must"),
            (dict(rope_style="half"), "rope_theta and rope_style must"),
        ]
        for changes, pattern in cases:
            refused(CacheFileError, rf"crafted.kva: .*{pattern}", KVCache.load, crafted(**changes))

        # 150 bytes that describe an 8 TiB arena: refused before allocating
        tiny = crafted(payload=b"", shape=[1, 2, 1, 1, 2**40, 1], seq_lens=[0], evicted=[0],
                       payload_bytes=0)
        assert os.path.getsize(tiny) < 200
        tracemalloc.start()
        refused(CacheFileError, r"needs an arena of shape \\(1, 2, 1, 1, 1099511627776, 1\\) "
                r"\\(8796093022208 bytes\\), more than the memory available now", KVCache.load, tiny)
        refused(CacheFileError, r"more than max_arena_bytes \\(1000000 bytes\\)", KVCache.load, tiny,
                max_arena_bytes=10**6)
        refused(CacheFileError, "more than the memory available", KVCache.load, "good.kva",
                max_seq_len=2**40)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20, tracemalloc.get_traced_memory()
        tracemalloc.stop()

        # the bound is the caller's: a good file with room to grow loads within it
        assert KVCache.load("good.kva", max_seq_len=4096).max_seq_len == 4096
        refused(CacheFileError, r"more than max_arena_bytes \\(65536 bytes\\)", KVCache.load,
                "good.kva", max_seq_len=4096, max_arena_bytes=65536)
        # the arena is 2 * 2 * 2 * 2 * 8 * 4 float32 = 2048 bytes: the bound is inclusive
        assert KVCache.load("good.kva", max_arena_bytes=2048).seq_lens.tolist() == [3, 3]
        refused(CacheFileError, r"\\(2048 bytes\\), more than max_arena_bytes \\(2047 bytes\\)",
                KVCache.load, "good.kva", max_arena_bytes=2047)
        assert sorted(os.listdir(".")) == ["crafted.kva", "good.kva"]

        # a mapped file's lengths are checked at open
        filled(path="m.kvm")
        gc.collect()
        with open("m.kvm", "rb") as f:
            header_len = struct.unpack_from("<8sII", f.read(16))[2]
        state_offset = -(-(16 + header_len) // 8) * 8    # [seq_lens | evicted | written_end | ring_head]
        for state, pattern in [([3, 3, -1, 0, 3], r"evicted must be in \\[0, 9223372036854775807\\]; "
                                                  r"got evicted\\[0\\] = -1"),
                               ([3, 3, 0, 0, 9], r"written_end must be in \\[0, 8\\]; got written_end\\[0\\] = 9"),
                               ([3, 3, 0, 0, -5], "written_end must be"),
                               # no window: every ring head is 0
                               ([3, 3, 0, 0, 3, 0, 1], r"ring_head must be in \\[0, 0\\]; got ring_head\\[1\\] = 1"),
                               ([3, 2**62, 0, 0, 3], r"seq_lens must be in \\[0, 8\\]; "
                                                 r"got seq_lens\\[1\\] = 4611686018427387904")]:
            with open("m.kvm", "r+b") as f:
                os.pwrite(f.fileno(), np.array(state, "<i8").tobytes(), state_offset)
            before = digest("m.kvm")
            for mode in ("r+", "c"):
                refused(CacheFileError, rf"m.kvm: {pattern}", KVCache.open, "m.kvm", mode)
            assert digest("m.kvm") == before
    ''', tmp_path)


# -- 9. lazy reset -------------------------------------------------------------------------

def test_lazy_reset_commits_no_untouched_page(tmp_path):
    run('''
        MIB = 1 << 20
        # 256 MiB: 8 layers x K/V x 4 rows x 8 heads x 2048 positions x 64 dims x float32
        cache = KVCache(4, 2048, 8, 8, 64, lazy=True)
        k = np.ones((4, 8, 1024, 64), np.float32)
        start = resident()
        cache.update(0, k, k)                 # layer 0 only: 16 MiB written
        cache.advance(1024)
        written = resident() - start
        # up to all of layer 0's 32 MiB where NumPy's arena gets huge pages,
        # plus what the process's first update faults in besides the arena
        # (code pages of NumPy and kvarena: 0.24 MiB over 2 MiB once, in a
        # fresh clone), the same 4 MiB allowed to reset below
        assert 16 * MIB <= written <= 32 * MIB + 4 * MIB, written / MIB
        cache.reset()
        grown = resident() - start - written
        # zeroing positions 0..1023 of every layer would commit 7 more layers:
        # 112 MiB, or 224 MiB with huge pages
        assert grown < 4 * MIB, f"reset committed {grown / MIB:.0f} MiB of untouched pages"
        assert cache.seq_pos == 0 and not cache._arena[0].any()
        print("reset committed", grown // 1024, "KiB")

        # and every bit written is gone, -0.0 included, in every dtype
        for dtype in (np.float16, np.float32, np.float64):
            c = KVCache(2, 8, 2, 2, 4, dtype=dtype, lazy=True)
            z = np.full((2, 2, 3, 4), -0.0)
            c.update(1, z, z)
            c.update(0, block(c, T=5), z[:, :, :1].repeat(5, axis=2))
            c.reset()
            assert c._arena.tobytes() == bytes(c._arena.nbytes), dtype
    ''', tmp_path)


# -- 10. kill -9 during save -----------------------------------------------------------------

SLOW_SAVE = '''
    import signal
    import kvarena.storage as storage
    # Ctrl-C raises KeyboardInterrupt even where SIGINT came in ignored (a
    # shell starts background jobs so, and Python then leaves it ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cache = filled(B=1, S=4096, L=4, H=4, D=64, n=4000)       # a 31 MiB snapshot, in 8 blocks
    cache.save("snap.kva")
    real_crc32 = zlib.crc32
    calls = []

    class SlowZlib:
        def crc32(self, data, value=0):
            calls.append(1)
            if len(calls) == 5:                # a few blocks are written: stop here
                open("saving", "w").close()
                time.sleep(120)
            return real_crc32(data, value)

    storage.zlib = SlowZlib()
    filled(B=1, S=4096, L=4, H=4, D=64, n=4000, seed=9).save("snap.kva")
'''


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill -9", "Ctrl-C"])
def test_killed_or_interrupted_save_leaves_the_old_file_and_no_temporary(tmp_path, sig):
    child = spawn(SLOW_SAVE, tmp_path)
    try:
        wait_for(tmp_path / "saving", child)
        old = sha256(tmp_path / "snap.kva")
        # the partial snapshot exists (as an open, unnamed file): the kill is midway
        fds = os.listdir(f"/proc/{child.pid}/fd")
        partial = [os.path.getsize(f"/proc/{child.pid}/fd/{fd}") for fd in fds
                   if str(tmp_path) in os.readlink(f"/proc/{child.pid}/fd/{fd}")]
        assert any(size > 1 << 20 for size in partial), partial
    finally:
        child.send_signal(sig)
        _, err = child.communicate(timeout=60)
    if sig == signal.SIGKILL:
        assert child.returncode == -signal.SIGKILL
    else:   # KeyboardInterrupt unwinds through save's cleanup
        assert child.returncode in (1, -signal.SIGINT) and "KeyboardInterrupt" in err, err
    assert sorted(os.listdir(tmp_path)) == ["saving", "snap.kva"]
    assert sha256(tmp_path / "snap.kva") == old
    run('assert KVCache.load("snap.kva").seq_lens.tolist() == [4000]', tmp_path)


# -- 11. what cannot be prevented ---------------------------------------------------------------

def test_truncating_a_mapped_file_is_a_sigbus_as_documented(tmp_path):
    # README, "What kvarena guarantees": another process truncating the file of
    # a mapped cache kills the process that maps it; flock is advisory
    source = PRELUDE + textwrap.dedent('''
        cache = filled(B=1, S=4096, L=1, H=1, D=64, n=1, path="m.kvm")
        with open("m.kvm", "r+b") as f:
            f.truncate(4096)
        cache.get(0)[0][..., -1, :].sum()
        cache.update(0, np.ones((1, 1, 4000, 64)), np.ones((1, 1, 4000, 64)))
    ''')
    proc = subprocess.run([sys.executable, "-c", source], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stderr)


# -- the accessor's own options ---------------------------------------------------

def test_accessor_options_are_checked_in_every_build(tmp_path):
    # the options that steer the kernel into other memory (a ring head, rotary
    # tables, int8 scales, the instruction set): before these checks each of
    # them crashed the process
    run('''
        from kvarena import _arena
        arena = np.zeros((1, 2, 2, 2, 8, 4), np.float32)
        acc = _arena.ArenaAccessor(arena, 1)
        q = np.zeros((2, 2, 1, 4), np.float32)
        out, base = np.empty_like(q), np.array([3, 3], np.intp)
        refused(ValueError, "isa must be in", acc.attend, 0, base, q, out, 99)
        refused(ValueError, "4-d", acc.attend, 0, base, q[0], out[0], 0)
        refused(ValueError, "ring_head must be C-contiguous intp with 2 entries",
                acc.positions, np.array([0], np.intp), 2)
        refused(ValueError, "ring_head must be", acc.positions, np.array([0, 0], np.int32), 2)
        refused(ValueError, "n_sink be in", acc.positions, np.array([0, 0], np.intp), 8)
        refused(ValueError, "go together", acc.positions, rope_cos=np.zeros((8, 2), np.float32))
        refused(ValueError, "rope tables must be", acc.positions,
                rope_cos=np.zeros((8, 3), np.float32), rope_sin=np.zeros((8, 3), np.float32))
        refused(ValueError, "rope tables must be", acc.positions,
                rope_cos=np.zeros((8, 2)), rope_sin=np.zeros((8, 2)))
        # tables in the arena: the kernel stores new rows while other threads read them
        refused(ValueError, "rope tables must not overlap the arena", acc.positions,
                rope_cos=np.zeros((8, 2), np.float32),
                rope_sin=arena.reshape(-1)[16:32].reshape(8, 2))
        # the ring's values change between calls: checked at each, by both entry points
        ring = np.array([0, 0], np.intp)
        acc.positions(ring, 2)
        ring[1] = 7
        refused(ValueError, r"ring_head\\[1\\] must be in \\[0, 6\\); got 7", acc.attend, 0, base,
                q, out, 0)
        ring[1] = 6
        refused(ValueError, r"ring_head\\[1\\] must be in \\[0, 6\\); got 6", acc.attend, 0, base,
                q, out, 0)
        refused(ValueError, "scales must be writable, C-contiguous, aligned float32",
                _arena.ArenaAccessor, np.zeros((1, 2, 2, 2, 8, 4), np.int8), 1)
        int8 = _arena.ArenaAccessor(np.zeros((1, 2, 2, 2, 8, 4), np.int8), 1,
                                    np.zeros((1, 2, 2, 2, 8), np.float32))
        wide = np.zeros((2, 3, 1, 4), np.float32)
        refused(ValueError, r"store: key must be C-contiguous, aligned, native float32 "
                r"\\(2, 2, T, 4\\)", int8.store, 0, np.zeros((2, 1), np.intp), wide, wide, 0)
        refused(ValueError, "store: an int8 or float16 arena is needed", acc.store, 0,
                np.zeros((2, 1), np.intp), q, q, 0)
        refused(ValueError, "isa must be in", int8.store, 0,
                np.zeros((2, 1), np.intp), q, q, 99)
        # the lengths attend_plain reads and writes: B rows, writable, intp
        refused(RuntimeError, "call track", acc.attend_plain, 0, q, q, q, None, 0, False)
        lens, ring, written = np.zeros(2, np.intp), np.zeros(2, np.intp), np.zeros(1, np.intp)
        refused(ValueError, r"seq_lens must be a C-contiguous, writable intp array of shape "
                r"\\(2,\\); got array\\(\\[0\\]\\)", acc.track, lens[:1], ring, written)
        refused(ValueError, "ring must be", acc.track, lens, ring.astype(np.int32), written)
        refused(ValueError, "written must be", acc.track, lens, ring, lens)
        frozen = lens.copy()
        frozen.flags.writeable = False
        refused(ValueError, "seq_lens must be", acc.track, frozen, ring, written)
        refused(RuntimeError, "call track", acc.lengths_unchanged)
        # the one-step path checks its instruction set before it records or stores anything
        acc.positions()
        acc.track(lens, ring, written)
        refused(ValueError, "isa must be in", acc.attend_plain, 0, q, q + 1, q + 1, None, 99,
                False)
        assert written.tolist() == [0] and not arena.any()
    ''', tmp_path)


def test_accessor_indices_and_shapes_are_checked_in_every_build(tmp_path):
    # what the accessor is called with straight from Python (cache._accessor):
    # each of these read or wrote outside the arena in the release build
    # (some crashed the process, some corrupted memory silently) and raised
    # IndexError only in the bounds-checked one. Now a ValueError naming the
    # argument, in every build, with the arena as it was
    run('''
        from numpy.lib.stride_tricks import as_strided
        from kvarena import _arena
        cache = filled(B=2, S=8, L=2, H=2, D=4, n=3)
        acc, arena = cache._accessor, cache._arena
        base, q = np.array([3, 3], np.intp), np.zeros((2, 4, 1, 4), np.float32)
        out = np.empty_like(q)

        def attend(layer=0, base=base, q=q, out=out):
            return refused(ValueError, pattern, acc.attend, layer, base, q, out, 0, cache=cache)

        for layer in (2, 99, -1):
            pattern = rf"attend: layer must be in \\[0, 2\\); got {layer}"
            attend(layer)
            pattern = rf"attend_plain: layer must be in \\[0, 2\\); got {layer}"
            refused(ValueError, pattern, acc.attend_plain, layer, q, q[:, :2], q[:, :2], None, 0,
                    False, cache=cache)
        pattern = r"base\\[1\\] must be in \\[0, 7\\] \\(S - T, T = 1\\); got 8"
        attend(base=np.array([3, 8], np.intp))
        pattern = r"base\\[0\\] must be in \\[0, 6\\] \\(S - T, T = 2\\); got 7"
        attend(base=np.array([7, 0], np.intp), q=np.zeros((2, 2, 2, 4), np.float32),
               out=np.zeros((2, 2, 2, 4), np.float32))
        pattern = r"got -1"
        attend(base=np.array([0, -1], np.intp))
        pattern = r"base must be C-contiguous, aligned intp \\(2,\\); got "
        for bad in (np.array([3, 3], np.int32), np.array([3], np.intp), np.array([[3, 3]], np.intp),
                    np.array([3, 0, 3], np.intp)[::2], np.array([3, 3], ">i8")):
            attend(base=bad)
        pattern = r"q must be 4-d \\(2, G \\* 2, T, 4\\), G >= 1, T >= 1, and out of its shape"
        unaligned = np.zeros(4 * 32 + 1, np.uint8)[1:].view(np.float32).reshape(2, 4, 1, 4)
        for bad in (np.zeros((1, 4, 1, 4), np.float32), np.zeros((2, 3, 1, 4), np.float32),
                    np.zeros((2, 0, 1, 4), np.float32), np.zeros((2, 4, 1, 5), np.float32),
                    np.zeros((2, 4, 0, 4), np.float32), np.zeros((2, 4, 4), np.float32),
                    np.zeros((2, 4, 1, 4), np.float16), np.zeros((2, 4, 1, 4), ">f4"),
                    unaligned):
            attend(q=bad, out=np.zeros(bad.shape, np.float32))
        for bad in (np.zeros((2, 4, 2, 4), np.float32), np.zeros((2, 4, 1, 4), np.float16),
                    np.zeros((2, 4, 1, 4), ">f4"), unaligned):
            attend(out=bad)
        pattern = "out must be writable"
        frozen = np.zeros_like(q)
        frozen.flags.writeable = False
        attend(out=frozen)
        pattern = "out must overlap neither q nor the arena and its scales"
        attend(out=q)
        attend(out=arena.reshape(-1)[:q.size].reshape(q.shape))
        # zero strides: a query count no memory holds (the kernel's scratch
        # sizes, which grow with it, overflowed: a heap overflow)
        pattern = r"out must not overlap itself; got strides \\(0, 0, 0, 0\\)"
        huge = (2, 1 << 56, 1, 4)
        attend(q=as_strided(q, huge, (0, 0, 0, 0)),
               out=as_strided(np.zeros(1, np.float32), huge, (0, 0, 0, 0), writeable=True))

        slots = np.full((2, 1), 4, np.intp)
        key = np.ones((2, 2, 1, 4), np.float32)
        half = KVCache(2, 8, 2, 2, 4, dtype=np.float16)
        store = half._accessor.store
        for layer in (2, -1):
            refused(ValueError, rf"store: layer must be in \\[0, 2\\); got {layer}",
                    store, layer, slots, key, key, 0, cache=half)
        for slot in (8, -1, 1 << 40):
            bad = slots.copy()
            bad[1, 0] = slot
            refused(ValueError, rf"store: slots\\[1, 0\\] must be in \\[0, 8\\); got {slot}",
                    store, 0, bad, key, key, 0, cache=half)
        for bad in (slots.astype(np.int32), slots[:1], slots.astype(">i8")):
            refused(ValueError, r"store: slots must be intp \\(2, 1\\); got", store, 0, bad,
                    key, key, 0, cache=half)
        for bad in (key.astype(np.float64), np.ones((2, 2, 1, 8), np.float32)[..., ::2],
                    key.astype(">f4"), np.ones((2, 1, 1, 4), np.float32)):
            refused(ValueError, "store: value must be C-contiguous, aligned, native float32",
                    store, 0, slots, key, bad, 0, cache=half)
        refused(TypeError, "slots", store, 0, None, key, key, 0, cache=half)

        def move(src, dst, count, pattern):
            refused(ValueError, pattern, acc.move, *(np.array(a, np.intp) for a in
                                                   (src, dst, count)), cache=cache)
        move([0], [0], [1], r"move: src must be an intp array of 2 entries; got <i8 \\(1,\\)")
        move([0, 0], [0, 0, 0], [1, 1], r"move: dst must be an intp array of 2 entries")
        refused(ValueError, r"move: count must be an intp array of 2 entries; got list",
                acc.move, np.zeros(2, np.intp), np.zeros(2, np.intp), [1, 1], cache=cache)
        refused(ValueError, r"move: src must be", acc.move, np.zeros(2, np.int32),
                np.zeros(2, np.intp), np.zeros(2, np.intp), cache=cache)
        for src, dst, count in (([0, 6], [0, 0], [1, 3]), ([0, 0], [0, 6], [1, 3]),
                                ([0, 0], [0, 0], [1, -1]), ([0, -1], [0, 0], [1, 1]),
                                ([0, 0], [0, -1], [1, 1]),
                                ([0, 1 << 62], [0, 1 << 62], [1, 1 << 62])):    # sums overflow
            move(src, dst, count, r"move: row 1's ranges .* must lie in \\[0, 8\\]")

        unaligned = np.zeros(arena.nbytes + 1, np.uint8)[1:].view(np.float32).reshape(arena.shape)
        frozen = arena.copy()
        frozen.flags.writeable = False
        for bad in (arena[:, :, :, :, ::2], arena[0], arena.astype(">f4"),
                    arena.astype(np.int16), arena.tolist(), unaligned, frozen,
                    np.zeros((1, 1, 2, 2, 8, 4), np.float32), np.zeros((1, 3, 2, 2, 8, 4)),
                    *(np.zeros(shape, np.float32) for shape in
                      [(0, 2, 2, 2, 8, 4), (1, 2, 0, 2, 8, 4), (1, 2, 2, 0, 8, 4),
                       (1, 2, 2, 2, 0, 4), (1, 2, 2, 2, 8, 0)])):
            refused(ValueError, "arena must be a writable, C-contiguous, aligned",
                    _arena.ArenaAccessor, bad, 1)
        refused(ValueError, "num_threads must be >= 1; got 0", _arena.ArenaAccessor, arena, 0)
        int8 = np.zeros((1, 2, 2, 2, 8, 4), np.int8)
        frozen = np.zeros((1, 2, 2, 2, 8), np.float32)
        frozen.flags.writeable = False
        for scales in (np.zeros((1, 2, 2, 2, 16), np.float32)[..., ::2],
                       np.zeros((1, 2, 2, 2, 8), np.float64), np.zeros((1, 1, 1, 1, 1), np.float32),
                       np.zeros((1, 2, 2, 2, 8), np.float32).tolist(), frozen,
                       np.zeros(4 * 64 + 1, np.uint8)[1:].view(np.float32).reshape(1, 2, 2, 2, 8)):
            refused(ValueError, "scales must be writable, C-contiguous, aligned float32",
                    _arena.ArenaAccessor, int8, 1, scales)
    ''', tmp_path)


def test_accessor_index_arrays_are_copied_before_use(tmp_path):
    # an index array that shares memory with what the same call writes (out,
    # the arena) changed under the kernel or the copy loop once checked: a
    # position of 10**18 read after the check, and a crash. The accessor now
    # checks and reads its own copies: each call below does what it does
    # with an unshared copy of the same indices
    run('''
        from kvarena import _arena

        def rope(acc, S, D):
            angle = np.arange(S)[:, None] * 0.1 * (1 + np.arange(D // 2))
            acc.positions(rope_cos=np.cos(angle).astype(np.float32),
                          rope_sin=np.sin(angle).astype(np.float32))

        # base, and the ring heads, inside out: row 0's output overwrites row 1's entry
        for ring in (False, True):
            got, want = (_arena.ArenaAccessor(np.ones((1, 2, 2, 1, 8, 4), np.float32), 1)
                         for _ in range(2))
            q = np.ones((2, 1, 1, 4), np.float32)
            out, separate = np.zeros_like(q), np.zeros_like(q)
            inside = out.reshape(-1)[:4].view(np.intp)
            inside[:] = 0
            for acc, heads in ((got, inside), (want, np.zeros(2, np.intp))):
                rope(acc, 8, 4)
                if ring:
                    acc.positions(heads, 0)
            got.attend(0, np.zeros(2, np.intp) if ring else inside, q, out, 0)
            want.attend(0, np.zeros(2, np.intp), q, separate, 0)
            assert np.array_equal(out, separate), (ring, out, separate)

        # store's slots and move's counts inside the arena they write
        arena = np.zeros((1, 2, 2, 1, 8, 4), np.float16)
        slots = arena.reshape(-1)[:8].view(np.intp).reshape(2, 1)
        slots[:] = 0
        key = np.full((2, 1, 1, 4), 3.0, np.float32)
        _arena.ArenaAccessor(arena, 1).store(0, slots, key, key, 0)
        want = np.zeros_like(arena)
        _arena.ArenaAccessor(want, 1).store(0, np.zeros((2, 1), np.intp), key, key, 0)
        assert np.array_equal(arena, want)

        arena = np.zeros((2, 2, 2, 1, 8, 4), np.float32)
        arena[0, 0, 0, 0, 4:8] = 1
        want = arena.copy()
        count = arena.reshape(-1)[:4].view(np.intp)
        count[:] = [4, 0]
        want.reshape(-1)[:4].view(np.intp)[:] = [4, 0]
        _arena.ArenaAccessor(arena, 1).move(np.array([4, 0], np.intp), np.zeros(2, np.intp),
                                            count)
        _arena.ArenaAccessor(want, 1).move(np.array([4, 0], np.intp), np.zeros(2, np.intp),
                                           np.array([4, 0], np.intp))
        assert np.array_equal(arena, want)

        # attend_plain's tracked lengths inside the arena: the kernel's store
        # of the new keys turns them into ~10**18. The call goes on with the
        # lengths it began with (copied), and the next sees them changed: the
        # one-step path declines, the general one refuses them
        arena = np.zeros((1, 2, 2, 1, 8, 4), np.float32)
        acc = _arena.ArenaAccessor(arena, 1)
        lengths = arena[0, 0, 0, 0, 0].view(np.intp)
        lengths[:] = 0
        acc.track(lengths, np.zeros(2, np.intp), np.zeros(1, np.intp))
        acc.see_lengths()
        k = np.ones((2, 1, 1, 4), np.float32)
        assert np.array_equal(acc.attend_plain(0, k, k, k, None, 0, False), k)
        assert lengths.tolist() == [np.ones(2, np.float32).view(np.intp)[0]] * 2
        assert acc.attend_plain(0, k, k, k, None, 0, False) is None
        refused(ValueError, r"base\\[0\\] must be in \\[0, 7\\]", acc.attend, 0, lengths, k,
                np.empty_like(k), 0)
    ''', tmp_path)
