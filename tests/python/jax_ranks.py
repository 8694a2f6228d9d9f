"""Run under mpiexec -n N: ringattn.jax over MPI_COMM_WORLD (group='mpi') equals the same op at world 1 on the whole sequence.

Every rank computes the world-1 op (checked against the fp64 reference and check_grads in test_jax.py)
on the global arrays and compares its own chunk of out, lse and the gradients. Exits 1 on a mismatch.
"""
import sys

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ringattn.jax as rj  # noqa: E402
from ringattn import _abi  # noqa: E402

CASES = [("zigzag", {"causal": True}), ("contiguous", {"causal": True, "window": (3, 0)}),
         ("balanced", {"causal": True, "doc_lens": None})]


def main() -> int:
    _, rank, world = _abi.mpi_world()
    failures = 0
    for layout, mask in CASES:
        seq = 256 * world if layout == "balanced" else 8 * world
        if "doc_lens" in mask:
            mask = dict(mask, doc_lens=(seq // 2 - 5, seq // 2 + 5))
        rng = np.random.default_rng(9)
        q, k, v = (jnp.asarray(rng.standard_normal((1, seq, h, 4))) for h in (2, 1, 1))

        def loss(q, k, v, group, **m):
            out, lse = rj.ring_attention(q, k, v, return_lse=True, layout=layout, group=group, **m)
            return (out ** 2).sum() + lse.sum(), (out, lse)

        (_, (out1, lse1)), g1 = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, None, **mask)
        sh = lambda x, dim=1: rj.shard(x, world, rank, layout=layout, dim=dim, heads=2, **mask)  # noqa: E731
        (_, (out, lse)), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(sh(q), sh(k), sh(v), "mpi",
                                                                                     **mask)
        # The ranks' losses sum to the world-1 loss, and the ring's backward brings every rank's share
        # of dK and dV home: each rank's gradients are its chunk of the world-1 gradients.
        pairs = [("out", out, sh(out1)), ("lse", lse, sh(lse1, 2))] + \
                [(n, a, sh(b)) for n, a, b in zip(("dq", "dk", "dv"), g, g1)]
        for name, got, want in pairs:
            err = float(jnp.abs(got - want).max())
            if not err <= 1e-9:
                failures += 1
                print(f"rank {rank}/{world} FAILED {layout} {mask} {name}: max error {err:.3e}", flush=True)
    print(f"rank {rank}/{world} (jax): {'OK' if failures == 0 else f'{failures} FAILED'} ({len(CASES)} cases)",
          flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
