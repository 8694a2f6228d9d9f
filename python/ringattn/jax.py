"""JAX op: ring attention on local chunks with custom_vjp, through XLA FFI handlers (libringattn_jax) or jax.pure_callback."""
from __future__ import annotations

import ctypes
import functools
import glob
import math
import os
import threading
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _abi

__all__ = ["ring_attention", "shard", "unshard", "positions", "ffi_available"]

_LOCAL, _MPI = "local", "mpi"


def _dtype_code(dtype) -> int:
    name = np.dtype(dtype).name
    codes = {"float64": _abi.DTYPE_F64, "float32": _abi.DTYPE_F32, "bfloat16": _abi.DTYPE_BF16,
             "float16": _abi.DTYPE_F16}
    if name not in codes:
        raise ValueError(f"ringattn: dtype {name} is not one of float64/float32/bfloat16/float16")
    return codes[name]


def _lse_dtype(dtype):
    return np.float64 if np.dtype(dtype).name == "float64" else np.float32


_rings_lock = threading.Lock()
_rings: dict = {}


def _world_rank(comm: str) -> Tuple[int, int]:
    if comm == _LOCAL:
        return 1, 0
    _, rank, world = _abi.mpi_world()
    return world, rank


def _ring(problem: _abi.Problem, comm: str) -> _abi.Ring:
    key = (problem, comm)
    with _rings_lock:
        ring = _rings.get(key)
        if ring is None:
            if comm == _LOCAL:
                ring = _abi.Ring(problem, _abi.TRANSPORT_LOCAL)
            else:
                ring = _abi.Ring(problem, _abi.TRANSPORT_MPI, mpi_comm=_abi.mpi_world()[0])
            _rings[key] = ring
        return ring


def _problem(q: np.ndarray, k: np.ndarray, mask: tuple, comm: str) -> _abi.Problem:
    causal, scale, window, doc_lens, stride, global_tokens, mask_heads, layout = mask
    world, _ = _world_rank(comm)
    b, s, h, d = q.shape
    return _abi.Problem(batch=b, seq_len=s * world, heads=h, kv_heads=k.shape[2], head_dim=d,
                        dtype=_dtype_code(q.dtype), layout=layout, causal=causal, softmax_scale=scale, window=window,
                        doc_lens=doc_lens, stride=stride, global_tokens=global_tokens, mask_heads=mask_heads)


def _c(a: np.ndarray) -> _abi.Tensor:
    return _abi.tensor(a.ctypes.data, _dtype_code(a.dtype), a.shape)


def _host_forward(q, k, v, *, mask, comm):
    q, k, v = (np.ascontiguousarray(a) for a in (q, k, v))
    ring = _ring(_problem(q, k, mask, comm), comm)
    out = np.empty(q.shape, q.dtype)
    lse = np.empty((q.shape[0], q.shape[2], q.shape[1]), _lse_dtype(q.dtype))
    ring.forward(_c(q), _c(k), _c(v), _c(out), _c(lse))
    return out, lse


def _host_backward(q, k, v, out, lse, dout, dlse, *, mask, comm, lse_grad):
    q, k, v, out, lse, dout, dlse = (np.ascontiguousarray(a) for a in (q, k, v, out, lse, dout, dlse))
    ring = _ring(_problem(q, k, mask, comm), comm)
    dq, dk, dv = (np.empty(a.shape, a.dtype) for a in (q, k, v))
    ring.backward(_c(q), _c(k), _c(v), _c(out), _c(lse), _c(dout), _c(dq), _c(dk), _c(dv))
    if lse_grad:
        # As in ringattn.torch: dq += scale * dlse * (P k), dk += scale * P^T (dlse q).
        scale = mask[1]
        w = np.ascontiguousarray(np.swapaxes(dlse, 1, 2)[..., None].astype(q.dtype))
        pk, lse2 = _host_forward(q, k, k, mask=mask, comm=comm)
        wq = np.ascontiguousarray(w * q)
        dk_lse, tmp_q, tmp_k = np.empty(k.shape, k.dtype), np.empty(q.shape, q.dtype), np.empty(k.shape, k.dtype)
        ring.backward(_c(q), _c(k), _c(k), _c(pk), _c(lse2), _c(wq), _c(tmp_q), _c(tmp_k), _c(dk_lse))
        dq = (dq + scale * w * pk).astype(q.dtype)
        dk = (dk + scale * dk_lse).astype(k.dtype)
    return dq, dk, dv


# ---- the XLA FFI path: libringattn_jax's CPU handlers, called with jax.ffi.ffi_call --------------------
_ffi_lock = threading.Lock()
_ffi_state: dict = {}


