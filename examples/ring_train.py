"""A tiny causal transformer trained with ringattn attention over torchrun ranks, checked against one process with SDPA.

  torchrun --standalone --nproc-per-node 4 examples/ring_train.py            # gloo, CPU, fp64
  python examples/ring_train.py                                              # the SDPA run alone

Every rank holds the whole model and its chunk of the sequence (ringattn.torch.shard, the ring's
layout); attention is ringattn.torch.ring_attention over the process group, everything else is per
token. Parameter gradients are summed over the ranks (all_reduce), so each step equals a step of
the same model trained in one process on the whole sequence with
torch.nn.functional.scaled_dot_product_attention, which every rank also runs. Rank 0 prints both
losses per step and the largest relative weight difference at the end; the exit code is 1 when
they differ by more than --rtol.
"""
import argparse
import copy
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import ringattn.torch as rt


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, attend):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).unbind(2)  # (B, S, H, hd)
        x = x + self.proj(attend(q, k, v).reshape(b, s, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, seq: int, dim: int, heads: int, layers: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, tokens, positions, attend):  # tokens (B, S), positions (S,) global
        x = self.tok(tokens) + self.pos(positions)[None]
        for block in self.blocks:
            x = block(x, attend)
        return self.head(self.ln(x))


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seq", type=int, default=96)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=50)
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--rtol", type=float, default=1e-6)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        import torch.distributed as dist
        dist.init_process_group("gloo")
        group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    else:
        group, rank, world = None, 0, 1

    torch.manual_seed(0)
    ref = TinyLM(args.vocab, args.seq, args.dim, args.heads, args.layers).to(dtype)
    model = copy.deepcopy(ref)
    tokens = torch.randint(args.vocab, (args.steps, args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    positions = rt.positions(args.seq, world, rank, layout=args.layout, causal=True, heads=args.heads,
                             batch=args.batch)

    def ring(q, k, v):
        return rt.ring_attention(q, k, v, causal=True, layout=args.layout, group=group)

    failed = False
    if rank == 0:
        print(f"# ring_train: {world} rank(s), layout {args.layout}, {args.dtype}, seq {args.seq}, batch {args.batch}, "
              f"{args.layers} layers, dim {args.dim}, {args.heads} heads")
        print(f"# {'step':>4} {'loss (ring)':>22} {'loss (SDPA)':>22} {'rel diff':>10}")
    for step in range(args.steps):
        inputs, targets = tokens[step, :, :-1], tokens[step, :, 1:]
        # One process, the whole sequence, SDPA.
        opt_ref.zero_grad()
        loss_ref = F.cross_entropy(ref(inputs, torch.arange(args.seq), sdpa).flatten(0, 1), targets.flatten())
        loss_ref.backward()
        opt_ref.step()
        # This rank's chunk, ring attention; the loss is this rank's share of the global mean.
        opt.zero_grad()
        logits = model(inputs[:, positions], positions, ring)
        loss = F.cross_entropy(logits.flatten(0, 1), targets[:, positions].flatten(), reduction="sum") / targets.numel()
        loss.backward()
        total = loss.detach().clone()
        if distributed:
            dist.all_reduce(total)
            for prm in model.parameters():
                dist.all_reduce(prm.grad)
        opt.step()
        rel = abs(total.item() - loss_ref.item()) / abs(loss_ref.item())
        failed |= not rel <= args.rtol
        if rank == 0:
            print(f"  {step:>4} {total.item():>22.15f} {loss_ref.item():>22.15f} {rel:>10.2e}")
    worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                for a, b in zip(model.parameters(), ref.parameters()))
    failed |= not worst <= args.rtol
    if distributed:
        flag = torch.tensor([int(failed)])
        dist.all_reduce(flag)
        failed = bool(flag.item())
    if rank == 0:
        print(f"# final weights: largest relative difference {worst:.2e} (tolerance {args.rtol:g})")
        print("# FAILED" if failed else "# OK")
    if distributed:
        dist.barrier()  # no rank tears its gloo pairs down while a peer still uses them
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
