#!/usr/bin/env python3
"""Scaling plots from `ringattn plan --json` (predicted lines) and bench -J files (measured points).

  scripts/plot_scaling.py --regenerate --cli build/bin/ringattn   # rewrites docs/scaling/*.json and the PNG
  scripts/plot_scaling.py --check --cli build/bin/ringattn --out /tmp/scaling.png
      # reruns the plans, fails when docs/scaling/plan_*.json is stale, draws the PNG from the checked-in JSON

Panels: ring efficiency and per-GPU TFLOP/s against GPU count, time against sequence length (dense,
causal, sliding window). Exit 77 (skip) when matplotlib is missing.
"""
import argparse
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "docs", "scaling")
MACHINES = os.path.join(ROOT, "configs", "machines")
SKIP = 77
REL_TOL = 1e-6  # plan output is deterministic: any change beyond rounding means stale JSON
STANDARD = ["--heads", "32", "--head-dim", "128", "--dtype", "bf16"]
K = 1024

# Each sweep: (name, label, machine, [(np, seq_len)], extra flags).
SWEEPS = [
    ("h200_causal_8k", "8x H200 NVLink, 8k tokens/GPU", "h200x8", [(p, 8 * K * p) for p in (1, 2, 4, 8)],
     ["--causal", "--backward"]),
    ("h200_causal_32k", "8x H200 NVLink, 32k tokens/GPU", "h200x8", [(p, 32 * K * p) for p in (1, 2, 4, 8)],
     ["--causal", "--backward"]),
    ("h100ib_flat_16k", "H100 hosts over IB, flat ring, 16k/GPU", "h100x8-ib",
     [(p, 16 * K * p) for p in (8, 16, 32, 64, 128, 256, 512, 1024)], ["--causal", "--backward", "--strategy", "flat"]),
    ("h100ib_two_level_16k", "H100 hosts over IB, two-level ring, 16k/GPU", "h100x8-ib",
     [(p, 16 * K * p) for p in (8, 16, 32, 64, 128, 256, 512, 1024)],
     ["--causal", "--backward", "--strategy", "two-level"]),
    ("h200x4_dense", "4x H200 dense", "h200x8", [(4, s * K) for s in (32, 64, 128, 256, 512, 1024)],
     ["--layout", "contiguous", "--backward"]),
    ("h200x4_causal", "4x H200 causal (zigzag)", "h200x8", [(4, s * K) for s in (32, 64, 128, 256, 512, 1024)],
     ["--causal", "--backward"]),
    ("h200x4_window", "4x H200 causal window 4096", "h200x8", [(4, s * K) for s in (32, 64, 128, 256, 512, 1024)],
     ["--causal", "--window", "4095,0", "--backward"]),
]
EFFICIENCY_SWEEPS = ["h200_causal_8k", "h200_causal_32k", "h100ib_flat_16k", "h100ib_two_level_16k"]
LENGTH_SWEEPS = ["h200x4_dense", "h200x4_causal", "h200x4_window"]


def run_sweep(cli, sweep):
    name, label, machine, points, flags = sweep
    preds = []
    for np_, seq in points:
        cmd = [cli, "plan", "--machine", os.path.join(MACHINES, machine + ".toml"), "--np", str(np_),
               "--seq-len", str(seq), "--json", "-"] + STANDARD + flags
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        pred = json.loads(out[out.index("{"):])["predictions"][0]
        for pass_name in ("forward", "backward"):  # the per-step detail stays out of the checked-in summary
            if pass_name in pred:
                pred[pass_name] = {k: v for k, v in pred[pass_name].items() if k != "steps"}
        pred.pop("model_seconds", None)  # a timing: it would change the checked-in files at every run
        preds.append(pred)
    return {"sweep": name, "label": label, "machine": machine, "flags": STANDARD + flags, "predictions": preds}


def load_json(path):
    with open(path) as f:
        return json.load(f)


