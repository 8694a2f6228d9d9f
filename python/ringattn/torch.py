"""PyTorch ops: ring attention on local chunks (torch.library custom ops with fake and autograd), shard/unshard."""
from __future__ import annotations

import ctypes
import functools
import math
import threading
from typing import List, Optional, Sequence, Tuple

import torch

from . import _abi

__all__ = ["ring_attention", "shard", "unshard", "positions", "reference_attention"]

_DTYPES = {torch.float64: _abi.DTYPE_F64, torch.float32: _abi.DTYPE_F32,
           torch.bfloat16: _abi.DTYPE_BF16, torch.float16: _abi.DTYPE_F16}

# ---- communicators: a string key names one inside the ops (ops take no Python objects) -------------
# "local": world 1 in this process; "mpi": MPI_COMM_WORLD through the library (run under mpirun);
# "pg:<group name>": CPU tensors over a torch.distributed group (gloo): the library's host callbacks
# (ringattn_callbacks) post torch.distributed isend/irecv;
# "nccl:<group name>": CUDA tensors over a torch.distributed group, with an NCCL communicator of
# ringattn's own made from a unique id broadcast over the group (made on first use, per device).
_LOCAL, _MPI = "local", "mpi"


def _comm_key(group, device: torch.device) -> str:
    if group is None:
        return _LOCAL
    if isinstance(group, str):
        if group in (_LOCAL, _MPI):
            return group
        raise ValueError(f"ringattn: group {group!r} is not a torch.distributed group, None, 'local' or 'mpi'")
    import torch.distributed as dist
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"ringattn: group must be a torch.distributed ProcessGroup, None or 'mpi', got {type(group)}")
    if group.size() == 1:
        return _LOCAL
    return ("nccl:" if device.type == "cuda" else "pg:") + group.group_name


_comm_lock = threading.Lock()
_nccl_comms: dict = {}  # (group name, device index) -> (ncclComm_t address, rank, world)


class _NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * 128)]  # NCCL_UNIQUE_ID_BYTES


def _nccl_comm(group_name: str, device: torch.device) -> Tuple[int, int, int]:
    """ringattn's own NCCL communicator over a torch group: a unique id from group rank 0, broadcast over the group."""
    key = (group_name, device.index)
    with _comm_lock:
        if key in _nccl_comms:
            return _nccl_comms[key]
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _resolve_process_group
        group = _resolve_process_group(group_name)
        rank, world = group.rank(), group.size()
        # The libnccl that libringattn_c links (same soname, already loaded with it).
        _abi.lib()
        nccl = ctypes.CDLL("libnccl.so.2")
        uid = _NcclUniqueId()
        if rank == 0:
            status = nccl.ncclGetUniqueId(ctypes.byref(uid))
            if status != 0:
                raise RuntimeError(f"ringattn: ncclGetUniqueId failed with ncclResult {status}")
        box = [ctypes.string_at(ctypes.addressof(uid), ctypes.sizeof(uid)) if rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group, device=device)
        ctypes.memmove(ctypes.addressof(uid), box[0], ctypes.sizeof(uid))
        comm = ctypes.c_void_p()
        nccl.ncclCommInitRank.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, _NcclUniqueId, ctypes.c_int]
        with torch.cuda.device(device):
            status = nccl.ncclCommInitRank(ctypes.byref(comm), world, uid, rank)
        if status != 0:
            raise RuntimeError(f"ringattn: ncclCommInitRank (rank {rank} of {world}) failed with ncclResult {status}")
        _nccl_comms[key] = (comm.value, rank, world)
        return _nccl_comms[key]


class _GroupExchange(_abi.HostExchange):
    """A CPU ring's exchanges as torch.distributed isend/irecv over a group (gloo), on host memory."""

    def __init__(self, group):
        super().__init__(group.rank(), group.size())
        import torch.distributed as dist
        self._dist = dist
        self._group = group
        self._global = [dist.get_global_rank(group, r) for r in range(group.size())]
        self._works = []

    def post(self, send, peer, address, nbytes, tag):
        buf = torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8)
        op = self._dist.isend if send else self._dist.irecv
        self._works.append(op(buf, self._global[peer], group=self._group, tag=tag))

    def wait_all(self, timeout_s):
        import datetime
        works, self._works = self._works, []
        for w in works:
            w.wait(datetime.timedelta(seconds=timeout_s))

    def abort(self):
        works, self._works = self._works, []
        for w in works:
            try:
                w.abort()
            except Exception:  # noqa: BLE001 (not every backend's Work can abort)
                pass


_exchanges: dict = {}  # group name -> _GroupExchange


