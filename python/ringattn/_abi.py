"""ctypes binding of the C ABI (include/ringattn/ringattn_c.h): structs, the library, rings, layouts, MPI."""
from __future__ import annotations

import ctypes
import glob
import os
import threading
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

API_MAJOR = 1
API_MINOR_NEEDED = 1  # ringattn_layout_positions, ringattn_mpi_world, ringattn_ring_create_callbacks

# ringattn_status
OK = 0
_STATUS_NAMES = {
    1: "INVALID_ARGUMENT", 2: "MISMATCH", 3: "COMM", 4: "TIMEOUT", 5: "CUDA", 6: "OUT_OF_MEMORY",
    7: "UNSUPPORTED", 8: "ABORTED", 9: "IO", 10: "INTERNAL",
}
STATUS_INVALID_ARGUMENT = 1
STATUS_UNSUPPORTED = 7

# ringattn_dtype
DTYPE_F64, DTYPE_F32, DTYPE_BF16, DTYPE_F16 = 0, 1, 2, 3
# ringattn_layout
LAYOUTS = {"contiguous": 0, "zigzag": 1, "striped": 2, "auto": 3, "balanced": 4}
# ringattn_pass
PASS_FORWARD, PASS_BACKWARD = 0, 1
# ringattn_transport_kind
TRANSPORT_LOCAL, TRANSPORT_MPI, TRANSPORT_NCCL, TRANSPORT_LOOPBACK = 0, 1, 2, 3
TRANSPORT_CALLBACKS = -1  # this binding's marker for ringattn_ring_create_callbacks (not an ABI value)


