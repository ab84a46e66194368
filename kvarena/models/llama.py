"""A Llama-style decoder in NumPy: RMSNorm, rotary positions, SwiGLU, grouped-query attention.

Laid out as Meta's reference code and llama2.c name it (``tok_embeddings``,
``layers[i].attention.wq`` ... ``feed_forward.w1`` ..., ``norm``,
``output``), with seeded random weights. It does its own attention: with a
cache, each layer hands its queries, keys and values to ``cache.attend``,
which stores ``n_kv_heads`` K/V heads and serves all ``n_heads`` query
heads from them; without one, it repeats the K/V heads (``repeat_kv``) and
runs textbook attention over the whole sequence.

Shapes in comments: B batch rows, T new positions, H = n_heads query heads,
H_kv = n_kv_heads K/V heads, D = head_dim, E = dim. Activations are
(B, T, H, D), as in Meta's code; ``attend`` takes (B, H, T, D) views of them.

Rotary positions: keys are cached after rotation, at their absolute
position, unless the cache rotates by itself (``make_cache(...,
rotate_in_cache=True)``): then keys are cached unrotated and the kernel
rotates them by their place in the cache, which is what lets a
sliding-window cache stream past ``max_seq_len`` (StreamingLLM). The model
side of this happens in one place, ``Attention.rotate``.
"""

import numpy as np

from kvarena.attention import check_groups
from kvarena.cache import KVCache, check_rope_theta
from kvarena.checks import check_bool, check_float_dtype, check_int, check_positive
from kvarena.models import decoding
from kvarena.models.attention import Linear, causal_attention, repeat_kv

ROPE_STYLES = ("interleaved", "half")


def rope(x, positions, theta, style="interleaved"):
    """Rotary position embedding of ``x`` at ``positions``.

    Parameters
    ----------
    x : ndarray, shape (B, T, heads, D), D even
    positions : ndarray of int, shape (B, T) or (1, T)
        Absolute position of each token.
    theta : float
        Base of the frequencies: pair i turns by ``position * theta ** (-2i / D)``,
        i in [0, D/2).
    style : {"interleaved", "half"}
        Which dimensions form pair i: ``"interleaved"`` pairs 2i with 2i + 1
        (Meta's Llama, llama2.c); ``"half"`` pairs i with i + D/2 (GPT-NeoX,
        HF's ``rotate_half``). The two are the same rotation of differently
        ordered weights; a model's checkpoint decides which it needs.

    Returns
    -------
    ndarray, the shape and dtype of ``x``: each pair (a, b) becomes
    ``(a cos - b sin, a sin + b cos)``. Angles are computed in float64.
    """
    D = x.shape[-1]
    freqs = theta ** (-np.arange(0, D, 2) / D)                               # (D/2,)
    angles = np.asarray(positions, dtype=np.float64)[..., None, None] * freqs  # (B, T, 1, D/2)
    cos, sin = np.cos(angles).astype(x.dtype), np.sin(angles).astype(x.dtype)
    pairs = (slice(0, D, 2), slice(1, D, 2)) if style == "interleaved" \
        else (slice(0, D // 2), slice(D // 2, D))
    a, b = x[..., pairs[0]], x[..., pairs[1]]
    out = np.empty_like(x)
    out[..., pairs[0]] = a * cos - b * sin
    out[..., pairs[1]] = a * sin + b * cos
    return out


class RMSNorm:
    """``x / sqrt(mean(x ** 2) + eps) * weight`` over the last axis (no mean, no bias)."""

    def __init__(self, dim, dtype=np.float32, eps=1e-5):
        self.weight = np.ones(dim, dtype=dtype)
        self.eps = eps

    def forward(self, x):
        mean_square = np.add.reduce(x * x, axis=-1, keepdims=True) / x.shape[-1]
        return x * (1.0 / np.sqrt(mean_square + self.eps)) * self.weight


class FeedForward:
    """SwiGLU: ``w2(silu(w1(x)) * w3(x))``."""

    def __init__(self, dim, hidden_dim, rng, dtype=np.float32):
        self.w1 = Linear(dim, hidden_dim, rng, dtype, bias=False)
        self.w2 = Linear(hidden_dim, dim, rng, dtype, bias=False)
        self.w3 = Linear(dim, hidden_dim, rng, dtype, bias=False)

    def forward(self, x):
        gate = self.w1.forward(x)
        gate /= 1.0 + np.exp(-gate)                       # silu(g) = g * sigmoid(g)
        return self.w2.forward(gate * self.w3.forward(x))


class Attention:
    """Grouped-query causal self-attention with rotary positions.

    ``n_heads`` query heads share ``n_kv_heads`` K/V heads: query head h
    uses K/V head ``h // (n_heads // n_kv_heads)``.
    """

    def __init__(self, dim, n_heads, n_kv_heads, rng, dtype, rope_theta, rope_style):
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.rope_theta, self.rope_style = rope_theta, rope_style
        self.wq = Linear(dim, n_heads * self.head_dim, rng, dtype, bias=False)
        self.wk = Linear(dim, n_kv_heads * self.head_dim, rng, dtype, bias=False)
        self.wv = Linear(dim, n_kv_heads * self.head_dim, rng, dtype, bias=False)
        self.wo = Linear(n_heads * self.head_dim, dim, rng, dtype, bias=False)

    def forward(self, x, positions, cache=None, layer_idx=0):
        B, T, _ = x.shape
        H, H_kv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.wq.forward(x).reshape(B, T, H, D)         # (B, T, H, D)
        k = self.wk.forward(x).reshape(B, T, H_kv, D)      # (B, T, H_kv, D)
        v = self.wv.forward(x).reshape(B, T, H_kv, D)
        q, k = self.rotate(q, k, positions, cache)
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))   # (B, heads, T, D) views
        if cache is None:
            groups = H // H_kv
            out = causal_attention(q, repeat_kv(k, groups), repeat_kv(v, groups))
        else:
            # writes k, v after each row's cached positions, attends over both
            out = cache.attend(layer_idx, q, k, v)                # (B, H, T, D)
        return self.wo.forward(out.transpose(0, 2, 1, 3).reshape(B, T, H * D))

    def rotate(self, q, k, positions, cache):
        """``q`` and ``k`` as attention takes them: rotated at ``positions``.

        The one place where positions enter the model. A cache that rotates
        by itself (``cache.rope_theta`` set: it stores keys unrotated and
        rotates by position in the cache when attending) takes them as they are.
        """
        theta = getattr(cache, "rope_theta", None)
        if theta is None:
            return (rope(q, positions, self.rope_theta, self.rope_style),
                    rope(k, positions, self.rope_theta, self.rope_style))
        if (theta, cache.rope_style) != (self.rope_theta, self.rope_style):
            raise ValueError(f"cache rotates with rope_theta={theta}, rope_style="
                             f"{cache.rope_style!r}; the model needs rope_theta="
                             f"{self.rope_theta}, rope_style={self.rope_style!r}")
        return q, k


