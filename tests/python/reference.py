"""The fp64 reference of the Python tests: the mask semantics text of issue 17, written out directly."""
from __future__ import annotations

import numpy as np

# Problems the tests run: (name, heads, kv_heads, mask arguments of ring_attention).
CASES = [
    ("dense", 2, 2, {}),
    ("causal", 2, 1, {"causal": True}),
    ("window_causal", 2, 2, {"causal": True, "window": (5, 0)}),
    ("window_both", 2, 2, {"window": (3, 2)}),
    ("docs_causal", 2, 2, {"causal": True, "doc_lens": "thirds"}),
    ("stride_causal", 2, 2, {"causal": True, "stride": 3}),
    ("global_window_docs", 2, 2, {"causal": True, "window": (2, 0), "global_tokens": 2, "doc_lens": "thirds"}),
    ("mask_heads_gqa", 4, 2, {"window": (1, 1), "mask_heads": 2}),
]


def resolve(mask: dict, seq_len: int) -> dict:
    """A case's mask with doc_lens 'thirds' turned into lengths summing to seq_len."""
    mask = dict(mask)
    if mask.get("doc_lens") == "thirds":
        a = seq_len // 3
        mask["doc_lens"] = (a, seq_len - 2 * a - 1, a + 1)
    return mask


def visible(seq_len: int, heads: int, *, causal=False, window=None, doc_lens=None, stride=None, global_tokens=0,
            mask_heads=0) -> np.ndarray:
    """(heads, seq_len, seq_len) bool: query i of head h sees key j."""
    i = np.arange(seq_len)[:, None]
    j = np.arange(seq_len)[None, :]
    base = np.ones((seq_len, seq_len), bool)
    lens = list(doc_lens) if doc_lens else [seq_len]
    doc = np.repeat(np.arange(len(lens)), lens)
    start = np.repeat(np.cumsum([0] + lens[:-1]), lens)
    base &= doc[i] == doc[j]  # same document
    if causal:
        base &= j <= i
    patterns = []
    if window is not None:
        left, right = window
        w = np.ones_like(base)
        if left >= 0:
            w &= j >= i - left
        if right >= 0:
            w &= j <= i + right
        patterns.append(w)
    if stride:
        patterns.append((i - j) % stride == 0)
    if global_tokens:
        first = (np.arange(seq_len) - start) < global_tokens  # among the first N of its document
        patterns.append(first[i] | first[j])
    patterned = base & np.logical_or.reduce(patterns) if patterns else base
    out = np.empty((heads, seq_len, seq_len), bool)
    for h in range(heads):
        out[h] = patterned if (mask_heads == 0 or h < mask_heads) else base
    return out


def attention_numpy(q, k, v, scale, vis):
    """fp64 forward: q (B, S, H, D), k, v (B, S, Hkv, D), vis (H, S, S) -> out (B, S, H, D), lse (B, H, S)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    s = np.einsum("bihd,bjhd->bhij", q, k) * scale
    s = np.where(vis[None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    l = p.sum(-1, keepdims=True)
    out = np.einsum("bhij,bjhd->bihd", p / np.where(l > 0, l, 1.0), v)
    with np.errstate(divide="ignore"):
        lse = (np.log(l) + m)[..., 0]
    return out, lse