def _ffi_library() -> Optional[str]:
    env = os.environ.get("RINGATTN_JAX_LIBRARY")
    if env:
        return env
    found = sorted(glob.glob(os.path.join(os.path.dirname(_abi.library_path()), "libringattn_jax.so*")), key=len)
    return found[0] if found else None


def ffi_available() -> bool:
    """Whether the FFI handlers are there and registered (RINGATTN_JAX_IMPL=callback turns them off)."""
    if os.environ.get("RINGATTN_JAX_IMPL", "") == "callback":
        return False
    with _ffi_lock:
        if "ok" not in _ffi_state:
            path = _ffi_library()
            ok = False
            if path is not None and hasattr(jax, "ffi"):
                _abi.lib()  # libringattn_jax needs libringattn_c.so.1 loaded (or next to it)
                handle = ctypes.CDLL(path)
                jax.ffi.register_ffi_target("ringattn_forward", jax.ffi.pycapsule(handle.ringattn_jax_forward_cpu),
                                            platform="cpu")
                jax.ffi.register_ffi_target("ringattn_backward", jax.ffi.pycapsule(handle.ringattn_jax_backward_cpu),
                                            platform="cpu")
                _ffi_state["handle"] = handle
                ok = True
            _ffi_state["ok"] = ok
        return _ffi_state["ok"]


def _ffi_attrs(mask: tuple, comm: str, seq_local: int) -> dict:
    causal, scale, window, doc_lens, stride, global_tokens, mask_heads, layout = mask
    world, _ = _world_rank(comm)
    offsets = [0]
    for n in doc_lens or ():
        offsets.append(offsets[-1] + n)
    return dict(causal=bool(causal), scale=np.float64(scale), has_window=np.int64(window is not None),
                window_left=np.int64(window[0] if window else -1), window_right=np.int64(window[1] if window else -1),
                stride=np.int64(stride), global_tokens=np.int64(global_tokens), mask_heads=np.int64(mask_heads),
                layout=np.int64(_abi.LAYOUTS[layout]), doc_offsets=np.asarray(offsets, np.int64),
                mpi_comm=np.int64(-1 if comm == _LOCAL else _abi.mpi_world()[0]), world=np.int64(world))


def _ffi_forward(q, k, v, mask, comm):
    return jax.ffi.ffi_call("ringattn_forward", _shapes(q, k, v), vmap_method="sequential")(
        q, k, v, **_ffi_attrs(mask, comm, q.shape[1]))


def _ffi_backward(q, k, v, out, lse, dout, mask, comm):
    shapes = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v))
    return jax.ffi.ffi_call("ringattn_backward", shapes, vmap_method="sequential")(
        q, k, v, out, lse, dout, **_ffi_attrs(mask, comm, q.shape[1]))


def _shapes(q, k, v):
    lse = jax.ShapeDtypeStruct((q.shape[0], q.shape[2], q.shape[1]), _lse_dtype(q.dtype))
    return jax.ShapeDtypeStruct(q.shape, q.dtype), lse


# impl: "ffi" (libringattn_jax through jax.ffi.ffi_call) or "callback" (jax.pure_callback into this module).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _attention(q, k, v, mask, comm, lse_grad, impl):
    if impl == "ffi":
        return _ffi_forward(q, k, v, mask, comm)
    return jax.pure_callback(functools.partial(_host_forward, mask=mask, comm=comm), _shapes(q, k, v), q, k, v,
                             vmap_method="sequential")


def _attention_fwd(q, k, v, mask, comm, lse_grad, impl):
    out, lse = _attention(q, k, v, mask, comm, lse_grad, impl)
    return (out, lse), (q, k, v, out, lse)


def _attention_bwd(mask, comm, lse_grad, impl, res, cotangents):
    q, k, v, out, lse = res
    dout, dlse = cotangents
    if impl == "ffi":
        dq, dk, dv = _ffi_backward(q, k, v, out, lse, dout, mask, comm)
        if lse_grad:  # as in _host_backward: dq += scale * dlse * (P k), dk += scale * P^T (dlse q)
            scale = mask[1]
            w = jnp.swapaxes(dlse, 1, 2)[..., None].astype(q.dtype)
            pk, lse_k = _ffi_forward(q, k, k, mask, comm)
            _, _, dk_lse = _ffi_backward(q, k, k, pk, lse_k, (w * q).astype(q.dtype), mask, comm)
            dq = (dq + scale * w * pk).astype(q.dtype)
            dk = (dk + scale * dk_lse).astype(k.dtype)
        return dq, dk, dv
    shapes = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v))
    return jax.pure_callback(functools.partial(_host_backward, mask=mask, comm=comm, lse_grad=lse_grad), shapes,
                             q, k, v, out, lse, dout, dlse, vmap_method="sequential")


