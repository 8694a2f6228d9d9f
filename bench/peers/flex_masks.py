# (The workplace peer script ../shared/peers/flex_masks.py, kept here so that it travels with the repository to the GPU machines.)
# FlexAttention (torch.nn.attention.flex_attention, compiled) on the masks of ../ANCHORS.md, beside
# dense causal cuDNN: TFLOP/s on visible pairs (4*D*H*pairs forward, 3.5x forward+backward).
# Usage on a GPU machine: python3 flex_masks.py  (MODE=fwd|bwd|both)
import json, statistics, sys, time
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from torch.nn.attention.flex_attention import flex_attention, create_block_mask

torch.manual_seed(0)
H, D = 32, 128
flex = torch.compile(flex_attention, dynamic=False)
WARM_S = 1.0


def timed(fn, ms_guess):
    t_end = time.time() + WARM_S
    while time.time() < t_end:
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(max(5, min(30, int(1000 / max(ms_guess, 0.05))))):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def doc_ids(S, mean_len, seed=1):
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < S:
        lens.append(int(max(64, min(4 * mean_len, torch.empty(1).log_normal_(0, 0.8, generator=g).item() * mean_len))))
    lens[-1] -= sum(lens) - S
    ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    return ids.cuda(), lens


def run(name, S, mask_mod, pairs, bwd):
    q = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=bwd)
    k = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=bwd)
    v = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=bwd)
    do = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16)
    t0 = time.time()
    bm = create_block_mask(mask_mod, B=None, H=None, Q_LEN=S, KV_LEN=S, device="cuda")
    bm_ms = (time.time() - t0) * 1e3

    def once():
        o = flex(q, k, v, block_mask=bm)
        if bwd:
            o.backward(do)
    fl = 4 * D * H * pairs * (3.5 if bwd else 1.0)
    ms = timed(once, fl / 4e14 * 1e3)
    row = dict(name=name, S=S, bwd=bwd, visible_fraction=pairs / (S * S), flex_ms=ms,
               flex_tflops_visible=fl / ms / 1e9, block_mask_ms=bm_ms, sparsity=str(bm).split("\n")[0][:80])
    print(json.dumps(row), flush=True)
    return row


rows = []
import os
for bwd in [b for b in (False, True) if os.environ.get('MODE', 'both') in ('both', 'bwd' if b else 'fwd')]:
    for S in (32768,):
        causal = lambda b, h, qi, ki: qi >= ki
        rows.append(run("dense causal", S, causal, S * (S + 1) // 2, bwd))
        # cuDNN dense causal, same shapes, as the calibration point
        q = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=bwd)
        k = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=bwd)
        v = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=bwd)
        do = torch.randn_like(q)

        def c():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                if bwd:
                    o.backward(do)
        fl = 4 * D * H * S * (S + 1) // 2 * (3.5 if bwd else 1.0)
        ms = timed(c, fl / 5e14 * 1e3)
        print(json.dumps(dict(name="cuDNN dense causal", S=S, bwd=bwd, ms=ms, tflops=fl / ms / 1e9)), flush=True)
        del q, k, v, do
        for W in (4096, 1024):
            win = lambda b, h, qi, ki, W=W: (qi >= ki) & (qi - ki < W)
            pairs = sum(min(i + 1, W) for i in range(0, S, 1)) if S <= 32768 else W * S - W * (W - 1) // 2
            rows.append(run(f"causal window {W}", S, win, pairs, bwd))
        ids, lens = doc_ids(S, 2048)
        docm = lambda b, h, qi, ki: (ids[qi] == ids[ki]) & (qi >= ki)
        rows.append(run(f"packed docs causal (n={len(lens)}, mean 2K)", S, docm, sum(l * (l + 1) // 2 for l in lens), bwd))
        st = 64
        strided = lambda b, h, qi, ki: (qi >= ki) & (((qi - ki) < 256) | ((qi - ki) % st == 0))
        if S <= 32768:
            pairs = 0
            for i in range(S):
                pairs += min(i + 1, 256) + max(0, (i - 256) // st + (1 if i >= 256 else 0))
            rows.append(run("causal window 256 + stride 64", S, strided, pairs, bwd))
        torch.cuda.empty_cache()
print("done")
