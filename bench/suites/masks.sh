# One GPU (~6-8 min): the one-GPU tests, then `ringattn bench` on a causal window and packed documents beside FlexAttention.
# shellcheck shell=bash
#
# Usage: bench/run.sh masks [fwd|bwd|both]     (new: the masks and masked-kernels issues measure with it)
# Build, the whole one-GPU test binary (GPU_FILTER narrows it), then at S (32768) tokens, bf16, 32
# heads, head_dim 128, one GPU: ours (`ringattn bench -b S -e S`, forward and/or --backward) for
#   window:  --causal --window 4095,0 (and 1023,0): the causal window 4096 (1024) of FlexAttention's rows
#   docs:    --causal --doc-lens of S/2048 documents of 2048 (FlexAttention's packed documents are
#            log-normal lengths of mean 2048: the same mean, not the same lengths)
# and ../shared/peers/flex_masks.py (FlexAttention, compiled, plus cuDNN dense causal as the
# calibration point) in the same call. Each row of ours is skipped visibly when `ringattn bench
# --help` does not list its flag (the mask flags land with the masks issue), and the peer when the
# shared folder is not beside the checkout.
# Env: S (32768), WINDOWS ("4095,0 1023,0"), DOC_LEN (2048), MASK_BENCH_ARGS (extra bench flags),
# GPU_FILTER (gtest filter, default every test), SKIP_TESTS=1, FLEX_TIMEOUT (300).
MODE=${1:-both}
S=${S:-32768}
DOC_LEN=${DOC_LEN:-2048}
ra_budget 540
ra_header
ra_build ringattn_gpu_tests ringattn_cli
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  ra_gtest gpu-tests "$(tmo 200 200)" "$OUT/gpu_tests.log" -- --gtest_filter="${GPU_FILTER:-*}"
fi

MBIN=$BUILD/bin/ringattn
bench_help=$(dry && echo "--window --doc-lens" || "$MBIN" bench --help 2>&1)
# mask_bench LABEL FLAG ARGS...: one row of ours, skipped visibly when bench lacks FLAG.
mask_bench() {
  local label=$1 flag=$2 pass; shift 2
  if ! grep -q -- "$flag" <<<"$bench_help"; then
    ra_result "ours $label" skip "ringattn bench has no $flag yet"
    return 0
  fi
  for pass in fwd bwd; do
    [ "$MODE" = both ] || [ "$MODE" = "$pass" ] || continue
    local extra=(); [ "$pass" = bwd ] && extra=(--backward)
    left 60 || { ra_result "ours $label $pass" skip "budget"; continue; }
    echo "### ringattn bench $label $pass: $*" >>"$OUT/bench.log"
    # shellcheck disable=SC2086
    rt "$(tmo 90 30)" "$MBIN" bench -b "$S" -e "$S" --layout contiguous --dtype bf16 --heads 32 --head-dim 128 \
      -n 5 -w 2 -c 1 "${extra[@]}" "$@" ${MASK_BENCH_ARGS:-} -J "$OUT/ours_${label}_$pass.json" 2>&1 |
      tee -a "$OUT/bench.log" | grep -E "^ +[0-9]|^# (OK|FAILED)" | sed "s/^/$label $pass: /" | tee -a "$SUMMARY"
    ra_result "ours $label $pass" "${PIPESTATUS[0]}" "$*"
  done
}
note "# ---- ours, one GPU, S=$S: tokens | per GPU | ms | TFLOP/s | ... (bench's own columns)"
mask_bench dense-causal --causal --causal
for w in ${WINDOWS:-4095,0 1023,0}; do
  mask_bench "window${w%%,*}" --window --causal --window "$w"
done
docs=$(python3 -c "print(','.join(['$DOC_LEN'] * ($S // $DOC_LEN)))")
mask_bench "docs$DOC_LEN" --doc-lens --causal --doc-lens "$docs"

note "# ---- FlexAttention (../shared/peers/flex_masks.py, MODE=$MODE), same call"
if left 90; then
  ra_peer_flex "$(tmo "${FLEX_TIMEOUT:-300}" 10)" MODE="$MODE" >"$OUT/flex.jsonl" 2>&1
  rc=$?
  if [ "$rc" = 77 ]; then
    ra_result flex skip "$(head -1 "$OUT/flex.jsonl")"
  else
    ra_result flex "$rc" "$(grep -c '^{' "$OUT/flex.jsonl" 2>/dev/null) rows"
  fi
  dry || python3 - "$OUT/flex.jsonl" <<'PY' | tee -a "$SUMMARY"
import json, sys
for line in open(sys.argv[1], errors="replace"):
    try: r = json.loads(line)
    except ValueError: continue
    tf = r.get("flex_tflops_visible", r.get("tflops", float("nan")))
    ms = r.get("flex_ms", r.get("ms", float("nan")))
    vis = r.get("visible_fraction")
    print(f"  {r['name'][:44]:<44} S={r['S']} {'fwd+bwd' if r['bwd'] else 'fwd':>7} {ms:9.3f} ms {tf:7.1f} TFLOP/s"
          + (f" (visible {100 * vis:.1f}%)" if vis is not None else ""))
PY
else
  ra_result flex skip budget
fi