_attention.defvjp(_attention_fwd, _attention_bwd)


def ring_attention(q, k, v, *, causal: bool = False, softmax_scale: Optional[float] = None,
                   window: Optional[Tuple[int, int]] = None, doc_lens: Optional[Sequence[int]] = None,
                   stride: Optional[int] = None, global_tokens: int = 0, mask_heads: int = 0, layout: str = "zigzag",
                   group=None, return_lse: bool = False):
    """Exact attention of this process's chunk (B, S_local, H, D) against the ring's keys (see ringattn.torch).

    group: None (world 1) or 'mpi' (MPI_COMM_WORLD through the library, one process per rank under mpirun).
    Runs on the CPU through libringattn_jax's XLA FFI handlers (jax.ffi.ffi_call) when they were built,
    else through jax.pure_callback (RINGATTN_JAX_IMPL=callback forces that); differentiable with
    jax.grad (custom_vjp), lse too.
    """
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 4:
            raise ValueError(f"ringattn: {name} must be 4-D (batch, seq_local, heads, head_dim), got {a.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"ringattn: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    _dtype_code(q.dtype)
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1] or k.shape[3] != q.shape[3]:
        raise ValueError(f"ringattn: q {q.shape}, k {k.shape}, v {v.shape} do not fit together")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"ringattn: kv heads {k.shape[2]} do not divide query heads {q.shape[2]}")
    if layout not in _abi.LAYOUTS:
        raise ValueError(f"ringattn: layout {layout!r} is not one of {sorted(_abi.LAYOUTS)}")
    if group not in (None, _LOCAL, _MPI):
        raise ValueError(f"ringattn: group must be None, 'local' or 'mpi' in ringattn.jax, got {group!r}")
    if window is not None and len(tuple(window)) != 2:
        raise ValueError(f"ringattn: window must be a (left, right) pair, got {window!r}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    mask = (bool(causal), scale, tuple(int(x) for x in window) if window is not None else None,
            tuple(int(n) for n in doc_lens) if doc_lens else None, int(stride or 0), int(global_tokens),
            int(mask_heads), str(layout))
    impl = "ffi" if ffi_available() else "callback"
    out, lse = _attention(q, k, v, mask, group or _LOCAL, bool(return_lse), impl)
    if not return_lse:
        return out
    return out, lse


def positions(seq_len: int, world: int, rank: int, **kw) -> np.ndarray:
    """Global positions of rank `rank`'s rows (the library's layout; same arguments as ringattn.torch.positions)."""
    layout = kw.pop("layout", "zigzag")
    window = kw.pop("window", None)
    doc_lens = kw.pop("doc_lens", None)
    heads = int(kw.pop("heads", 1))
    problem = _abi.Problem(batch=int(kw.pop("batch", 1)), seq_len=int(seq_len), heads=heads,
                           kv_heads=int(kw.pop("kv_heads", None) or heads), head_dim=64, dtype=_abi.DTYPE_F32,
                           layout=layout, causal=bool(kw.pop("causal", False)),
                           window=tuple(int(x) for x in window) if window is not None else None,
                           doc_lens=tuple(int(n) for n in doc_lens) if doc_lens else None,
                           stride=int(kw.pop("stride", 0) or 0), global_tokens=int(kw.pop("global_tokens", 0)),
                           mask_heads=int(kw.pop("mask_heads", 0)))
    if kw:
        raise ValueError(f"ringattn: unknown arguments {sorted(kw)}")
    return np.asarray(_abi.layout_positions(problem, int(world), int(rank)), dtype=np.int64)


def _kw(x, dim, mask):
    mask = dict(mask)
    if x.ndim == 4 and dim == 1:
        mask.setdefault("heads", x.shape[2])
        mask.setdefault("batch", x.shape[0])
    return mask


def shard(x, world: int, rank: int, layout: str = "zigzag", dim: int = 1, **mask):
    """Rank `rank`'s chunk of a global array (sequence along `dim`)."""
    dim = dim % x.ndim
    return jnp.take(x, positions(x.shape[dim], world, rank, layout=layout, **_kw(x, dim, mask)), axis=dim)


def unshard(chunks, layout: str = "zigzag", dim: int = 1, **mask):
    """The global array from every rank's chunk, the inverse of shard."""
    world = len(chunks)
    dim = dim % chunks[0].ndim
    seq = sum(c.shape[dim] for c in chunks)
    kw = _kw(chunks[0], dim, mask)
    order = np.concatenate([positions(seq, world, r, layout=layout, **kw) for r in range(world)])
    inverse = np.empty_like(order)
    inverse[order] = np.arange(seq)
    return jnp.take(jnp.concatenate(list(chunks), axis=dim), inverse, axis=dim)