def _group_exchange(group_name: str) -> _GroupExchange:
    with _comm_lock:
        ex = _exchanges.get(group_name)
        if ex is None:
            from torch.distributed.distributed_c10d import _resolve_process_group
            ex = _exchanges[group_name] = _GroupExchange(_resolve_process_group(group_name))
        return ex


def _comm_world_rank(comm: str, device: torch.device) -> Tuple[int, int]:
    if comm == _LOCAL:
        return 1, 0
    if comm == _MPI:
        _, rank, world = _abi.mpi_world()
        return world, rank
    if comm.startswith("pg:"):
        ex = _group_exchange(comm[len("pg:"):])
        return ex.world, ex.rank
    _, rank, world = _nccl_comm(comm[len("nccl:"):], device)
    return world, rank


_rings_lock = threading.Lock()
_rings: dict = {}


def _ring(problem: _abi.Problem, comm: str, device: torch.device) -> _abi.Ring:
    """The cached ring of (problem, communicator, device); made on first use (collectively over the ranks)."""
    key = (problem, comm, device.type, device.index)
    with _rings_lock:
        ring = _rings.get(key)
        if ring is not None:
            return ring
        cuda = device.type == "cuda"
        dev = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else -1
        if comm == _LOCAL:
            ring = _abi.Ring(problem, _abi.TRANSPORT_LOCAL, device=dev, embedded=cuda)
        elif comm == _MPI:
            if cuda:
                raise ValueError("ringattn: the MPI transport moves host memory: use CPU tensors with group='mpi'")
            ring = _abi.Ring(problem, _abi.TRANSPORT_MPI, mpi_comm=_abi.mpi_world()[0])
        elif comm.startswith("pg:"):
            if cuda:
                raise ValueError("ringattn: CUDA tensors over a group go over NCCL, not host callbacks")
            ring = _abi.Ring(problem, _abi.TRANSPORT_CALLBACKS, exchange=_group_exchange(comm[len("pg:"):]))
        else:
            nccl, _, _ = _nccl_comm(comm[len("nccl:"):], device)
            ring = _abi.Ring(problem, _abi.TRANSPORT_NCCL, device=dev, embedded=True, nccl_comm=nccl)
        _rings[key] = ring
        return ring


def _problem(q: torch.Tensor, k: torch.Tensor, world: int, causal: bool, softmax_scale: float, window: List[int],
             doc_lens: List[int], stride: int, global_tokens: int, mask_heads: int, layout: str) -> _abi.Problem:
    b, s, h, d = q.shape
    return _abi.Problem(batch=b, seq_len=s * world, heads=h, kv_heads=k.shape[2], head_dim=d, dtype=_DTYPES[q.dtype],
                        layout=layout, causal=bool(causal), softmax_scale=float(softmax_scale),
                        window=tuple(window) if window else None, doc_lens=tuple(doc_lens) if doc_lens else None,
                        stride=int(stride), global_tokens=int(global_tokens), mask_heads=int(mask_heads))


def _c(t: torch.Tensor) -> _abi.Tensor:
    return _abi.tensor(t.data_ptr(), _DTYPES[t.dtype], t.shape)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stream_and_workspace(ring: _abi.Ring, device: torch.device, which: int):
    """Embedded CUDA passes: the current stream and a workspace from torch's caching allocator."""
    if device.type != "cuda":
        return 0, None
    stream = torch.cuda.current_stream(device).cuda_stream
    nbytes = ring.workspace[which]
    ws = torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes else None
    return stream, ws


# ---- the ops -----------------------------------------------------------------------------------------
# q: (B, S_local, H, D); k, v: (B, S_local, Hkv, D); out like q; lse (B, H, S_local) fp32 (fp64 for fp64).