def stale_fields(old, new):
    bad = []
    for a, b in zip(old["predictions"], new["predictions"]):
        for key in ("time_ms", "ring_efficiency", "tflops_per_gpu", "memory_bytes"):
            x, y = a[key], b[key]
            if abs(x - y) > REL_TOL * max(abs(x), abs(y), 1e-12):
                bad.append(f"{old['sweep']} np {a['ranks']} {key}: checked in {x}, now {y}")
    if len(old["predictions"]) != len(new["predictions"]):
        bad.append(f"{old['sweep']}: {len(old['predictions'])} points checked in, {len(new['predictions'])} now")
    return bad


def measured_points():
    """bench -J files under docs/scaling/measured_*.json: (label, world, results)."""
    out = []
    for path in sorted(glob.glob(os.path.join(DATA, "measured_*.json"))):
        j = load_json(path)
        out.append((j.get("label", os.path.basename(path)), j["world"], j["results"]))
    return out


def draw(sweeps, out_png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("SKIP: matplotlib is not installed (pip install matplotlib)")
        return SKIP
    by_name = {s["sweep"]: s for s in sweeps}
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for name in EFFICIENCY_SWEEPS:
        s = by_name[name]
        x = [p["ranks"] for p in s["predictions"]]
        axes[0].plot(x, [100 * p["ring_efficiency"] for p in s["predictions"]], marker=".", label=s["label"])
        axes[1].plot(x, [p["tflops_per_gpu"] for p in s["predictions"]], marker=".", label=s["label"])
    for name in LENGTH_SWEEPS:
        s = by_name[name]
        axes[2].plot([p["tokens"] for p in s["predictions"]], [p["time_ms"] for p in s["predictions"]], marker=".",
                     label=s["label"])
    for label, world, results in measured_points():
        with_eff = [r for r in results if r.get("ring_efficiency") is not None]
        axes[0].scatter([world] * len(with_eff), [100 * r["ring_efficiency"] for r in with_eff], marker="x", color="k",
                        zorder=5, label=label)
        axes[1].scatter([world] * len(with_eff), [r["tflops_per_gpu"] for r in with_eff], marker="x", color="k",
                        zorder=5, label=label)
        if world == 4 and "causal" in label:
            axes[2].scatter([r["tokens"] for r in results], [r["time_ms"] for r in results], marker="x", color="k",
                            zorder=5, label=label)
    axes[0].set(xscale="log", xlabel="GPUs", ylabel="ring efficiency (%)", title="Ring efficiency (fwd+bwd, causal)")
    axes[1].set(xscale="log", xlabel="GPUs", ylabel="TFLOP/s per GPU", title="Per-GPU throughput (fwd+bwd, causal)")
    axes[2].set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="fwd+bwd time (ms)",
                title="Time against length, 4x H200")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("ringattn plan: predicted lines, measured points (x); bf16, 32 heads, head_dim 128", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    print(f"wrote {out_png}")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cli", default=os.path.join(ROOT, "build", "bin", "ringattn"), help="the ringattn binary")
    ap.add_argument("--regenerate", action="store_true", help="rewrite docs/scaling/plan_*.json and scaling.png")
    ap.add_argument("--check", action="store_true", help="fail when the checked-in JSON is not what plan says now")
    ap.add_argument("--out", default=os.path.join(DATA, "scaling.png"), help="the PNG to write")
    a = ap.parse_args()
    if a.regenerate:
        sweeps = [run_sweep(a.cli, s) for s in SWEEPS]
        for s in sweeps:
            with open(os.path.join(DATA, f"plan_{s['sweep']}.json"), "w") as f:
                json.dump(s, f, indent=1)
                f.write("\n")
        return draw(sweeps, a.out)
    sweeps = [load_json(os.path.join(DATA, f"plan_{s[0]}.json")) for s in SWEEPS]
    if a.check:
        bad = []
        for old, spec in zip(sweeps, SWEEPS):
            bad += stale_fields(old, run_sweep(a.cli, spec))
        if bad:
            print("FAIL: docs/scaling is stale; rerun scripts/plot_scaling.py --regenerate\n  " + "\n  ".join(bad))
            return 1
        print(f"docs/scaling/plan_*.json current ({len(sweeps)} sweeps)")
    rc = draw(sweeps, a.out)
    if rc == 0 and (not os.path.exists(a.out) or os.path.getsize(a.out) == 0):
        print(f"FAIL: {a.out} was not written")
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
