# Peer anchor: PyTorch's own context parallel (ring attention over SDPA) on p GPUs.
# Copied from ../shared/peers/ (which does not travel to the device machine). The only change:
# optional filters so a device call can time just the sizes it compares, e.g.
#   PEER_SEQS=32768,131072 PEER_CAUSAL=1 PEER_FWD_ONLY=1 torchrun --nproc_per_node=4 torch_context_parallel.py
# PEER_SEQS (comma list), PEER_CAUSAL (0, 1 or both), PEER_BACKENDS (flash,cudnn), PEER_METHODS
# (alltoall,allgather), PEER_FWD_ONLY=1 skips forward+backward. Unset, it runs the original sweep.
import os, torch, torch.distributed as dist, json, sys
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.attention import sdpa_kernel, SDPBackend
from torch.distributed.tensor.experimental import context_parallel
try:
    from torch.distributed.tensor.experimental._attention import set_rotate_method
except Exception:
    from torch.distributed.tensor.experimental._context_parallel._attention import set_rotate_method
lr = int(os.environ["LOCAL_RANK"]); torch.cuda.set_device(lr)
dist.init_process_group("nccl"); r = dist.get_rank(); p = dist.get_world_size()
mesh = init_device_mesh("cuda", (p,))
H, D = 32, 128
_env = os.environ.get
SEQS = [int(x) for x in _env("PEER_SEQS", "32768,131072,262144").split(",") if x]
CAUSALS = {"0": [False], "1": [True]}.get(_env("PEER_CAUSAL", "both"), [False, True])
BACKENDS = [x for x in _env("PEER_BACKENDS", "flash,cudnn").split(",") if x]
METHODS = [x for x in _env("PEER_METHODS", "alltoall,allgather").split(",") if x]
FWD_ONLY = _env("PEER_FWD_ONLY", "0") == "1"
def timeit(fn, iters, warm=2):
    for _ in range(warm): fn()
    torch.cuda.synchronize(); dist.barrier()
    ts = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    t = torch.tensor(sorted(ts)[len(ts)//2], device="cuda"); dist.all_reduce(t, op=dist.ReduceOp.MAX); return t.item()
for method in METHODS:
    set_rotate_method(method)
    for S in SEQS:
        for causal in CAUSALS:
            for backend in BACKENDS:
                be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
                torch.manual_seed(0)
                q = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16)
                k = torch.randn_like(q); v = torch.randn_like(q); do = torch.randn_like(q)
                flops = 4 * S * S * D * H * (0.5 if causal else 1.0)
                try:
                    with sdpa_kernel([be]), context_parallel(mesh, buffers=[q, k, v, do], buffer_seq_dims=[2, 2, 2, 2], no_restore_buffers={q, k, v, do}):
                        tf = timeit(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), iters=5)
                        q.requires_grad_(True); k.requires_grad_(True); v.requires_grad_(True)
                        def fb():
                            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal); o.backward(do)
                        tfb = timeit(fb, iters=3) if (S <= 131072 and not FWD_ONLY) else float("nan")
                    res = dict(peer="torch-cp", rotate=method, backend=backend, ranks=p, S=S, causal=causal, fwd_ms=tf, fwd_tflops_per_gpu=flops/tf/1e9/p, fwdbwd_ms=tfb, fwdbwd_tflops_per_gpu=3.5*flops/tfb/1e9/p)
                except Exception as e:
                    res = dict(peer="torch-cp", rotate=method, backend=backend, ranks=p, S=S, causal=causal, error=repr(e)[:200])
                if r == 0: print(json.dumps(res), flush=True)
                del q, k, v, do; torch.cuda.empty_cache()
dist.destroy_process_group()
