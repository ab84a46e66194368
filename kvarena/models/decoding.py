"""Token checks, sampling and the decode loop that the reference models share.

``decode`` runs one batch of prompts, of equal or different lengths, with
or without a cache, through any model's ``forward(tokens, start_pos)``.
"""

import math

import numpy as np

from kvarena.checks import check_positive, check_real


def check_tokens(tokens, name, ndim, vocab_size, also=""):
    """``tokens`` as an integer array of ``ndim`` dimensions holding ids in [0,
    vocab_size); ``also`` names what else the caller takes, for the message."""
    try:
        tokens = np.asarray(tokens)
    except ValueError as exc:           # a nesting NumPy cannot make one array of
        raise ValueError(f"{name} must be an array of token ids{also}; got {tokens!r:.80} "
                         f"({exc})") from None
    if tokens.size == 0:                # before the dtype: [] is float64 to NumPy
        raise ValueError(f"{name} must hold at least one token; got shape {tokens.shape}")
    if tokens.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integer token ids; got dtype {tokens.dtype}")
    if tokens.ndim not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dimensions; "
                         f"got shape {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"{name} must be ids in [0, vocab_size = {vocab_size}); "
                         f"got values in [{tokens.min()}, {tokens.max()}]")
    return tokens


def prompts(prompt_tokens, vocab_size):
    """``(list of 1-D prompts, ragged)``, each checked."""
    try:                                # np.ndim fails on a nesting it cannot make an array of
        ragged = isinstance(prompt_tokens, (list, tuple)) and len(prompt_tokens) > 0 \
            and all(np.ndim(p) == 1 for p in prompt_tokens) \
            and len({len(p) for p in prompt_tokens}) > 1
    except ValueError:
        ragged = False                  # check_tokens below names it
    if ragged:
        return [check_tokens(p, f"prompt_tokens[{i}]", (1,), vocab_size)
                for i, p in enumerate(prompt_tokens)], True
    batch = check_tokens(prompt_tokens, "prompt_tokens", (1, 2), vocab_size,
                         " or a list of 1-D prompts")
    return list(np.atleast_2d(batch)), False


def check_generate(max_new_tokens, use_cache, temperature):
    """``(max_new_tokens, temperature)``: a positive int and a float >= 0, after
    checking ``use_cache``."""
    max_new_tokens = check_positive("max_new_tokens", max_new_tokens)
    if not isinstance(use_cache, (bool, np.bool_)):
        raise TypeError(f"use_cache must be a bool; got {use_cache!r}")
    t = check_real("temperature", temperature)
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature must be a finite number >= 0; got {temperature!r:.80}")
    return max_new_tokens, t


def decode(forward, prompt_list, ragged, max_new_tokens, temperature, seed, cache=None):
    """Extend each prompt by ``max_new_tokens`` tokens.

    Parameters
    ----------
    forward : callable ``forward(tokens, start_pos)`` -> logits (B, T, vocab_size)
        With a cache, it must write the cache at ``start_pos`` (None: each
        row's committed length) and not advance it.
    prompt_list : list of 1-D int arrays
    ragged : bool
        The prompts have different lengths.
    max_new_tokens : int
    temperature : float
    seed : int or None
    cache : KVCache or a cache with ``reset`` and ``advance``, optional
        Reset first. With it, the prompts go through one right-padded
        forward call (prefill) and each row commits its own length
        (``advance(lengths)``), so no real token attends to padding; then
        one token per call. Without it, every step runs the whole sequence
        (each row on its own when ragged).

    Returns
    -------
    out : ndarray of int64, shape (B, longest prompt + max_new_tokens)
        Right-padded with 0.
    ends : ndarray of int, shape (B,)
        Each row's length in ``out``.
    """
    rng = np.random.default_rng(seed)
    lengths = np.array([len(p) for p in prompt_list])
    B, T = len(prompt_list), int(lengths.max())
    out = np.zeros((B, T + max_new_tokens), dtype=np.int64)   # right-padded with 0
    for row, prompt in zip(out, prompt_list):
        row[:len(prompt)] = prompt
    rows, ends = np.arange(B), lengths.copy()     # ends[b]: row b's length so far
    if cache is not None:
        cache.reset()
        logits = forward(out[:, :T], 0)[rows, ends - 1]
        cache.advance(lengths if ragged else T)
        for step in range(max_new_tokens):
            out[rows, ends] = sample(logits, temperature, rng)
            ends += 1
            if step < max_new_tokens - 1:
                logits = forward(out[rows, ends - 1][:, None], None)[:, -1]
                cache.advance(1)
        return out, ends
    for _ in range(max_new_tokens):
        if ragged:   # each row on its own: no padding in any forward pass
            logits = np.stack([forward(out[b:b + 1, :ends[b]], 0)[0, -1] for b in range(B)])
        else:
            logits = forward(out[:, :ends[0]], 0)[:, -1]
        out[rows, ends] = sample(logits, temperature, rng)
        ends += 1
    return out, ends


def sample(logits, temperature, rng):
    """One token id per row of ``logits`` (batch_size, vocab_size): argmax at temperature 0."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64)
    # the max subtracted before dividing: a temperature small enough to
    # overflow sends the others to -inf (weight 0), its limit being argmax,
    # and a -inf logit (a banned token) stays a weight of 0
    with np.errstate(over="ignore"):
        z = (z - z.max(axis=-1, keepdims=True)) / temperature
    cdf = np.cumsum(np.exp(z), axis=-1)
    u = rng.random((len(logits), 1)) * cdf[:, -1:]
    return (cdf < u).sum(axis=-1)


def result(out, ends, ragged, prompt_tokens):
    """What ``generate`` returns: a list of rows when ragged, else ``out`` (1-D for a 1-D prompt)."""
    if ragged:
        return [row[:end] for row, end in zip(out, ends)]
    return out if np.ndim(prompt_tokens) == 2 else out[0]