@torch.library.custom_op("ringattn::fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float, window: List[int],
         doc_lens: List[int], stride: int, global_tokens: int, mask_heads: int, layout: str, comm: str,
         lse_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    world, _ = _comm_world_rank(comm, q.device)
    ring = _ring(_problem(q, k, world, causal, softmax_scale, window, doc_lens, stride, global_tokens, mask_heads,
                          layout), comm, q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=_lse_dtype(q.dtype), device=q.device)
    stream, ws = _stream_and_workspace(ring, q.device, _abi.PASS_FORWARD)
    ring.forward(_c(q), _c(k), _c(v), _c(out), _c(lse), ws.data_ptr() if ws is not None else 0,
                 ring.workspace[_abi.PASS_FORWARD] if ws is not None else 0, stream)
    return out, lse


@_fwd.register_fake
def _fwd_fake(q, k, v, causal, softmax_scale, window, doc_lens, stride, global_tokens, mask_heads, layout, comm,
              lse_grad):
    out = q.new_empty(q.shape)
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("ringattn::bwd", mutates_args=())
def _bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
         causal: bool, softmax_scale: float, window: List[int], doc_lens: List[int], stride: int, global_tokens: int,
         mask_heads: int, layout: str, comm: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dout, q, k, v = dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous()
    out, lse = out.contiguous(), lse.contiguous()
    world, _ = _comm_world_rank(comm, q.device)
    ring = _ring(_problem(q, k, world, causal, softmax_scale, window, doc_lens, stride, global_tokens, mask_heads,
                          layout), comm, q.device)
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    stream, ws = _stream_and_workspace(ring, q.device, _abi.PASS_BACKWARD)
    ring.backward(_c(q), _c(k), _c(v), _c(out), _c(lse), _c(dout), _c(dq), _c(dk), _c(dv),
                  ws.data_ptr() if ws is not None else 0, ring.workspace[_abi.PASS_BACKWARD] if ws is not None else 0,
                  stream)
    return dq, dk, dv


@_bwd.register_fake
def _bwd_fake(dout, q, k, v, out, lse, causal, softmax_scale, window, doc_lens, stride, global_tokens, mask_heads,
              layout, comm):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.mask = inputs[3:12]
    ctx.lse_grad = inputs[12]
    if not ctx.lse_grad:
        ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.ringattn.bwd(dout, q, k, v, out, lse, *ctx.mask)
    if ctx.lse_grad and dlse is not None:
        # d lse_i / d s_ij = P_ij: dq_i += scale * dlse_i * sum_j P_ij k_j (a forward with v = k) and
        # dk_j += scale * sum_i P_ij dlse_i q_i (the dv of a backward with dout_i = dlse_i q_i).
        scale = ctx.mask[1]
        w = dlse.to(q.dtype).transpose(1, 2).unsqueeze(-1)  # (B, S, H, 1)
        pk, _ = torch.ops.ringattn.fwd(q, k, k, *ctx.mask, False)
        _, _, dk_lse = torch.ops.ringattn.bwd((w * q).contiguous(), q, k, k, pk, lse, *ctx.mask)
        dq = dq + scale * w * pk
        dk = dk + scale * dk_lse
    return (dq, dk, dv) + (None,) * 10


torch.library.register_autograd("ringattn::fwd", _backward, setup_context=_setup_context)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"ringattn: {name} must be a torch.Tensor, got {type(t)}")
        if t.dim() != 4:
            raise ValueError(f"ringattn: {name} must be 4-D (batch, seq_local, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"ringattn: {name} has dtype {t.dtype}, not one of float64/float32/bfloat16/float16")
        if t.stride(-1) != 1:
            raise ValueError(f"ringattn: {name} has last-dimension stride {t.stride(-1)}, it must be 1")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"ringattn: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"ringattn: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"ringattn: tensors on {q.device}: only CPU and CUDA tensors are supported")
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"ringattn: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    if k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1] or k.shape[3] != q.shape[3]:
        raise ValueError(f"ringattn: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, seq_local or head_dim")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"ringattn: kv heads {k.shape[2]} do not divide query heads {q.shape[2]}")


def _mask_args(causal, softmax_scale, window, doc_lens, stride, global_tokens, mask_heads, layout, head_dim):
    if layout not in _abi.LAYOUTS:
        raise ValueError(f"ringattn: layout {layout!r} is not one of {sorted(_abi.LAYOUTS)}")
    if window is not None:
        window = [int(x) for x in window]
        if len(window) != 2:
            raise ValueError(f"ringattn: window must be a (left, right) pair, got {window}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    return (bool(causal), scale, window or [], [int(n) for n in doc_lens] if doc_lens else [], int(stride or 0),
            int(global_tokens), int(mask_heads), str(layout))


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   softmax_scale: Optional[float] = None, window: Optional[Tuple[int, int]] = None,
                   doc_lens: Optional[Sequence[int]] = None, stride: Optional[int] = None, global_tokens: int = 0,
                   mask_heads: int = 0, layout: str = "zigzag", group=None, return_lse: bool = False):
    """Exact attention of this rank's chunk against the whole ring's keys.

    q: (B, S_local, H, D); k, v: (B, S_local, Hkv, D), this rank's rows as `shard` gives them under
    `layout` (the global sequence is S_local * world). Positions (causal, window, documents, stride,
    global tokens) are global. group: None (world 1), 'mpi' (MPI_COMM_WORLD, CPU tensors, under
    mpirun) or a torch.distributed group (CPU tensors: host callbacks over it, e.g. gloo; CUDA
    tensors: an NCCL communicator of ringattn's own). Returns out like q, and with return_lse the
    log-sum-exp (B, H, S_local) in fp32 (fp64 for fp64), differentiable too.
    """
    _check_inputs(q, k, v)
    mask = _mask_args(causal, softmax_scale, window, doc_lens, stride, global_tokens, mask_heads, layout, q.shape[-1])
    comm = _comm_key(group, q.device)
    out, lse = torch.ops.ringattn.fwd(q, k, v, *mask, comm, bool(return_lse))
    return (out, lse) if return_lse else out


