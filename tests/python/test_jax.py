"""ringattn.jax: forward against the fp64 reference, check_grads (fp32 and fp64) of out and lse, jit, shard/unshard."""
import math

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed (pip install jax)")
jax.config.update("jax_enable_x64", True)  # fp64 tests; fp32 arrays stay fp32
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import ringattn.jax as rj  # noqa: E402

from reference import CASES, attention_numpy, resolve, visible  # noqa: E402


@pytest.fixture(autouse=True, params=["ffi", "callback"])
def impl(request, monkeypatch):
    """Every test runs on both paths: the XLA FFI handlers (libringattn_jax) and jax.pure_callback."""
    if request.param == "ffi":
        monkeypatch.delenv("RINGATTN_JAX_IMPL", raising=False)
        if not rj.ffi_available():
            pytest.skip("libringattn_jax is not built (jax was not importable when CMake ran): the FFI path")
    else:
        monkeypatch.setenv("RINGATTN_JAX_IMPL", "callback")
    return request.param


def make(seq, heads, kv_heads, dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((2, seq, h, dim)), dtype) for h in (heads, kv_heads, kv_heads)]


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("name,heads,kv_heads,mask", CASES, ids=[x[0] for x in CASES])
def test_forward_world1(name, heads, kv_heads, mask, dtype, impl):
    seq, dim = 24, 8
    mask = resolve(mask, seq)
    q, k, v = make(seq, heads, kv_heads, dim, dtype)
    fn = jax.jit(lambda q, k, v: rj.ring_attention(q, k, v, return_lse=True, **mask))
    hlo = fn.lower(q, k, v).as_text()
    assert ("ringattn_forward" in hlo) == (impl == "ffi"), "the op did not take the expected path"
    out, lse = fn(q, k, v)
    want_out, want_lse = attention_numpy(q, k, v, 1 / math.sqrt(dim), visible(seq, heads, **mask))
    tol = 1e-10 if dtype == jnp.float64 else 2e-5
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float64), want_out, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(lse, np.float64), want_lse, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,eps,tol", [(jnp.float64, 1e-6, 1e-6), (jnp.float32, 1e-2, 3e-2)])
@pytest.mark.parametrize("mask", [{"causal": True}, {"causal": True, "window": (2, 0), "doc_lens": (5, 7)},
                                  {"window": (1, 1), "mask_heads": 2}], ids=["causal", "window_docs", "mask_heads"])
def test_check_grads_world1(mask, dtype, eps, tol):
    q, k, v = make(12, 4, 2, 4, dtype, seed=5)

    def out_only(q, k, v):
        return rj.ring_attention(q, k, v, **mask)

    def out_and_lse(q, k, v):
        out, lse = rj.ring_attention(q, k, v, return_lse=True, **mask)
        return out.sum(-1) + 0.5 * jnp.swapaxes(lse, 1, 2)

    check_grads(out_only, (q, k, v), order=1, modes=["rev"], eps=eps, atol=tol, rtol=tol)
    check_grads(out_and_lse, (q, k, v), order=1, modes=["rev"], eps=eps, atol=tol, rtol=tol)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped", "auto", "balanced"])
def test_shard_unshard_round_trip(layout):
    world = 4
    seq = 256 * world if layout == "balanced" else 16 * world
    mask = {"causal": True, "window": (33, 0)} if layout in ("auto", "balanced") else {}
    x = jnp.arange(2 * seq * 3 * 2, dtype=jnp.float32).reshape(2, seq, 3, 2)
    chunks = [rj.shard(x, world, r, layout=layout, **mask) for r in range(world)]
    np.testing.assert_array_equal(np.asarray(rj.unshard(chunks, layout=layout, **mask)), np.asarray(x))


def test_bad_input_raises():
    q, k, v = make(8, 2, 2, 4, jnp.float32)
    with pytest.raises(ValueError, match="4-D"):
        rj.ring_attention(q[0], k, v)
    with pytest.raises(ValueError, match="group"):
        rj.ring_attention(q, k, v, group=object())


def _mpi_env():
    import os
    import sys
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__))] + sys.path)
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    if os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def test_mpi_ranks_equal_world1(impl):
    """mpiexec -n 2 jax_ranks.py: the op over MPI_COMM_WORLD equals the world-1 op, gradients included."""
    import os
    import shutil
    import subprocess
    import sys
    mpiexec = shutil.which("mpiexec") or shutil.which("mpirun")
    if mpiexec is None:
        pytest.skip("no mpiexec on PATH: the multi-rank JAX test needs Open MPI")
    env = _mpi_env()
    if impl == "callback":
        env["RINGATTN_JAX_IMPL"] = "callback"
    probe = subprocess.run([sys.executable, "-c", "from ringattn import _abi; _abi.mpi_world()"], env=env,
                           capture_output=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip("the library is built without MPI (RINGATTN_WITH_MPI=OFF)")
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([mpiexec, "-n", "2", sys.executable, os.path.join(here, "jax_ranks.py")], env=env,
                       capture_output=True, text=True, timeout=600)
    print(r.stdout[-4000:], r.stderr[-4000:])
    assert r.returncode == 0, f"mpiexec -n 2 jax_ranks.py failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