class RingAttnError(RuntimeError):
    """A failure reported by the library; `status` is the ringattn_status, the message is the library's."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Tensor(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("shape", ctypes.c_int64 * 4),
        ("stride", ctypes.c_int64 * 4),
    ]


class Spec(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("batch", ctypes.c_int64),
        ("seq_len", ctypes.c_int64),
        ("heads", ctypes.c_int32),
        ("kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("layout", ctypes.c_int32),
        ("causal", ctypes.c_int32),
        ("softmax_scale", ctypes.c_double),
        ("has_window", ctypes.c_int32),
        ("mask_heads", ctypes.c_int32),
        ("window_left", ctypes.c_int64),
        ("window_right", ctypes.c_int64),
        ("stride", ctypes.c_int64),
        ("global_tokens", ctypes.c_int64),
        ("num_docs", ctypes.c_int64),
        ("doc_offsets", ctypes.POINTER(ctypes.c_int64)),
    ]


class TransportDesc(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("kind", ctypes.c_int32),
        ("rank", ctypes.c_int32),
        ("nccl_comm", ctypes.c_void_p),
        ("mpi_comm", ctypes.c_int64),
        ("loopback", ctypes.c_void_p),
        ("timeout_ms", ctypes.c_double),
    ]


class RingOptions(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("device", ctypes.c_int32),
        ("embedded", ctypes.c_int32),
        ("stream", ctypes.c_void_p),
    ]


POST_FN = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p,
                           ctypes.c_size_t, ctypes.c_int64)
WAIT_ALL_FN = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_double)
ABORT_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
LAST_ERROR_FN = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)


class Callbacks(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("user", ctypes.c_void_p),
        ("rank", ctypes.c_int32),
        ("world", ctypes.c_int32),
        ("post", POST_FN),
        ("wait_all", WAIT_ALL_FN),
        ("abort", ABORT_FN),
        ("last_error", LAST_ERROR_FN),
    ]


class HostExchange:
    """A ring's exchanges in Python (ringattn_callbacks): subclasses post sends/receives and wait for them.

    post(send, peer, address, nbytes, tag) and wait_all(timeout_s) raise on failure; the library
    gets the message. The instance must outlive its rings (Ring keeps a reference).
    """

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self._error = b""
        self._struct = Callbacks()
        self._struct.struct_size = ctypes.sizeof(Callbacks)
        self._struct.rank, self._struct.world = rank, world
        # The CFUNCTYPE objects must stay alive as long as the library may call them.
        self._fns = (POST_FN(self._post), WAIT_ALL_FN(self._wait_all), ABORT_FN(self._abort),
                     LAST_ERROR_FN(self._last_error))
        self._struct.post, self._struct.wait_all, self._struct.abort, self._struct.last_error = self._fns

    def post(self, send: bool, peer: int, address: int, nbytes: int, tag: int) -> None:
        raise NotImplementedError

    def wait_all(self, timeout_s: float) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        pass

    # Exceptions never cross into the library: they become a nonzero return and last_error's text.
    def _post(self, user, send, peer, data, nbytes, tag):
        try:
            self.post(bool(send), int(peer), int(data or 0), int(nbytes), int(tag))
            return 0
        except BaseException as e:  # noqa: BLE001 (returned to the library as its message)
            self._error = f"{type(e).__name__}: {e}".encode(errors="replace")
            return 1

    def _wait_all(self, user, timeout_ms):
        try:
            self.wait_all(timeout_ms / 1000.0)
            return 0
        except BaseException as e:  # noqa: BLE001
            self._error = f"{type(e).__name__}: {e}".encode(errors="replace")
            return 1

    def _abort(self, user):
        try:
            self.abort()
        except BaseException:  # noqa: BLE001 (abort is best effort)
            pass

    def _last_error(self, user):
        return self._error


_P = ctypes.POINTER
_SIGNATURES = {
    "ringattn_api_version": (ctypes.c_uint32, []),
    "ringattn_status_string": (ctypes.c_char_p, [ctypes.c_int]),
    "ringattn_last_error": (ctypes.c_char_p, []),
    "ringattn_loopback_create": (ctypes.c_int, [ctypes.c_int32, ctypes.c_int32, ctypes.c_double, _P(ctypes.c_void_p)]),
    "ringattn_loopback_destroy": (None, [ctypes.c_void_p]),
    "ringattn_ring_create": (ctypes.c_int, [_P(Spec), _P(TransportDesc), _P(RingOptions), _P(ctypes.c_void_p)]),
    "ringattn_ring_create_callbacks": (ctypes.c_int, [_P(Spec), _P(Callbacks), ctypes.c_double, _P(RingOptions),
                                                      _P(ctypes.c_void_p)]),
    "ringattn_ring_destroy": (None, [ctypes.c_void_p]),
    "ringattn_ring_info": (ctypes.c_int, [ctypes.c_void_p, _P(ctypes.c_int32), _P(ctypes.c_int32), _P(ctypes.c_int64)]),
    "ringattn_ring_positions": (ctypes.c_int, [ctypes.c_void_p, _P(ctypes.c_int64), ctypes.c_int64]),
    "ringattn_layout_positions": (ctypes.c_int, [_P(Spec), ctypes.c_int32, ctypes.c_int32, _P(ctypes.c_int64), ctypes.c_int64]),
    "ringattn_mpi_world": (ctypes.c_int, [_P(ctypes.c_int64), _P(ctypes.c_int32), _P(ctypes.c_int32)]),
    "ringattn_mpi_finalize": (ctypes.c_int, []),
    "ringattn_workspace_bytes": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int32, _P(ctypes.c_size_t)]),
    "ringattn_forward": (ctypes.c_int, [ctypes.c_void_p] + [_P(Tensor)] * 5 + [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]),
    "ringattn_backward": (ctypes.c_int, [ctypes.c_void_p] + [_P(Tensor)] * 9 + [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]),
    "ringattn_poll": (ctypes.c_int, [ctypes.c_void_p]),
    "ringattn_reference_forward": (ctypes.c_int, [_P(Spec)] + [_P(Tensor)] * 5),
    "ringattn_reference_backward": (ctypes.c_int, [_P(Spec)] + [_P(Tensor)] * 7),
}

_lib = None
_lib_lock = threading.Lock()


def library_path() -> str:
    """Where libringattn_c is loaded from: $RINGATTN_LIBRARY, else the copy installed in this package."""
    env = os.environ.get("RINGATTN_LIBRARY")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "libringattn_c.so*")), key=len)
    if not found:
        raise ImportError(
            f"ringattn: libringattn_c.so is not in {here} (hint: pip install --no-build-isolation . at the "
            "repository root, or set RINGATTN_LIBRARY to a built build/libringattn_c.so)")
    return found[0]


def lib() -> ctypes.CDLL:
    """The loaded library, checked against the API version this binding was written for."""
    global _lib
    with _lib_lock:
        if _lib is None:
            path = library_path()
            # RTLD_GLOBAL: MPI's plug-ins (Open MPI's mca components) resolve libmpi symbols globally.
            handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            for name, (restype, argtypes) in _SIGNATURES.items():
                fn = getattr(handle, name, None)
                if fn is None:
                    raise ImportError(f"ringattn: {path} lacks {name} (hint: an older library; rebuild it)")
                fn.restype = restype
                fn.argtypes = argtypes
            version = handle.ringattn_api_version()
            if version >> 16 != API_MAJOR or (version & 0xFFFF) < API_MINOR_NEEDED:
                raise ImportError(f"ringattn: {path} has C API {version >> 16}.{version & 0xFFFF}, this package needs "
                                  f"{API_MAJOR}.{API_MINOR_NEEDED} or a later minor version")
            _lib = handle
        return _lib


def check(status: int) -> None:
    """Raises for a failed call: ValueError for bad arguments, RingAttnError (a RuntimeError) otherwise."""
    if status == OK:
        return
    message = lib().ringattn_last_error().decode(errors="replace")
    name = _STATUS_NAMES.get(status, str(status))
    if status == STATUS_INVALID_ARGUMENT:
        raise ValueError(f"ringattn ({name}): {message}")
    raise RingAttnError(status, f"ringattn ({name}): {message}")


def tensor(data: int, dtype: int, shape: Sequence[int]) -> Tensor:
    """A contiguous row-major ringattn_tensor over `data` (an address)."""
    t = Tensor()
    t.struct_size = ctypes.sizeof(Tensor)
    t.data = data
    t.dtype = dtype
    t.ndim = len(shape)
    step = 1
    for i in reversed(range(len(shape))):
        t.shape[i] = int(shape[i])
        t.stride[i] = step
        step *= int(shape[i])
    return t


@dataclass(frozen=True)
class Problem:
    """Everything a ring is made for (hashable: rings are cached per problem)."""
    batch: int
    seq_len: int  # global
    heads: int
    kv_heads: int
    head_dim: int
    dtype: int
    layout: str = "zigzag"
    causal: bool = False
    softmax_scale: float = 0.0  # 0: 1/sqrt(head_dim)
    window: Optional[Tuple[int, int]] = None
    doc_lens: Optional[Tuple[int, ...]] = None
    stride: int = 0
    global_tokens: int = 0
    mask_heads: int = 0

    def to_c(self) -> Tuple[Spec, object]:
        """The ringattn_spec and the doc-offset array it points to (keep both alive)."""
        if self.layout not in LAYOUTS:
            raise ValueError(f"ringattn: layout {self.layout!r} is not one of {sorted(LAYOUTS)}")
        s = Spec()
        s.struct_size = ctypes.sizeof(Spec)
        s.batch, s.seq_len = self.batch, self.seq_len
        s.heads, s.kv_heads, s.head_dim = self.heads, self.kv_heads, self.head_dim
        s.dtype, s.layout, s.causal = self.dtype, LAYOUTS[self.layout], int(bool(self.causal))
        s.softmax_scale = float(self.softmax_scale)
        if self.window is not None:
            if len(self.window) != 2:
                raise ValueError(f"ringattn: window must be a (left, right) pair, got {self.window!r}")
            s.has_window = 1
            s.window_left, s.window_right = int(self.window[0]), int(self.window[1])
        else:
            s.window_left = s.window_right = -1
        s.mask_heads, s.stride, s.global_tokens = self.mask_heads, self.stride, self.global_tokens
        offsets = None
        if self.doc_lens:
            acc = [0]
            for n in self.doc_lens:
                acc.append(acc[-1] + int(n))
            offsets = (ctypes.c_int64 * len(acc))(*acc)
            s.num_docs = len(acc) - 1
            s.doc_offsets = ctypes.cast(offsets, ctypes.POINTER(ctypes.c_int64))
        return s, offsets


def layout_positions(problem: Problem, world: int, rank: int) -> list:
    """Global positions of rank `rank`'s rows on `world` ranks, from the library (ringattn_layout_positions)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"ringattn: rank {rank} outside a ring of {world}")
    if problem.seq_len % world:
        raise ValueError(f"ringattn: sequence length {problem.seq_len} does not divide over {world} ranks")
    count = problem.seq_len // world
    spec, keep = problem.to_c()
    out = (ctypes.c_int64 * count)()
    check(lib().ringattn_layout_positions(ctypes.byref(spec), world, rank, out, count))
    del keep
    return list(out)


