"""Random call sequences against a plain NumPy model of the cache.

A Hypothesis state machine drives one small KVCache through update /
advance / get / attend / reset, valid and invalid (out-of-range layer,
T = 0 or past max_seq_len, n <= 0 or past capacity, wrong head_dim), and after
every step compares it with a model: a zeroed array of the arena's shape
holding what was written, and seq_pos.

Model rules, from the SPEC:
- update and attend write positions seq_pos .. seq_pos + T - 1 of one layer
  (in the arena's dtype) and do not advance;
- advance(n) adds n to seq_pos; reset zeroes everything written and sets
  seq_pos to 0 (the arena was zero at construction, so the model is zero);
- attend returns attend_reference over the model's layer in float64, to a
  float32 tolerance (float16 arenas compute in float32);
- an invalid call raises and changes neither the cache nor the model.

Statistics: ``--hypothesis-show-statistics`` shows, per example, which
steps ran valid and invalid, the run length and whether seq_pos reached max_seq_len;
``test_statistics`` prints totals (with ``-s``) and asserts the run covered
what it claims.
"""

from collections import Counter

import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvarena import KVCache, attend_reference

MAX_EXAMPLES = 1000
STEPS = 30

STATS = {"examples": 0, "longest_run": 0, "max_seq_pos": 0, "full": 0, "outcomes": Counter()}

# half the draws from a range that is mostly valid, half from one with edges
# that are always invalid (L <= 2 layers, S <= 8 positions)
layers = st.integers(0, 1) | st.integers(-1, 2)
lengths = st.integers(1, 3) | st.integers(0, 9)
seeds = st.integers(0, 2**32 - 1)


