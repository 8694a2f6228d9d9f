"""ringattn.torch: forward and backward against the fp64 reference, opcheck, gradcheck, torch.compile, shard/unshard, MPI ranks."""
import math
import os
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch)")
import ringattn.torch as rt  # noqa: E402

from reference import CASES, resolve, visible  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LAYOUTS = ["contiguous", "zigzag", "striped", "auto", "balanced"]


def attention_torch(q, k, v, scale, vis):
    """fp64 reference with autograd: q (B, S, H, D), k, v (B, S, Hkv, D) -> out (B, S, H, D), lse (B, H, S)."""
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    s = s.masked_fill(~torch.from_numpy(vis)[None], -math.inf)
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    out = torch.einsum("bhij,bjhd->bihd", p / torch.where(l > 0, l, torch.ones_like(l)), v)
    return out, (torch.log(l) + m).squeeze(-1)


def make(batch, seq, heads, kv_heads, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, h, dim, generator=g, dtype=torch.float64).to(dtype)
            for h in (heads, kv_heads, kv_heads)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,heads,kv_heads,mask", CASES, ids=[c[0] for c in CASES])
def test_forward_backward_world1(name, heads, kv_heads, mask, dtype):
    seq, dim = 48, 8
    mask = resolve(mask, seq)
    q, k, v = make(2, seq, heads, kv_heads, dim, dtype)
    qr, kr, vr = (t.detach().to(torch.float64).requires_grad_() for t in (q, k, v))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    vis = visible(seq, heads, **mask)
    ref_out, ref_lse = attention_torch(qr, kr, vr, 1 / math.sqrt(dim), vis)
    out, lse = rt.ring_attention(q, k, v, return_lse=True, **mask)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), ref_out.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), rtol=tol, atol=tol)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (ref_out * dout).sum().backward()
    (out * dout.to(dtype)).sum().backward()
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        torch.testing.assert_close(got.double(), want, rtol=tol * 5, atol=tol * 5)


def test_library_reference_agrees():
    """The library's own fp64 reference (ringattn_reference_forward) equals the reference of this file."""
    seq, dim = 32, 4
    mask = resolve({"causal": True, "window": (3, 0), "global_tokens": 1, "doc_lens": "thirds"}, seq)
    q, k, v = make(1, seq, 2, 2, dim, torch.float64)
    out, lse = rt.reference_attention(q, k, v, **mask)
    ref_out, ref_lse = attention_torch(q, k, v, 1 / math.sqrt(dim), visible(seq, 2, **mask))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_lse_gradient_and_gradcheck():
    """fp64 gradcheck of out and lse (the lse gradient goes through the extra forward/backward pair)."""
    q, k, v = (t.requires_grad_() for t in make(1, 8, 2, 1, 4, torch.float64))

    def f(q, k, v):
        return rt.ring_attention(q, k, v, causal=True, window=(3, 0), return_lse=True)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-8)


def test_lse_not_differentiable_without_return_lse():
    q, k, v = (t.requires_grad_() for t in make(1, 8, 2, 2, 4, torch.float64))
    out = rt.ring_attention(q, k, v, causal=True)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def _op_args(q, k, v, **mask):
    m = rt._mask_args(mask.get("causal", False), None, mask.get("window"), mask.get("doc_lens"), mask.get("stride"),
                      mask.get("global_tokens", 0), mask.get("mask_heads", 0), mask.get("layout", "zigzag"),
                      q.shape[-1])
    return (q, k, v) + tuple(m) + ("local",)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(dtype):
    q, k, v = (t.requires_grad_() for t in make(2, 16, 4, 2, 8, dtype))
    args = _op_args(q, k, v, causal=True, window=(4, 0), doc_lens=(6, 10))
    torch.library.opcheck(torch.ops.ringattn.fwd.default, args + (False,))
    torch.library.opcheck(torch.ops.ringattn.fwd.default, args + (True,))
    out, lse = torch.ops.ringattn.fwd(*args, False)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.ringattn.bwd.default, (dout, q.detach(), k.detach(), v.detach(), out.detach(),
                                                           lse.detach()) + args[3:])


def test_compile_fullgraph_equals_eager():
    q, k, v = make(1, 32, 2, 2, 8, torch.float32)

    def step(q, k, v):
        out, lse = rt.ring_attention(q, k, v, causal=True, window=(7, 0), doc_lens=(12, 20), return_lse=True)
        return (out * out).sum() + lse.sum()

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        loss = fn(qs, ks, vs)
        loss.backward()
        results.append((loss.detach(), qs.grad, ks.grad, vs.grad))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_round_trip(layout, world):
    seq = 128 * world * 2 if layout == "balanced" else 24 * world
    mask = resolve({"causal": True, "window": (9, 0), "doc_lens": "thirds"}, seq) if layout in ("auto", "balanced") \
        else {}
    x = torch.randn(2, seq, 3, 4, dtype=torch.float64)
    chunks = [rt.shard(x, world, r, layout=layout, **mask) for r in range(world)]
    assert all(c.shape == (2, seq // world, 3, 4) for c in chunks)
    seen = torch.cat([rt.positions(seq, world, r, layout=layout, heads=3, batch=2, **mask) for r in range(world)])
    assert torch.equal(seen.sort().values, torch.arange(seq)), "the ranks' positions are not a permutation"
    assert torch.equal(rt.unshard(chunks, layout=layout, **mask), x)
    # Another sequence dimension: (S, B) tensors.
    y = torch.arange(seq * 2).reshape(seq, 2)
    ys = [rt.shard(y, world, r, layout=layout, dim=0, heads=3, batch=2, **mask) for r in range(world)]
    assert torch.equal(rt.unshard(ys, layout=layout, dim=0, heads=3, batch=2, **mask), y)


def test_zigzag_positions_are_the_known_layout():
    assert rt.positions(8, 2, 0, layout="zigzag").tolist() == [0, 1, 6, 7]
    assert rt.positions(8, 2, 1, layout="zigzag").tolist() == [2, 3, 4, 5]
    assert rt.positions(6, 3, 1, layout="striped").tolist() == [1, 4]
    assert rt.positions(6, 3, 2, layout="contiguous").tolist() == [4, 5]


def test_bad_input_raises():
    q, k, v = make(1, 8, 2, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="4-D"):
        rt.ring_attention(q[0], k, v)
    with pytest.raises(ValueError, match="dtypes differ"):
        rt.ring_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="stride"):
        rt.ring_attention(q.transpose(2, 3).contiguous().transpose(2, 3), k, v)
    with pytest.raises(ValueError, match="layout"):
        rt.ring_attention(q, k, v, layout="diagonal")
    with pytest.raises(ValueError, match="kv heads"):
        rt.ring_attention(q, make(1, 8, 3, 3, 4, torch.float32)[1], make(1, 8, 3, 3, 4, torch.float32)[2])
    with pytest.raises((ValueError, RuntimeError), match="window"):
        rt.ring_attention(q, k, v, window=(-2, 0))
    with pytest.raises((ValueError, RuntimeError)):
        rt.ring_attention(q, k, v, doc_lens=(3, 3))  # does not sum to the sequence


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA op tests need a GPU")


def _sdpa(q, k, v, causal):
    group = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2).double() for t in (q, k, v.float()))
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)


