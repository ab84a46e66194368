"""The plain NumPy KV cache that NumPy ports of Llama write: the baseline kvarena is measured against."""

import numpy as np

from kvarena.models.attention import causal_attention, repeat_kv


class NumpyKVCache:
    """Preallocated per-layer key and value arrays, attended with ``repeat_kv`` and textbook attention.

    What a NumPy Llama port keeps (llama2.c's ``key_cache``/``value_cache``,
    HF's static cache): per layer, keys and values of ``(batch_size,
    num_heads, max_seq_len, head_dim)``. ``attend`` writes the new block,
    repeats the K/V heads up to q's head count (a copy of the whole
    context, per layer and step) and runs matmul, max-subtracted softmax,
    matmul in q's dtype (float16 in float32). Duck-compatible with the
    part of ``KVCache`` that ``Llama`` uses; no input checks beyond
    capacity: a baseline, not a library cache.

    Parameters
    ----------
    batch_size, max_seq_len, num_layers, num_heads, head_dim : int
        As for ``KVCache``; ``num_heads`` counts K/V heads.
    dtype : dtype, default float32
    """

    def __init__(self, batch_size, max_seq_len, num_layers, num_heads, head_dim, dtype=np.float32):
        self.batch_size, self.max_seq_len, self.num_layers = batch_size, max_seq_len, num_layers
        self.num_heads, self.head_dim = num_heads, head_dim
        shape = (num_layers, batch_size, num_heads, max_seq_len, head_dim)
        self.keys = np.zeros(shape, dtype)          # (L, B, H_kv, S, D)
        self.values = np.zeros(shape, dtype)
        self.seq_lens = np.zeros(batch_size, dtype=np.intp)

    @property
    def seq_pos(self):
        return int(self.seq_lens.max())

    def attend(self, layer_idx, q, k, v):
        """Write ``k``, ``v`` (B, H_kv, T, D) after each row's length; attention of ``q`` (B, H, T, D)."""
        T = k.shape[2]
        pos = int(self.seq_lens.max())
        if pos + T > self.max_seq_len:
            raise ValueError(f"Sequence position {pos + T - 1} >= max_seq_len {self.max_seq_len}")
        keys, values = self.keys[layer_idx], self.values[layer_idx]    # (B, H_kv, S, D)
        if (self.seq_lens == pos).all():       # one position for every row: one slice
            keys[:, :, pos:pos + T], values[:, :, pos:pos + T] = k, v
            cached = pos
        else:
            for b, start in enumerate(self.seq_lens):
                keys[b, :, start:start + T], values[b, :, start:start + T] = k[b], v[b]
            cached = self.seq_lens
        groups = q.shape[1] // self.num_heads
        return causal_attention(q, repeat_kv(keys[:, :, :pos + T], groups),
                                repeat_kv(values[:, :, :pos + T], groups), cached)

    def advance(self, n=1):
        """Commit ``n`` positions in every row, or ``n[b]`` in row ``b``."""
        self.seq_lens += np.asarray(n, dtype=np.intp)

    def reset(self):
        self.seq_lens[:] = 0
