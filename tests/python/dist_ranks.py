"""Multi-rank ringattn.torch against a full fp64 reference on every rank, over MPI or a torch.distributed group.

  mpiexec -n N python dist_ranks.py mpi                           group='mpi' (MPI_COMM_WORLD)
  torchrun --standalone --nproc-per-node N dist_ranks.py gloo     a gloo process group (host callbacks)

Every rank makes the same global q, k, v, dout, runs the reference over the whole sequence, and checks
its own chunk of out, lse, dq, dk, dv. Exits 1 on any mismatch (mpiexec / torchrun then fail).
"""
import math
import sys

import torch

import ringattn.torch as rt
from ringattn import _abi

from reference import resolve, visible
from test_torch import attention_torch, make

MPI_CASES = [
    ("zigzag", 2, 2, {"causal": True}),
    ("contiguous", 2, 1, {"causal": True, "window": (5, 0)}),
    ("striped", 2, 2, {"causal": True, "stride": 3, "doc_lens": "thirds"}),
    ("auto", 4, 2, {"window": (2, 3), "mask_heads": 2}),
    ("balanced", 2, 2, {"causal": True, "global_tokens": 2, "window": (40, 0), "doc_lens": "thirds"}),
    ("zigzag", 2, 2, {}),
]


def main(mode: str) -> int:
    if mode == "mpi":
        _, rank, world = _abi.mpi_world()
        group = "mpi"
    else:
        import torch.distributed as dist
        dist.init_process_group("gloo")
        group = dist.group.WORLD
        rank, world = dist.get_rank(), dist.get_world_size()
    failures = 0
    for layout, heads, kv_heads, mask in MPI_CASES:
        seq = 128 * 2 * world if layout == "balanced" else 12 * world
        mask = resolve(mask, seq)
        dim = 8
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 5e-5)):
            q, k, v = make(2, seq, heads, kv_heads, dim, torch.float64, seed=7)
            dout = torch.randn(2, seq, heads, dim, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
            qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
            ref_out, ref_lse = attention_torch(qr, kr, vr, 1 / math.sqrt(dim), visible(seq, heads, **mask))
            (ref_out * dout).sum().backward()
            sh = lambda t, h=heads: rt.shard(t, world, rank, layout=layout, heads=h, **mask)  # noqa: E731
            ql, kl, vl = (sh(t).to(dtype).requires_grad_() for t in (q, k, v))
            out, lse = rt.ring_attention(ql, kl, vl, layout=layout, group=group, return_lse=True, **mask)
            (out * sh(dout).to(dtype)).sum().backward()
            lse_ref = rt.shard(ref_lse.detach(), world, rank, layout=layout, dim=2, heads=heads, **mask)
            checks = [("out", out, sh(ref_out.detach())), ("lse", lse, lse_ref), ("dq", ql.grad, sh(qr.grad)),
                      ("dk", kl.grad, sh(kr.grad)), ("dv", vl.grad, sh(vr.grad))]
            for what, got, want in checks:
                err = (got.double() - want).abs().max().item()
                if not err <= tol * 10 * max(1.0, want.abs().max().item()):
                    failures += 1
                    print(f"rank {rank}/{world} FAILED {layout} {mask} {dtype} {what}: max error {err:.3e}", flush=True)
    failures += check_compiled(group, rank, world)
    print(f"rank {rank}/{world} ({mode}): {'OK' if failures == 0 else f'{failures} FAILED'} "
          f"({len(MPI_CASES)} cases x 2 dtypes, compiled step)", flush=True)
    if mode != "mpi":
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return 1 if failures else 0


def check_compiled(group, rank, world) -> int:
    """torch.compile(fullgraph=True) of a step over the group equals eager."""
    q, k, v = (rt.shard(t, world, rank, causal=True) for t in make(1, 8 * world, 2, 2, 8, torch.float32, seed=3))

    def step(q, k, v):
        return (rt.ring_attention(q, k, v, causal=True, group=group) ** 2).sum()

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        ts = [t.clone().requires_grad_() for t in (q, k, v)]
        loss = fn(*ts)
        loss.backward()
        grads.append([loss.detach()] + [t.grad for t in ts])
    bad = sum(not torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(*grads))
    if bad:
        print(f"rank {rank}/{world} FAILED compiled step differs from eager", flush=True)
    return bad


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "mpi"))