class TransformerBlock:
    """Pre-norm block: ``x + attention(attention_norm(x))``, then ``x + feed_forward(ffn_norm(x))``."""

    def __init__(self, dim, n_heads, n_kv_heads, hidden_dim, rng, dtype, rope_theta,
                 rope_style, norm_eps):
        self.attention_norm = RMSNorm(dim, dtype, norm_eps)
        self.attention = Attention(dim, n_heads, n_kv_heads, rng, dtype, rope_theta, rope_style)
        self.ffn_norm = RMSNorm(dim, dtype, norm_eps)
        self.feed_forward = FeedForward(dim, hidden_dim, rng, dtype)

    def forward(self, x, positions, cache=None, layer_idx=0):
        x = x + self.attention.forward(self.attention_norm.forward(x), positions, cache, layer_idx)
        return x + self.feed_forward.forward(self.ffn_norm.forward(x))


class Llama:
    """Llama-style decoder-only transformer with seeded random weights.

    Parameters
    ----------
    vocab_size, dim, n_layers, n_heads : int
        ``n_heads`` must divide ``dim``; ``head_dim = dim // n_heads``, even.
    max_seq_len : int
        Longest sequence ``generate`` produces, and the capacity of the
        caches ``make_cache`` builds. Rotary positions have no table: a
        forward call takes any position.
    n_kv_heads : int, optional
        K/V heads, dividing ``n_heads`` (grouped-query attention; 1 is
        multi-query). Default ``n_heads``.
    hidden_dim : int, optional
        Width of the SwiGLU layer. Default as llama2.c: ``2/3`` of ``4 * dim``,
        rounded up to a multiple of 32 (768 for dim 288).
    rope_theta : float, default 10000.0
    rope_style : {"interleaved", "half"}, default "interleaved"
        Meta's Llama and llama2.c rotate interleaved pairs (2i, 2i + 1); see
        ``rope``.
    norm_eps : float, default 1e-5
    seed : int, default 0
    dtype : dtype, default float32

    Notes
    -----
    A cache is passed explicitly (``forward(..., cache=)``,
    ``generate(..., cache=)``): a ``KVCache`` of ``n_kv_heads`` heads
    (``make_cache``), or any object with the same ``attend``, ``advance``,
    ``reset``, ``seq_lens`` (e.g. ``NumpyKVCache``). Keys are cached after
    rotation, at their absolute positions, unless the cache has a
    ``rope_theta``: then ``Attention.rotate`` leaves the rotation to the
    cache, which rotates by position in the cache. A sliding-window cache
    (``n_sink``) that rotates by itself is StreamingLLM: ``generate`` then
    runs past the cache's ``max_seq_len`` at constant memory. (A window
    that does not rotate would keep keys rotated at positions the model
    then attends from far away.)
    """

    def __init__(self, vocab_size, dim, n_layers, n_heads, max_seq_len, n_kv_heads=None,
                 hidden_dim=None, rope_theta=10000.0, rope_style="interleaved", norm_eps=1e-5,
                 seed=0, dtype=np.float32):
        self.vocab_size = check_positive("vocab_size", vocab_size)
        self.dim = check_positive("dim", dim)
        self.n_layers = check_positive("n_layers", n_layers)
        self.n_heads = check_positive("n_heads", n_heads)
        self.n_kv_heads = n_heads if n_kv_heads is None else check_positive("n_kv_heads", n_kv_heads)
        self.max_seq_len = check_positive("max_seq_len", max_seq_len)
        check_groups(self.n_heads, self.n_kv_heads, ("n_heads", "n_kv_heads"))
        if dim % n_heads or (dim // n_heads) % 2:
            raise ValueError(f"dim must be n_heads times an even head_dim (rotary pairs); "
                             f"got dim={dim}, n_heads={n_heads}")
        rope_theta = check_rope_theta(rope_theta)
        if rope_style not in ROPE_STYLES:
            raise ValueError(f"rope_style must be one of {ROPE_STYLES}; got {rope_style!r}")
        self.head_dim = dim // n_heads
        self.hidden_dim = 32 * -(-(8 * dim // 3) // 32) if hidden_dim is None \
            else check_positive("hidden_dim", hidden_dim)
        self.rope_theta, self.rope_style = rope_theta, rope_style
        dtype = check_float_dtype("dtype", dtype)
        rng = np.random.default_rng(seed)
        self.tok_embeddings = rng.standard_normal((vocab_size, dim)).astype(dtype)
        self.layers = [TransformerBlock(dim, n_heads, self.n_kv_heads, self.hidden_dim, rng, dtype,
                                        self.rope_theta, rope_style, norm_eps)
                       for _ in range(n_layers)]
        self.norm = RMSNorm(dim, dtype, norm_eps)
        self.output = Linear(dim, vocab_size, rng, dtype, bias=False)

    def make_cache(self, batch_size=1, max_seq_len=None, rotate_in_cache=False, **options):
        """A ``KVCache`` for this model: ``n_kv_heads`` heads of ``head_dim``, one per layer.

        ``max_seq_len`` defaults to the model's; ``options`` go to ``KVCache``
        (``n_sink=`` for a sliding window; ``dtype`` defaults to the
        model's). ``rotate_in_cache=True`` makes the
        cache rotate keys and queries by their position in the cache, with
        this model's ``rope_theta`` and ``rope_style``.
        """
        max_seq_len = self.max_seq_len if max_seq_len is None else max_seq_len
        options.setdefault("dtype", self.tok_embeddings.dtype)     # the model's own
        if check_bool("rotate_in_cache", rotate_in_cache):
            options.update(rope_theta=self.rope_theta, rope_style=self.rope_style)
        return KVCache(batch_size, max_seq_len, self.n_layers, self.n_kv_heads,
                       self.head_dim, **options)

    def forward(self, tokens, start_pos=None, cache=None):
        """Logits for ``tokens``; row ``b`` at positions ``start_pos[b] ..``.

        Parameters
        ----------
        tokens : array of int, shape (batch_size, T)
        start_pos : int or sequence of int, optional
            Position of the first token, for all rows or per row. Default:
            ``cache.seq_lens`` (each row continues where it stands), or 0.
        cache : KVCache or NumpyKVCache, optional
            Written at each row's committed length, not advanced: the
            caller advances it once per call.

        Returns
        -------
        ndarray, shape (batch_size, T, vocab_size)
        """
        tokens = decoding.check_tokens(tokens, "tokens", (2,), self.vocab_size)
        B, T = tokens.shape
        if cache is not None:
            self._check_cache(cache, B)
        if start_pos is None:
            start_pos = 0 if cache is None else cache.seq_lens
        positions = self._positions(start_pos, B, T)               # (B | 1, T)
        x = self.tok_embeddings[tokens]                            # (B, T, E)
        for layer_idx, layer in enumerate(self.layers):
            x = layer.forward(x, positions, cache, layer_idx)
        return self.output.forward(self.norm.forward(x))           # (B, T, vocab_size)

    def _positions(self, start_pos, B, T):
        if np.ndim(start_pos) == 0:
            start = check_int("start_pos", start_pos)
            if start < 0:
                raise ValueError(f"start_pos must be >= 0; got {start}")
            return (start + np.arange(T))[None]
        start = np.asarray(start_pos)
        if start.dtype.kind not in "iu" or start.shape != (B,) or start.min() < 0:
            raise ValueError(f"start_pos must be an int >= 0 or {B} of them, one per row; "
                             f"got {start_pos!r}")
        return start[:, None] + np.arange(T)

    def _check_cache(self, cache, B):
        want = (B, self.n_layers, self.n_kv_heads, self.head_dim)
        got = (cache.batch_size, cache.num_layers, cache.num_heads, cache.head_dim)
        if got != want:
            raise ValueError(f"cache must have (batch_size, num_layers, num_heads, head_dim) = "
                             f"{want} (num_heads: the model's n_kv_heads); got {got}")

    def generate(self, prompt_tokens, max_new_tokens, use_cache=True, temperature=0.0,
                 seed=None, cache=None):
        """Extend each prompt by ``max_new_tokens`` tokens; as ``GPT.generate``.

        With a cache, the prompts go through one right-padded prefill call,
        each row commits its own length, then one token per call; without,
        every step runs the whole sequence. Both give the same tokens.

        Parameters
        ----------
        prompt_tokens : array of int, shape (T,) or (batch_size, T), or a list of 1-D prompts
            A list of prompts of different lengths is a ragged batch.
        max_new_tokens : int
            The longest prompt plus ``max_new_tokens`` must not exceed
            ``max_seq_len`` (the cache's, when one is given), unless the
            cache is a sliding window that rotates by itself (``n_sink``
            and ``rotate_in_cache``): that one streams without limit.
        use_cache : bool, default True
        temperature : float, default 0
            0 is greedy; above 0, sampling from ``softmax(logits / temperature)``.
        seed : int, optional
            Seed of the sampler.
        cache : KVCache or NumpyKVCache, optional
            The cache to use (reset first). Default: a new ``make_cache(B)``.

        Returns
        -------
        int64 tokens: an array with the prompt's number of dimensions, or for
        a ragged batch a list of 1-D arrays.
        """
        prompts, ragged = decoding.prompts(prompt_tokens, self.vocab_size)
        max_new_tokens, temperature = decoding.check_generate(max_new_tokens, use_cache,
                                                              temperature)
        B, T = len(prompts), max(len(p) for p in prompts)
        if cache is not None and not use_cache:
            raise ValueError("cache given with use_cache=False")
        if use_cache and cache is None:
            cache = self.make_cache(B)
        if cache is not None:
            self._check_cache(cache, B)
        capacity = self.max_seq_len if cache is None else cache.max_seq_len
        streaming = (getattr(cache, "window", None) is not None
                     and getattr(cache, "rope_theta", None) is not None)
        if T + max_new_tokens > capacity and not streaming:
            raise ValueError(f"prompt length + max_new_tokens must be <= max_seq_len = "
                             f"{capacity}; got {T} + {max_new_tokens}")

        def forward(tokens, start_pos):
            return self.forward(tokens, start_pos, cache)

        out, ends = decoding.decode(forward, prompts, ragged, max_new_tokens, temperature,
                                    seed, cache)
        return decoding.result(out, ends, ragged, prompt_tokens)
