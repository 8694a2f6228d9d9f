"""The ctypes binding with numpy only: version, layouts from the library, a world-1 ring and the library's reference vs reference.py."""
import ctypes
import math

import numpy as np
import pytest

import ringattn
from ringattn import _abi

from reference import CASES, attention_numpy, resolve, visible


def c(a: np.ndarray) -> _abi.Tensor:
    codes = {np.dtype(np.float64): _abi.DTYPE_F64, np.dtype(np.float32): _abi.DTYPE_F32}
    return _abi.tensor(a.ctypes.data, codes[a.dtype], a.shape)


def problem(q, k, mask, layout="contiguous", world=1):
    mask = dict(mask)
    return _abi.Problem(batch=q.shape[0], seq_len=q.shape[1] * world, heads=q.shape[2], kv_heads=k.shape[2],
                        head_dim=q.shape[3], dtype=_abi.DTYPE_F64 if q.dtype == np.float64 else _abi.DTYPE_F32,
                        layout=layout, causal=mask.get("causal", False), window=mask.get("window"),
                        doc_lens=mask.get("doc_lens"), stride=mask.get("stride", 0) or 0,
                        global_tokens=mask.get("global_tokens", 0), mask_heads=mask.get("mask_heads", 0))


def test_api_version():
    major, minor = ringattn.api_version()
    assert major == _abi.API_MAJOR and minor >= _abi.API_MINOR_NEEDED


@pytest.mark.parametrize("name,heads,kv_heads,mask", CASES, ids=[x[0] for x in CASES])
def test_ring_and_library_reference_match_reference_py(name, heads, kv_heads, mask):
    seq, dim = 30, 4
    mask = resolve(mask, seq)
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, seq, heads, dim))
    k = rng.standard_normal((2, seq, kv_heads, dim))
    v = rng.standard_normal((2, seq, kv_heads, dim))
    want_out, want_lse = attention_numpy(q, k, v, 1 / math.sqrt(dim), visible(seq, heads, **mask))
    p = problem(q, k, mask)
    out, lse = np.empty_like(q), np.empty((2, heads, seq))
    _abi.reference(p, c(q), c(k), c(v), c(out), c(lse))
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-12)
    ring = _abi.Ring(p, _abi.TRANSPORT_LOCAL)
    assert (ring.rank, ring.world, ring.local_seq) == (0, 1, seq)
    out2, lse2 = np.empty_like(q), np.empty((2, heads, seq))
    ring.forward(c(q), c(k), c(v), c(out2), c(lse2))
    np.testing.assert_allclose(out2, want_out, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(lse2, want_lse, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", sorted(_abi.LAYOUTS))
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_layout_positions_are_a_permutation(layout, world):
    seq = 256 * world if layout == "balanced" else 12 * world
    mask = resolve({"causal": True, "window": (17, 0), "doc_lens": "thirds"}, seq)
    q = np.zeros((1, seq // world, 2, 4))
    p = problem(q, q, mask, layout=layout, world=world)
    got = np.concatenate([_abi.layout_positions(p, world, r) for r in range(world)])
    assert sorted(got.tolist()) == list(range(seq))


def test_layout_positions_known():
    q = np.zeros((1, 4, 1, 4))
    assert _abi.layout_positions(problem(q, q, {}, "zigzag", 2), 2, 0) == [0, 1, 6, 7]
    assert _abi.layout_positions(problem(q, q, {}, "striped", 2), 2, 1) == [1, 3, 5, 7]


def test_errors_are_python_exceptions():
    q = np.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="window"):
        _abi.Ring(problem(q, q, {"window": (-2, 0)}), _abi.TRANSPORT_LOCAL)
    with pytest.raises(ValueError):
        _abi.layout_positions(problem(q, q, {}, "zigzag", 1), 2, 2)
    with pytest.raises((ValueError, RuntimeError)):
        _abi.layout_positions(problem(q, q, {}, "zigzag", 1), 3, 0)  # 8 tokens over 3 ranks


@pytest.mark.parametrize("layout", sorted(_abi.LAYOUTS))
@pytest.mark.parametrize("world", [2, 3])
def test_loopback_rings_match_layout_positions_and_reference(layout, world):
    """world loopback ranks in one process, one thread each: every ring's positions equal
    ringattn_layout_positions, and the chunks of the forward equal the numpy reference."""
    import threading
    seq = 256 * world if layout == "balanced" else 12 * world
    mask = resolve({"causal": True, "window": (29, 0), "doc_lens": "thirds"}, seq)
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((1, seq, 2, 4)) for _ in range(3))
    want_out, want_lse = attention_numpy(q, k, v, 1 / math.sqrt(4), visible(seq, 2, **mask))
    p = problem(q[:, : seq // world], k[:, : seq // world], mask, layout=layout, world=world)
    lb = ctypes.c_void_p()
    _abi.check(_abi.lib().ringattn_loopback_create(world, -1, 60000.0, ctypes.byref(lb)))
    results, errors = {}, []

    def rank_main(r):
        try:
            spec, keep = p.to_c()
            t = _abi.TransportDesc(struct_size=ctypes.sizeof(_abi.TransportDesc), kind=_abi.TRANSPORT_LOOPBACK, rank=r,
                                   loopback=lb, timeout_ms=60000.0)
            o = _abi.RingOptions(struct_size=ctypes.sizeof(_abi.RingOptions), device=-1, embedded=0)
            h = ctypes.c_void_p()
            _abi.check(_abi.lib().ringattn_ring_create(ctypes.byref(spec), ctypes.byref(t), ctypes.byref(o),
                                                       ctypes.byref(h)))
            n = seq // world
            pos = (ctypes.c_int64 * n)()
            _abi.check(_abi.lib().ringattn_ring_positions(h, pos, n))
            idx = np.array(list(pos))
            ql, kl, vl = (np.ascontiguousarray(a[:, idx]) for a in (q, k, v))
            out, lse = np.empty_like(ql), np.empty((1, 2, n))
            b = ctypes.byref
            _abi.check(_abi.lib().ringattn_forward(h, b(c(ql)), b(c(kl)), b(c(vl)), b(c(out)), b(c(lse)), None, 0, None))
            _abi.lib().ringattn_ring_destroy(h)
            results[r] = (idx, out, lse)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(f"rank {r}: {e}")

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    _abi.lib().ringattn_loopback_destroy(lb)
    assert not errors, errors
    for r in range(world):
        idx, out, lse = results[r]
        assert idx.tolist() == _abi.layout_positions(p, world, r), f"rank {r}: ring and layout positions differ"
        np.testing.assert_allclose(out, want_out[:, idx], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(lse, want_lse[:, :, idx], rtol=1e-10, atol=1e-10)
