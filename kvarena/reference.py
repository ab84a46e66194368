"""The textbook NumPy attention that the kernel is checked against.

matmul, max-subtracted softmax, matmul: no tricks, so that it is easy to
trust. It is the test oracle (in float64) and nothing else: every storage
dtype has a compiled path (kvarena.kernel).
"""

import numpy as np


def attend_reference(q, keys, values, cached, dtype=np.float64):
    """Attention of new queries over cached and new positions, in NumPy.

    Parameters
    ----------
    q : ndarray, shape (B, G * H, T, D)
        Queries of the T new positions; query head h attends with key/value
        head h // G (grouped-query attention; G = 1 is multi-head).
    keys, values : ndarray, shape (B, H, S, D)
        Row b holds ``cached[b]`` cached positions followed by the T new
        ones; anything past ``cached[b] + T`` is ignored.
    cached : sequence of int, length B
        Positions cached in each batch row before the new block.
    dtype : dtype, default float64
        Precision of the whole computation and of the result.

    Returns
    -------
    ndarray, shape (B, G * H, T, D), of ``dtype``
        Query t of row b attends to positions ``0 .. cached[b] + t``.
    """
    q = np.asarray(q, dtype=dtype)
    B, Hq, T, D = q.shape
    G = Hq // keys.shape[1]
    out = np.empty(q.shape, dtype=dtype)
    for b in range(B):
        n = int(cached[b]) + T
        # (Hq, n, D): each key/value head repeated for its G query heads
        k = np.repeat(np.asarray(keys[b, :, :n], dtype=dtype), G, axis=0)
        v = np.repeat(np.asarray(values[b, :, :n], dtype=dtype), G, axis=0)
        scores = q[b] @ k.swapaxes(-1, -2) / np.sqrt(D)   # (Hq, T, n)
        # query t sees key j when j <= cached[b] + t
        visible = np.arange(n)[None, :] <= (n - T + np.arange(T))[:, None]
        scores = np.where(visible, scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        weights = np.exp(scores)
        weights /= weights.sum(axis=-1, keepdims=True)
        out[b] = weights @ v
    return out
