#!/usr/bin/env python3
"""End-to-end check helper for `ringattn run --load/--save`, independent of ringattn's own code.

  make DIR     write q.npy, k.npy, v.npy (numpy random normals, global token order); --with-do adds do.npy;
               the mask flags (--window, --doc-lens, --stride, --global-tokens, --mask-heads) go to
               DIR/mask.json for `compare`, and --doc-lens also to DIR/cu_seqlens.npy (unless --no-cu-seqlens,
               when the test passes --doc-lens to ringattn instead)
  compare DIR OUT   numpy softmax attention of DIR's inputs (mask from DIR/mask.json and --causal, written
                    here from the semantics' text, not from ringattn) vs OUT/out.npy and OUT/lse.npy;
                    --backward also compares OUT/dq.npy, dk.npy, dv.npy with numpy's gradients
  corrupt DIR KIND  write an unusable q.npy/k.npy/v.npy set (pure Python: works without numpy)
  cu DIR VALUES     write DIR/cu_seqlens.npy holding VALUES (comma-separated; --descr '<i4', '<i8' or '<f8',
                    --shape2d for a 2-D array): good and bad offsets for the error tests (pure Python)

`make` and `compare` need numpy and exit 77 (the ctest skip code) when it is missing.
"""
import argparse
import json
import os
import struct
import sys

SKIP = 77


def need_numpy():
    try:
        import numpy  # noqa: F401
    except ImportError:
        print("numpy is not installed: skipping (python3 -m pip install numpy)", file=sys.stderr)
        sys.exit(SKIP)
    import numpy as np
    return np


def cmd_make(a):
    np = need_numpy()
    rng = np.random.default_rng(a.seed)
    dt = {"float32": np.float32, "float64": np.float64}[a.dtype]
    os.makedirs(a.dir, exist_ok=True)
    kvh = a.kv_heads or a.heads
    np.save(os.path.join(a.dir, "q.npy"), rng.standard_normal((a.batch, a.seq, a.heads, a.head_dim)).astype(dt))
    np.save(os.path.join(a.dir, "k.npy"), rng.standard_normal((a.batch, a.seq, kvh, a.head_dim)).astype(dt))
    np.save(os.path.join(a.dir, "v.npy"), rng.standard_normal((a.batch, a.seq, kvh, a.head_dim)).astype(dt))
    if a.with_do:
        np.save(os.path.join(a.dir, "do.npy"), rng.standard_normal((a.batch, a.seq, a.heads, a.head_dim)).astype(dt))
    mask = {"window": a.window, "doc_lens": a.doc_lens, "stride": a.stride, "global_tokens": a.global_tokens,
            "mask_heads": a.mask_heads}
    with open(os.path.join(a.dir, "mask.json"), "w") as f:
        json.dump(mask, f)
    cu_path = os.path.join(a.dir, "cu_seqlens.npy")
    if os.path.exists(cu_path):
        os.remove(cu_path)
    if a.doc_lens and not a.no_cu_seqlens:
        lens = [int(x) for x in a.doc_lens.split(",")]
        np.save(cu_path, np.cumsum([0] + lens).astype(np.int32 if a.cu_int32 else np.int64))
    print(f"wrote {a.dir}/q.npy k.npy v.npy: batch {a.batch} seq {a.seq} heads {a.heads}/{kvh} dim {a.head_dim} {a.dtype}")


def visibility(np, S, H, causal, mask):
    """(H, S, S) bool: query i sees key j at head h, written from the masks issue's semantics:
    same document; j <= i when causal; when a pattern is given (and head h < mask_heads, if set), at least
    one given pattern holds: window i-left <= j <= i+right (-1 unbounded), stride (i-j) mod s == 0,
    global: i or j among the first N positions of its document."""
    i = np.arange(S)[:, None]
    j = np.arange(S)[None, :]
    base = np.ones((S, S), dtype=bool)
    first = np.zeros(S, dtype=np.int64)
    if mask.get("doc_lens"):
        cu = np.cumsum([0] + [int(x) for x in mask["doc_lens"].split(",")])
        doc = np.searchsorted(cu, np.arange(S), side="right") - 1
        base &= doc[:, None] == doc[None, :]
        first = cu[doc]
    if causal:
        base &= j <= i
    pattern = np.zeros((S, S), dtype=bool)
    given = False
    if mask.get("window"):
        left, right = (int(x) for x in mask["window"].split(","))
        win = np.ones((S, S), dtype=bool)
        if left != -1:
            win &= i - left <= j
        if right != -1:
            win &= j <= i + right
        pattern |= win
        given = True
    if mask.get("stride"):
        pattern |= (i - j) % int(mask["stride"]) == 0
        given = True
    if mask.get("global_tokens"):
        n = int(mask["global_tokens"])
        pattern |= ((np.arange(S) - first) < n)[:, None] | ((np.arange(S) - first) < n)[None, :]
        given = True
    k = int(mask.get("mask_heads") or 0)
    out = np.empty((H, S, S), dtype=bool)
    for h in range(H):
        patterned = given and (k == 0 or h < k)
        out[h] = base & pattern if patterned else base
    return out


