# Side-by-side forward TFLOP/s: ringattn kernel bench JSON files against torch_sdpa.py JSON lines.
import json, sys

ours, peers = {}, {}
for path in sys.argv[1:]:
    text = open(path).read().strip()
    if not text:
        continue
    if text.startswith("["):
        for r in json.loads(text):
            key = (r["S"], r["D"], r["causal"])
            ours.setdefault(key, {})[r["variant"]] = r["fwd_tflops"]
    else:
        for line in text.splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if "fwd_tflops" in r and "gqa" not in r:
                peers[(r["S"], r["D"], r["causal"], r["backend"])] = r["fwd_tflops"]

variants = sorted({v for d in ours.values() for v in d}, key=str)
head = "%7s %4s %6s " % ("tokens", "hdim", "causal") + " ".join(str(v).replace("wgmma", "wg").rjust(max(7, len(str(v).replace("wgmma", "wg")))) for v in variants)
print(head + " %7s %7s %7s %7s %7s" % ("best", "flash", "cudnn", "best/fl", "best/cu"))
for key in sorted(ours):
    s, d, c = key
    row = ours[key]
    best = max(row.values())
    fl = peers.get((s, d, c, "flash"), float("nan"))
    cu = peers.get((s, d, c, "cudnn"), float("nan"))
    print("%7d %4d %6s " % (s, d, "yes" if c else "no") + " ".join(("%.1f" % row.get(v, float("nan"))).rjust(max(7, len(str(v).replace("wgmma", "wg")))) for v in variants)
          + " %7.1f %7.1f %7.1f %7.2f %7.2f" % (best, fl, cu, best / fl if fl == fl else float("nan"),
                                                best / cu if cu == cu else float("nan")))