# ---- sharding: the library's layouts (ringattn_layout_positions), never a re-implementation ----------

@functools.lru_cache(maxsize=256)
def _positions_cached(problem: _abi.Problem, world: int, rank: int) -> Tuple[int, ...]:
    return tuple(_abi.layout_positions(problem, world, rank))


def positions(seq_len: int, world: int, rank: int, *, layout: str = "zigzag", causal: bool = False,
              window=None, doc_lens=None, stride=None, global_tokens: int = 0, mask_heads: int = 0,
              heads: int = 1, kv_heads: Optional[int] = None, batch: int = 1) -> torch.Tensor:
    """Global positions (int64) of rank `rank`'s rows, in local row order, as the ring lays them out."""
    if layout not in _abi.LAYOUTS:
        raise ValueError(f"ringattn: layout {layout!r} is not one of {sorted(_abi.LAYOUTS)}")
    problem = _abi.Problem(batch=int(batch), seq_len=int(seq_len), heads=int(heads),
                           kv_heads=int(kv_heads) if kv_heads else int(heads), head_dim=64, dtype=_abi.DTYPE_F32,
                           layout=layout, causal=bool(causal),
                           window=tuple(int(x) for x in window) if window is not None else None,
                           doc_lens=tuple(int(n) for n in doc_lens) if doc_lens else None, stride=int(stride or 0),
                           global_tokens=int(global_tokens), mask_heads=int(mask_heads))
    return torch.tensor(_positions_cached(problem, int(world), int(rank)), dtype=torch.int64)


def _layout_kwargs(x: torch.Tensor, dim: int, mask: dict) -> dict:
    mask = dict(mask)
    if x.dim() == 4 and dim == 1:  # (B, S, H, D): the heads the balanced layout weighs
        mask.setdefault("heads", x.shape[2])
        mask.setdefault("batch", x.shape[0])
    elif "heads" not in mask:
        mask["heads"] = max(int(mask.get("mask_heads", 0) or 0), 1)
    return mask


def shard(x: torch.Tensor, world: int, rank: int, layout: str = "zigzag", dim: int = 1, **mask) -> torch.Tensor:
    """Rank `rank`'s chunk of a global tensor (sequence along `dim`). mask: causal, window, doc_lens,
    stride, global_tokens, mask_heads (and heads, for k/v with fewer heads than q) as given to
    ring_attention; they decide the 'auto' and 'balanced' layouts."""
    dim = dim % x.dim()
    idx = positions(x.shape[dim], world, rank, layout=layout, **_layout_kwargs(x, dim, mask))
    return x.index_select(dim, idx.to(x.device))


def unshard(chunks: Sequence[torch.Tensor], layout: str = "zigzag", dim: int = 1, **mask) -> torch.Tensor:
    """The global tensor from every rank's chunk (chunks[r] from rank r), the inverse of shard."""
    world = len(chunks)
    if world == 0:
        raise ValueError("ringattn: unshard of no chunks")
    dim = dim % chunks[0].dim()
    seq = sum(c.shape[dim] for c in chunks)
    kw = _layout_kwargs(chunks[0], dim, mask)
    order = torch.cat([positions(seq, world, r, layout=layout, **kw) for r in range(world)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(seq, dtype=torch.int64)
    return torch.cat(list(chunks), dim).index_select(dim, inverse.to(chunks[0].device))


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        softmax_scale: Optional[float] = None, window=None, doc_lens=None, stride=None,
                        global_tokens: int = 0, mask_heads: int = 0):
    """The library's naive fp64 forward over the whole sequence (host): (out fp64, lse fp64 (B, H, S))."""
    _check_inputs(q, k, v)
    mask = _mask_args(causal, softmax_scale, window, doc_lens, stride, global_tokens, mask_heads, "contiguous",
                      q.shape[-1])
    qc, kc, vc = (t.detach().cpu().contiguous() for t in (q, k, v))
    problem = _problem(qc, kc, 1, *mask)
    out = torch.empty(qc.shape, dtype=torch.float64)
    lse = torch.empty((qc.shape[0], qc.shape[2], qc.shape[1]), dtype=torch.float64)
    _abi.reference(problem, _c(qc), _c(kc), _c(vc), _c(out), _c(lse))
    return out, lse