def probabilities(np, s, allowed):
    """Row softmax of scores s (B,H,S,S) over allowed keys; rows that see no key: p = 0, lse = -inf."""
    s = np.where(allowed[None], s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    empty = ~np.isfinite(m)
    m = np.where(empty, 0.0, m)
    p = np.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    p = np.where(empty, 0.0, p / np.where(empty, 1.0, l))
    lse = np.where(empty, -np.inf, m + np.log(np.where(empty, 1.0, l)))[..., 0]
    return p, lse


def attention(np, q, k, v, causal, scale, mask):
    """Masked softmax attention in float64. q: (B,S,H,D), k/v: (B,S,Hkv,D) -> out (B,S,H,D), lse (B,H,S)."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    B, S, H, D = q.shape
    group = H // k.shape[2]
    k = np.repeat(k, group, axis=2)  # query head h reads kv head h // group
    v = np.repeat(v, group, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * (scale if scale > 0 else 1.0 / np.sqrt(D))
    p, lse = probabilities(np, s, visibility(np, S, H, causal, mask))
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse


def attention_grads(np, q, k, v, dout, causal, scale, mask):
    """Gradients of sum(out * dout) in float64: dq (B,S,H,D), dk/dv (B,S,Hkv,D), kv heads summed over their group."""
    q, k, v, dout = (x.astype(np.float64) for x in (q, k, v, dout))
    B, S, H, D = q.shape
    hkv = k.shape[2]
    group = H // hkv
    t = scale if scale > 0 else 1.0 / np.sqrt(D)
    kr, vr = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, kr) * t
    p, _ = probabilities(np, s, visibility(np, S, H, causal, mask))
    out = np.einsum("bhqk,bkhd->bqhd", p, vr)
    dv = np.einsum("bhqk,bqhd->bkhd", p, dout)
    dp = np.einsum("bqhd,bkhd->bhqk", dout, vr)
    delta = np.einsum("bqhd,bqhd->bhq", dout, out)[..., None]
    ds = p * (dp - delta)
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kr) * t
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * t
    fold = lambda x: x.reshape(B, S, hkv, group, D).sum(axis=3)
    return dq, fold(dk), fold(dv)


def load_mask(d):
    path = os.path.join(d, "mask.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def cmd_compare(a):
    np = need_numpy()
    q, k, v = (np.load(os.path.join(a.dir, n)) for n in ("q.npy", "k.npy", "v.npy"))
    out = np.load(os.path.join(a.out, "out.npy"))
    lse = np.load(os.path.join(a.out, "lse.npy"))
    mask = load_mask(a.dir)
    ref_out, ref_lse = attention(np, q, k, v, a.causal, a.scale, mask)
    ok = True
    if out.shape != ref_out.shape or lse.shape != ref_lse.shape:
        print(f"FAIL: shapes out {out.shape} lse {lse.shape}, expected {ref_out.shape} {ref_lse.shape}")
        sys.exit(1)
    if a.expect_dtype and (str(out.dtype) != a.expect_dtype or str(lse.dtype) != a.expect_dtype):
        print(f"FAIL: dtypes out {out.dtype} lse {lse.dtype}, expected {a.expect_dtype}")
        ok = False
    err_out = float(np.max(np.abs(out.astype(np.float64) - ref_out)))
    lse64 = lse.astype(np.float64)
    empty = np.isneginf(ref_lse)
    if not np.array_equal(np.isneginf(lse64), empty):
        print(f"FAIL: rows with lse = -inf differ: {int(np.isneginf(lse64).sum())} got, {int(empty.sum())} expected")
        ok = False
    err_lse = float(np.max(np.abs(np.where(empty, 0.0, lse64 - np.where(empty, 0.0, ref_lse))), initial=0.0))
    if empty.any():
        zero = np.all(out.astype(np.float64).transpose(0, 2, 1, 3)[empty] == 0.0)
        print(f"{int(empty.sum())} (batch, head, row) rows see no key; their outputs are {'0' if zero else 'NOT 0'}")
        ok = ok and bool(zero)
    print(f"numpy reference: max |out - ref| = {err_out:.3e}, max |lse - ref| = {err_lse:.3e}, tolerance {a.tol:.0e}")
    if not (err_out <= a.tol and err_lse <= a.tol):
        ok = False
    if a.backward:
        dout = np.load(os.path.join(a.dir, "do.npy"))
        refs = attention_grads(np, q, k, v, dout, a.causal, a.scale, mask)
        for name, ref in zip(("dq", "dk", "dv"), refs):
            got = np.load(os.path.join(a.out, name + ".npy"))
            if got.shape != ref.shape:
                print(f"FAIL: {name}.npy shape {got.shape}, expected {ref.shape}")
                sys.exit(1)
            err = float(np.max(np.abs(got.astype(np.float64) - ref)))
            print(f"numpy reference: max |{name} - ref| = {err:.3e}, tolerance {a.tol:.0e}")
            ok = ok and err <= a.tol
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


def npy_bytes(descr, shape, payload, fortran=False, magic=b"\x93NUMPY", version=1):
    """A .npy file built by hand (struct only), so broken variants need no numpy."""
    shape_txt = "(" + "".join(f"{s}, " for s in shape).rstrip(" ") + ")" if len(shape) != 1 else f"({shape[0]},)"
    header = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (descr, "True" if fortran else "False", shape_txt)
    pre = 10 if version == 1 else 12
    total = (pre + len(header) + 1 + 63) // 64 * 64
    header = header + " " * (total - pre - len(header) - 1) + "\n"
    size = struct.pack("<H", len(header)) if version == 1 else struct.pack("<I", len(header))
    return magic + bytes([version, 0]) + size + header.encode("latin1") + payload


def cmd_corrupt(a):
    B, S, H, D = 1, a.seq, 2, 8
    n = B * S * H * D
    good = lambda shape: npy_bytes("<f4", shape, struct.pack("<%df" % (len_of(shape)), *([0.5] * len_of(shape))))
    files = {"q.npy": good((B, S, H, D)), "k.npy": good((B, S, H, D)), "v.npy": good((B, S, H, D))}
    payload = struct.pack("<%df" % n, *([0.5] * n))
    broken = {
        "magic": npy_bytes("<f4", (B, S, H, D), payload, magic=b"\x93NUMPX"),
        "truncated": npy_bytes("<f4", (B, S, H, D), payload[: len(payload) // 2]),
        "fortran": npy_bytes("<f4", (B, S, H, D), payload, fortran=True),
        "dtype": npy_bytes("<i4", (B, S, H, D), struct.pack("<%di" % n, *([1] * n))),
        "bigendian": npy_bytes(">f4", (B, S, H, D), struct.pack(">%df" % n, *([0.5] * n))),
        "rank": npy_bytes("<f4", (B * S, H * D), payload),
        "header": b"\x93NUMPY\x01\x00\x40\x00" + b"garbage" * 20,
    }
    os.makedirs(a.dir, exist_ok=True)
    if a.kind == "kshape":  # k with another head_dim than q
        files["k.npy"] = good((B, S, H, D * 2))
    elif a.kind == "missing":
        files.pop("v.npy")
    else:
        files["q.npy"] = broken[a.kind]
    for name in ("q.npy", "k.npy", "v.npy"):
        path = os.path.join(a.dir, name)
        if os.path.exists(path):
            os.remove(path)
        if name in files:
            with open(path, "wb") as f:
                f.write(files[name])
    print(f"wrote a '{a.kind}' case to {a.dir}")


def cmd_cu(a):
    vals = [int(x) for x in a.values.split(",")] if a.values else []
    fmt = {"<i4": "i", "<i8": "q", "<f8": "d"}[a.descr]
    shape = (1, len(vals)) if a.shape2d else (len(vals),)
    with open(os.path.join(a.dir, "cu_seqlens.npy"), "wb") as f:
        f.write(npy_bytes(a.descr, shape, struct.pack("<%d%s" % (len(vals), fmt), *vals)))
    print(f"wrote {a.dir}/cu_seqlens.npy = {vals} ({a.descr})")


def len_of(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("dir")
    m.add_argument("--batch", type=int, default=2)
    m.add_argument("--seq", type=int, default=96)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--kv-heads", type=int, default=0)
    m.add_argument("--head-dim", type=int, default=24)
    m.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    m.add_argument("--seed", type=int, default=1234)
    m.add_argument("--with-do", action="store_true", help="also write do.npy (the output gradient)")
    m.add_argument("--window", default="", help="LEFT,RIGHT (-1 = unbounded)")
    m.add_argument("--doc-lens", default="", help="L1,L2,... summing to --seq; written to cu_seqlens.npy")
    m.add_argument("--no-cu-seqlens", action="store_true", help="keep --doc-lens in mask.json only (pass it to run)")
    m.add_argument("--cu-int32", action="store_true", help="write cu_seqlens.npy as int32 (default int64)")
    m.add_argument("--stride", type=int, default=0)
    m.add_argument("--global-tokens", type=int, default=0)
    m.add_argument("--mask-heads", type=int, default=0)
    c = sub.add_parser("compare")
    c.add_argument("dir")
    c.add_argument("out")
    c.add_argument("--causal", action="store_true")
    c.add_argument("--scale", type=float, default=0.0)
    c.add_argument("--tol", type=float, default=1e-10)
    c.add_argument("--expect-dtype", default="")
    c.add_argument("--backward", action="store_true", help="also compare dq.npy, dk.npy, dv.npy")
    k = sub.add_parser("corrupt")
    k.add_argument("dir")
    k.add_argument("kind", choices=["magic", "truncated", "fortran", "dtype", "bigendian", "rank", "header", "kshape",
                                    "missing"])
    k.add_argument("--seq", type=int, default=24)
    u = sub.add_parser("cu")
    u.add_argument("dir")
    u.add_argument("values")
    u.add_argument("--descr", choices=["<i4", "<i8", "<f8"], default="<i8")
    u.add_argument("--shape2d", action="store_true")
    a = p.parse_args()
    {"make": cmd_make, "compare": cmd_compare, "corrupt": cmd_corrupt, "cu": cmd_cu}[a.cmd](a)


if __name__ == "__main__":
    main()