@needs_cuda
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_forward_backward_world1(causal):
    seq, dim = 512, 64
    q, k, v = (t.cuda().requires_grad_() for t in make(2, seq, 4, 2, dim, torch.bfloat16))
    out = rt.ring_attention(q, k, v, causal=causal)
    torch.testing.assert_close(out.double(), _sdpa(q, k, v, causal), rtol=2e-2, atol=2e-2)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(out)
    out.backward(dout)
    _sdpa(qr, kr, vr, causal).backward(dout.double())
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=5e-2)


@needs_cuda
def test_cuda_side_stream_and_compile():
    q, k, v = (t.cuda() for t in make(1, 256, 4, 4, 64, torch.bfloat16, seed=2))
    eager = rt.ring_attention(q, k, v, causal=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = rt.ring_attention(q, k, v, causal=True)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(on_side, eager)
    compiled = torch.compile(lambda q, k, v: rt.ring_attention(q, k, v, causal=True), fullgraph=True)
    assert torch.equal(compiled(q, k, v), eager)


@needs_cuda
def test_cuda_opcheck():
    q, k, v = (t.cuda().requires_grad_() for t in make(1, 128, 4, 2, 64, torch.bfloat16))
    args = _op_args(q, k, v, causal=True)
    torch.library.opcheck(torch.ops.ringattn.fwd.default, args + (False,),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@needs_cuda
def test_cuda_graph_capture():
    q, k, v = (t.cuda() for t in make(1, 256, 4, 4, 64, torch.bfloat16, seed=4))
    eager = rt.ring_attention(q, k, v, causal=True)  # the ring is made outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = rt.ring_attention(q, k, v, causal=True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


def _mpiexec():
    return shutil.which("mpiexec") or shutil.which("mpirun")


def _child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE] + sys.path)
    return env


def _has_mpi():
    """Whether the library has MPI (a child process asks it: MPI is initialized there, not here)."""
    r = subprocess.run([sys.executable, "-c", "from ringattn import _abi; _abi.mpi_world()"], env=_child_env(),
                       capture_output=True, timeout=120)
    return r.returncode == 0


@pytest.mark.skipif(_mpiexec() is None, reason="no mpiexec on PATH: the multi-rank CPU tests need Open MPI")
@pytest.mark.parametrize("ranks", [2, 3])
def test_mpi_ranks(ranks):
    if not _has_mpi():
        pytest.skip("the library is built without MPI (RINGATTN_WITH_MPI=OFF)")
    env = _child_env()
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    if os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    r = subprocess.run([_mpiexec(), "-n", str(ranks), sys.executable, os.path.join(HERE, "dist_ranks.py"), "mpi"],
                       env=env, capture_output=True, text=True, timeout=600)
    print(r.stdout[-4000:], r.stderr[-4000:])
    assert r.returncode == 0, f"mpiexec -n {ranks} dist_ranks.py failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch has no gloo backend")
@pytest.mark.parametrize("ranks", [2, 3])
def test_gloo_ranks_torchrun(ranks):
    """torchrun ranks over a gloo process group: the library's host callbacks post torch.distributed isend/irecv."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                        os.path.join(HERE, "dist_ranks.py"), "gloo"], env=_child_env(), capture_output=True,
                       text=True, timeout=600)
    print(r.stdout[-4000:], r.stderr[-4000:])
    assert r.returncode == 0, f"torchrun {ranks} ranks of dist_ranks.py failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch has no gloo backend")
@pytest.mark.parametrize("ranks,layout", [(2, "zigzag"), (4, "balanced")])
def test_training_step_example(ranks, layout):
    """examples/ring_train.py: per-step losses and final weights over the ring equal one process with SDPA (fp64)."""
    example = os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples", "ring_train.py")
    seq = "512" if layout == "balanced" else "96"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                        example, "--layout", layout, "--seq", seq, "--rtol", "1e-6"], env=_child_env(),
                       capture_output=True, text=True, timeout=600)
    print(r.stdout[-4000:], r.stderr[-8000:])
    assert r.returncode == 0 and "# OK" in r.stdout, f"ring_train.py on {ranks} ranks failed:\n{r.stdout[-4000:]}"