class CacheMachine(RuleBasedStateMachine):

    @initialize(B=st.integers(1, 2), H=st.integers(1, 2), S=st.integers(1, 8),
                D=st.integers(1, 4), L=st.integers(1, 2),
                dtype=st.sampled_from(["float32", "float64", "float16"]),
                num_threads=st.sampled_from([1, 2]))
    def build(self, B, H, S, D, L, dtype, num_threads):
        self.cache = KVCache(B, S, L, H, D, dtype=dtype, num_threads=num_threads)
        self.model = np.zeros((L, 2, B, H, S, D), dtype=dtype)
        self.seq_pos = 0
        self.steps = 0
        self.longest = 0

    # -- helpers -------------------------------------------------------------

    def block(self, T, seed, D=None):
        c = self.cache
        shape = (c.batch_size, c.num_heads, T, c.head_dim if D is None else D)
        return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)

    def fits(self, T):
        return 1 <= T <= self.cache.max_seq_len - self.seq_pos

    def layer_ok(self, layer):
        return 0 <= layer < self.cache.num_layers

    def record(self, name, valid):
        self.steps += 1
        outcome = f"{name} {'valid' if valid else 'invalid'}"
        STATS["outcomes"][outcome] += 1
        event(outcome)

    def rejects(self, call):
        """``call`` raises ValueError and leaves the cache as it was."""
        before = self.cache._arena.tobytes(), self.cache.seq_pos
        with pytest.raises(ValueError):
            call()
        assert (self.cache._arena.tobytes(), self.cache.seq_pos) == before

    def write_model(self, layer, k, v):
        T = k.shape[2]
        self.model[layer, 0, :, :, self.seq_pos:self.seq_pos + T] = k
        self.model[layer, 1, :, :, self.seq_pos:self.seq_pos + T] = v

    # -- rules ---------------------------------------------------------------

    @rule(layer=layers, T=lengths, seed=seeds)
    def update(self, layer, T, seed):
        k, v = self.block(T, seed), self.block(T, seed + 1)
        valid = self.layer_ok(layer) and self.fits(T)
        self.record("update", valid)
        if not valid:
            self.rejects(lambda: self.cache.update(layer, k, v))
            return
        self.cache.update(layer, k, v)
        self.write_model(layer, k, v)

    @rule(layer=st.integers(0, 1), T=st.integers(1, 2), seed=seeds)
    def update_wrong_head_dim(self, layer, T, seed):
        self.record("update wrong head_dim", False)
        k = self.block(T, seed, D=self.cache.head_dim + 1)
        self.rejects(lambda: self.cache.update(layer, k, k))

    @rule(n=st.integers(1, 3) | st.integers(-1, 9))
    def advance(self, n):
        valid = 1 <= n <= self.cache.max_seq_len - self.seq_pos
        self.record("advance", valid)
        if not valid:
            self.rejects(lambda: self.cache.advance(n))
            return
        self.cache.advance(n)
        self.seq_pos += n

    @rule(layer=layers)
    def get(self, layer):
        valid = self.layer_ok(layer)
        self.record("get", valid)
        if not valid:
            self.rejects(lambda: self.cache.get(layer))
            return
        keys, values = self.cache.get(layer)
        assert keys.shape == values.shape == self.model.shape[2:4] + (self.seq_pos, self.model.shape[-1])
        assert np.array_equal(keys, self.model[layer, 0, :, :, :self.seq_pos])
        assert np.array_equal(values, self.model[layer, 1, :, :, :self.seq_pos])
        assert not keys.flags.writeable and not values.flags.writeable
        if self.seq_pos:   # an empty view shares no memory with anything
            assert np.shares_memory(keys, self.cache.arena)

    @rule(layer=layers, T=lengths, seed=seeds, scale=st.sampled_from([1.0, 8.0]))
    def attend(self, layer, T, seed, scale):
        q = self.block(T, seed) * np.float32(scale)
        k, v = self.block(T, seed + 1), self.block(T, seed + 2)
        valid = self.layer_ok(layer) and self.fits(T)
        self.record("attend", valid)
        if not valid:
            self.rejects(lambda: self.cache.attend(layer, q, k, v))
            return
        out = self.cache.attend(layer, q, k, v)
        self.write_model(layer, k, v)
        B = self.cache.batch_size
        want = attend_reference(q, self.model[layer, 0], self.model[layer, 1], [self.seq_pos] * B)
        if self.cache.dtype == np.float64:
            assert out.dtype == np.float64
            np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
        else:
            assert out.dtype == np.float32
            np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)

    @rule()
    def reset(self):
        self.record("reset", True)
        self.cache.reset()
        self.model[...] = 0
        self.seq_pos = 0

    # -- checked after every step ---------------------------------------------

    @invariant()
    def matches_model(self):
        assert self.cache.seq_pos == self.seq_pos
        assert self.cache.arena.tobytes() == self.model.tobytes()
        self.longest = max(self.longest, self.seq_pos)

    def teardown(self):
        if not hasattr(self, "cache"):
            return
        STATS["examples"] += 1
        STATS["longest_run"] = max(STATS["longest_run"], self.steps)
        STATS["max_seq_pos"] = max(STATS["max_seq_pos"], self.longest)
        STATS["full"] += self.longest == self.cache.max_seq_len
        # events, not hypothesis.target: targeting the run length made
        # Hypothesis pick the argument-free reset for most steps
        event("run length", f"{self.steps // 10 * 10}-{self.steps // 10 * 10 + 9} steps")
        event("filled the cache", str(self.longest == self.cache.max_seq_len))


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=MAX_EXAMPLES, stateful_step_count=STEPS,
                                     deadline=None)


def test_statistics():
    """The machine ran enough examples and took every rule both ways."""
    if STATS["examples"] == 0:
        pytest.skip("run together with TestCacheMachine")
    print(f"\nstate machine: {STATS['examples']} examples, longest run {STATS['longest_run']} "
          f"steps, highest seq_pos {STATS['max_seq_pos']}, {STATS['full']} examples filled "
          f"their cache")
    for outcome, count in sorted(STATS["outcomes"].items()):
        print(f"  {outcome:28} {count}")
    assert STATS["examples"] >= MAX_EXAMPLES
    assert STATS["longest_run"] >= STEPS - 1
    assert STATS["max_seq_pos"] == 8
    for name in ("update", "advance", "get", "attend"):
        assert STATS["outcomes"][f"{name} valid"] > 0
        assert STATS["outcomes"][f"{name} invalid"] > 0