_mpi_lock = threading.Lock()
_mpi_world: Optional[Tuple[int, int, int]] = None


def mpi_world() -> Tuple[int, int, int]:
    """(Fortran handle of MPI_COMM_WORLD, rank, world); initializes MPI through the library when needed."""
    global _mpi_world
    with _mpi_lock:
        if _mpi_world is None:
            comm, rank, world = ctypes.c_int64(), ctypes.c_int32(), ctypes.c_int32()
            check(lib().ringattn_mpi_world(ctypes.byref(comm), ctypes.byref(rank), ctypes.byref(world)))
            _mpi_world = (comm.value, rank.value, world.value)
            import atexit
            atexit.register(_mpi_shutdown)
        return _mpi_world


def _mpi_shutdown() -> None:
    Ring.destroy_all()
    lib().ringattn_mpi_finalize()


class Ring:
    """One ringattn_ring: a problem on one transport and device. Calls on it are serialized."""

    _live: "list[Ring]" = []

    def __init__(self, problem: Problem, kind: int, *, device: int = -1, embedded: bool = False,
                 mpi_comm: int = 0, nccl_comm: int = 0, timeout_ms: float = 0.0,
                 exchange: Optional[HostExchange] = None):
        """kind: a TRANSPORT_* value, or TRANSPORT_CALLBACKS with `exchange` (CPU rings only)."""
        self.problem = problem
        self._lock = threading.Lock()
        self._exchange = exchange  # the library calls into it as long as the ring lives
        spec, keep = problem.to_c()
        o = RingOptions()
        o.struct_size = ctypes.sizeof(RingOptions)
        o.device, o.embedded = device, int(embedded)
        handle = ctypes.c_void_p()
        if kind == TRANSPORT_CALLBACKS:
            check(lib().ringattn_ring_create_callbacks(ctypes.byref(spec), ctypes.byref(exchange._struct), timeout_ms,
                                                       ctypes.byref(o), ctypes.byref(handle)))
        else:
            t = TransportDesc()
            t.struct_size = ctypes.sizeof(TransportDesc)
            t.kind, t.mpi_comm, t.nccl_comm, t.timeout_ms = kind, mpi_comm, nccl_comm or None, timeout_ms
            check(lib().ringattn_ring_create(ctypes.byref(spec), ctypes.byref(t), ctypes.byref(o),
                                             ctypes.byref(handle)))
        del keep
        self._handle = handle
        rank, world, local = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_int64()
        check(lib().ringattn_ring_info(handle, ctypes.byref(rank), ctypes.byref(world), ctypes.byref(local)))
        self.rank, self.world, self.local_seq = rank.value, world.value, local.value
        self.workspace = [0, 0]
        for p in (PASS_FORWARD, PASS_BACKWARD):
            n = ctypes.c_size_t()
            check(lib().ringattn_workspace_bytes(handle, p, ctypes.byref(n)))
            self.workspace[p] = n.value
        Ring._live.append(self)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                workspace: int = 0, workspace_bytes: int = 0, stream: int = 0) -> None:
        with self._lock:
            r = ctypes.byref
            check(lib().ringattn_forward(self._handle, r(q), r(k), r(v), r(out), r(lse),
                                         workspace or None, workspace_bytes, stream or None))

    def backward(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                 dq: Tensor, dk: Tensor, dv: Tensor, workspace: int = 0, workspace_bytes: int = 0,
                 stream: int = 0) -> None:
        with self._lock:
            r = ctypes.byref
            check(lib().ringattn_backward(self._handle, r(q), r(k), r(v), r(out), r(lse), r(dout), r(dq), r(dk),
                                          r(dv), workspace or None, workspace_bytes, stream or None))

    def poll(self) -> None:
        check(lib().ringattn_poll(self._handle))

    def destroy(self) -> None:
        if self._handle:
            lib().ringattn_ring_destroy(self._handle)
            self._handle = None

    @classmethod
    def destroy_all(cls) -> None:
        """Destroys every ring (before MPI is finalized or a communicator is torn down)."""
        for ring in cls._live:
            ring.destroy()
        cls._live.clear()


def reference(problem: Problem, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor) -> None:
    """The library's naive fp64 forward over the whole sequence (host memory)."""
    spec, keep = problem.to_c()
    r = ctypes.byref
    check(lib().ringattn_reference_forward(r(spec), r(q), r(k), r(v), r(out), r(lse)))
    del keep
