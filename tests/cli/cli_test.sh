#!/usr/bin/env bash
# One CLI end-to-end case under mpiexec: cli_test.sh CASE CLI PYTHON HELPER WORKDIR NP MPIEXEC... -n
# Exit 0 pass, 1 fail, 77 skip (numpy missing).
set -uo pipefail
case_name=$1 cli=$2 py=$3 helper=$4 work=$5 np=$6
shift 6
mpi=("$@" "$np")  # the mpiexec prefix ends with its -n flag
rm -rf "$work" && mkdir -p "$work"
out=$work/stdout.txt err=$work/stderr.txt

run() {  # run ringattn under mpiexec, keep the output, return its exit code
  echo "+ ${mpi[*]} $cli run $*" >&2
  timeout 240 "${mpi[@]}" "$cli" run --backend cpu "$@" >"$out" 2>"$err"
  local rc=$?
  cat "$out"
  cat "$err" >&2
  return $rc
}
die() { echo "FAIL: $*" >&2; exit 1; }
expect_ok() { run "$@" || die "ringattn exited $?"; }
# expect_error PATTERN ARGS...: non-zero exit, PATTERN in the error output of every rank, no hang.
expect_error() {
  local pattern=$1
  shift
  run "$@"
  local rc=$?
  [ $rc -eq 124 ] && die "ringattn hung (timeout)"
  [ $rc -ne 0 ] || die "ringattn exited 0 on bad input"
  local n
  n=$(grep -c "ringattn: error:.*$pattern" "$err")
  [ "$n" -ge "$np" ] || die "expected '$pattern' in the error of all $np ranks, found it $n times"
  echo "ok: exit $rc, every rank names '$pattern'"
}
numpy_case() {  # numpy_case MAKE_ARGS -- RUN_ARGS -- COMPARE_ARGS
  local make=() runa=() cmp=()
  while [ "$1" != "--" ]; do make+=("$1"); shift; done; shift
  while [ "$1" != "--" ]; do runa+=("$1"); shift; done; shift
  cmp=("$@")
  "$py" "$helper" make "$work/in" "${make[@]}"
  local rc=$?
  [ $rc -eq 77 ] && exit 77
  [ $rc -eq 0 ] || die "making the numpy inputs failed"
  expect_ok --load "$work/in" --save "$work/out" "${runa[@]}"
  "$py" "$helper" compare "$work/in" "$work/out" "${cmp[@]}" || die "numpy comparison failed"
  ls "$work/out" | grep -q tmp && die "temporary files left in --save directory"
  return 0
}

case $case_name in
  npy_fp64_zigzag_causal)
    numpy_case --batch 2 --seq 96 --heads 4 --kv-heads 2 --head-dim 24 --dtype float64 -- \
      --dtype fp64 --causal --layout zigzag -- --causal --tol 1e-10 --expect-dtype float64 ;;
  npy_fp64_striped_gqa)
    numpy_case --batch 1 --seq 64 --heads 6 --kv-heads 2 --head-dim 17 --dtype float64 -- \
      --causal --layout striped -- --causal --tol 1e-10 --expect-dtype float64 ;;
  npy_fp32_contiguous)
    numpy_case --batch 2 --seq 40 --heads 2 --head-dim 16 --dtype float32 -- \
      --layout contiguous --check -- --tol 2e-6 --expect-dtype float32 ;;
  npy_bf16_zigzag)
    numpy_case --batch 1 --seq 64 --heads 2 --head-dim 32 --dtype float32 -- \
      --dtype bf16 --causal --layout zigzag --check -- --causal --tol 5e-2 --expect-dtype float32 ;;
  npy_fp64_backward)
    numpy_case --batch 2 --seq 48 --heads 6 --kv-heads 2 --head-dim 8 --dtype float64 --with-do -- \
      --dtype fp64 --causal --layout zigzag --backward --check -- --causal --backward --tol 1e-10 ;;
  backward_missing_do)
    "$py" "$helper" make "$work/in" --seq 24 --heads 2 --head-dim 8 || exit $?
    expect_error "do.npy" --load "$work/in" --backward ;;
  backward_check)
    expect_ok --seq-len 96 --heads 4 --kv-heads 1 --head-dim 16 --causal --layout striped --backward --check --dtype fp32
    grep -q "gradient check" "$work/stdout.txt" || die "no gradient check line"
    grep -qx PASS "$work/stdout.txt" || die "no PASS line" ;;
  backward_check_sampled)
    expect_ok --seq-len 2400 --heads 4 --kv-heads 2 --head-dim 16 --causal --layout zigzag --backward --check \
      --check-rows 4 --dtype fp32
    grep -q "dK/dV on .* key rows (sampled)" "$work/stdout.txt" || die "expected a sampled gradient check"
    grep -qx PASS "$work/stdout.txt" || die "no PASS line" ;;
  backward_check_catches_fault)
    # Each gradient scaled by 1.5 after the ring (RINGATTN_RUN_FAULT): --check must fail with exit 2,
    # on the exhaustive and on the sampled path.
    for g in dq dk dv; do
      for rows in 0 4; do
        RINGATTN_RUN_FAULT=$g run --seq-len 480 --heads 4 --kv-heads 2 --head-dim 16 --causal --layout zigzag \
          --backward --check --check-rows $rows --dtype fp32 >/dev/null 2>&1
        rc=$?
        [ $rc -eq 2 ] || die "corrupted $g (--check-rows $rows) exited $rc, expected 2"
        grep -qx FAIL "$work/stdout.txt" || die "corrupted $g (--check-rows $rows): no FAIL line"
      done
    done
    echo "ok: every corrupted gradient fails the check" ;;
  check)
    expect_ok --seq-len 384 --heads 4 --kv-heads 2 --head-dim 32 --causal --layout zigzag --check --seed 7
    grep -qx PASS "$work/stdout.txt" || die "no PASS line" ;;
  check_sampled)
    expect_ok --seq-len 1K --heads 2 --head-dim 16 --layout striped --check --check-rows 5 --dtype fp64
    grep -q "sampled" "$work/stdout.txt" || die "expected a sampled check"
    grep -qx PASS "$work/stdout.txt" || die "no PASS line" ;;
  json)
    expect_ok --seq-len 128 --heads 2 --head-dim 8 --check --json "$work/run.json"
    "$py" - "$work/run.json" "$np" <<'PY' || die "bad JSON"
import json, sys
d = json.load(open(sys.argv[1]))
assert d["ranks"] == int(sys.argv[2]) and d["check"]["pass"] is True, d
assert len(d["per_rank"]) == d["ranks"] and len(d["per_rank"][0]["hops"]) == d["ranks"], d
assert d["problem"]["seq_len"] == 128 and d["timing"]["wall_ms"] > 0
print("json ok")
PY
    ;;
  bad_load_*)
    kind=${case_name#bad_load_}
    "$py" "$helper" corrupt "$work/in" "$kind" || die "making the broken files failed"
    file=q.npy
    [ "$kind" = kshape ] && file=k.npy
    [ "$kind" = missing ] && file=v.npy
    expect_error "$work/in/$file.*hint" --load "$work/in" ;;
  load_flag_conflict)
    "$py" "$helper" corrupt "$work/in" kshape >/dev/null || die "making files failed"
    "$py" - "$work/in" <<'PY' || die "fixing k.npy failed"
import shutil, sys
shutil.copy(sys.argv[1] + "/q.npy", sys.argv[1] + "/k.npy")
PY
    expect_error "--head-dim 64 conflicts" --load "$work/in" --head-dim 64 ;;
  unwritable_save)
    touch "$work/file"
    expect_error "--save.*hint" --seq-len 64 --heads 1 --head-dim 8 --save "$work/file/sub" ;;
  seq_not_divisible)
    expect_error "--seq-len 100 is not divisible by 6" --seq-len 100 --layout zigzag ;;
  kv_heads)
    expect_error "--kv-heads 3 does not divide --heads 8" --seq-len 64 --heads 8 --kv-heads 3 ;;
  unknown_names)
    expect_error "--layout" --seq-len 64 --layout diagonal
    expect_error "--dtype" --seq-len 64 --dtype fp8
    expect_error "--backend" --seq-len 64 --backend tpu
    expect_error "--seq-len" --seq-len 4Q ;;
  mask_window)  # causal sliding window, contiguous, forward and backward
    numpy_case --batch 2 --seq 96 --heads 4 --kv-heads 2 --head-dim 8 --with-do --window 10,0 -- \
      --dtype fp64 --causal --window 10,0 --layout contiguous --backward --check -- --causal --backward --tol 1e-10 ;;
  mask_window_bidir)  # two-sided window without causal, striped
    numpy_case --batch 1 --seq 64 --heads 2 --head-dim 8 --window 3,5 -- \
      --dtype fp64 --window 3,5 --layout striped -- --tol 1e-10 ;;
  mask_docs_cu)  # documents from an int32 cu_seqlens.npy, zigzag, backward
    numpy_case --batch 2 --seq 96 --heads 4 --kv-heads 2 --head-dim 8 --with-do --doc-lens 10,40,7,39 --cu-int32 -- \
      --dtype fp64 --causal --layout zigzag --backward -- --causal --backward --tol 1e-10 ;;
  mask_docs_flag)  # documents from --doc-lens, striped, non-causal
    numpy_case --batch 1 --seq 64 --heads 2 --head-dim 8 --with-do --doc-lens 5,27,32 --no-cu-seqlens -- \
      --dtype fp64 --doc-lens 5,27,32 --layout striped --backward -- --backward --tol 1e-10 ;;
  mask_stride)  # strided pattern, causal
    numpy_case --batch 1 --seq 96 --heads 2 --head-dim 8 --with-do --stride 7 -- \
      --dtype fp64 --causal --stride 7 --layout striped --backward -- --causal --backward --tol 1e-10 ;;
  mask_global)  # global tokens with documents (sinks per document), auto layout
    numpy_case --batch 1 --seq 64 --heads 2 --head-dim 8 --with-do --global-tokens 3 --window 2,2 --doc-lens 24,40 -- \
      --dtype fp64 --global-tokens 3 --window 2,2 --backward -- --backward --tol 1e-10 ;;
  mask_heads)  # patterns on the first heads only (GQA: whole kv groups)
    numpy_case --batch 2 --seq 64 --heads 6 --kv-heads 3 --head-dim 8 --with-do --window 4,0 --mask-heads 4 -- \
      --dtype fp64 --causal --window 4,0 --mask-heads 4 --layout zigzag --backward -- --causal --backward --tol 1e-10 ;;
  mask_combo)  # everything at once, fp32, check on
    numpy_case --batch 1 --seq 128 --heads 4 --kv-heads 2 --head-dim 16 --dtype float32 --with-do --window 5,0 \
      --stride 9 --global-tokens 2 --doc-lens 50,30,48 --mask-heads 2 -- \
      --causal --window 5,0 --stride 9 --global-tokens 2 --mask-heads 2 --backward --check -- \
      --causal --backward --tol 2e-5 ;;
  mask_balanced)  # the balanced layout: 128-token blocks given to ranks by visible pairs
    numpy_case --batch 1 --seq 512 --heads 2 --head-dim 8 --with-do --doc-lens 100,300,12,100 -- \
      --dtype fp64 --causal --layout balanced --backward -- --causal --backward --tol 1e-10 ;;
  mask_check)  # seeded masked problems through the exhaustive and the sampled --check
    for rows in 0 4; do
      expect_ok --seq-len 192 --heads 4 --kv-heads 2 --head-dim 8 --causal --window 20,0 --doc-lens 64,100,28 \
        --stride 11 --global-tokens 2 --mask-heads 2 --backward --check --check-rows $rows --dtype fp32
      grep -qx PASS "$work/stdout.txt" || die "no PASS line (--check-rows $rows)"
    done ;;
  mask_json)  # auto layout resolution, visible pairs and per-hop bytes in --json
    expect_ok --seq-len 128 --heads 2 --head-dim 8 --causal --window 15,0 --backward --json "$work/w.json"
    grep -q "max/mean" "$work/stdout.txt" || die "no visible-pairs line"
    expect_ok --seq-len 128 --heads 2 --head-dim 8 --causal --backward --json "$work/c.json"
    "$py" - "$work/w.json" "$work/c.json" "$np" <<'PY' || die "bad JSON"
import json, sys
w, c, np_ = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), int(sys.argv[3])
assert w["problem"]["layout"] == "auto" and w["problem"]["resolved_layout"] == "contiguous", w["problem"]
assert c["problem"]["resolved_layout"] == ("zigzag" if 128 % (2 * np_) == 0 and np_ > 0 else "contiguous"), c["problem"]
for d in (w, c):
    assert len(d["per_rank"]) == np_
    total = 0
    for r in d["per_rank"]:
        assert r["visible_pairs"] > 0
        total += r["visible_pairs"]
        for key, grad in (("hops", False), ("backward_hops", True)):
            assert len(r[key]) >= 1, r
            for h in r[key]:
                for f in ("sent_bytes", "received_bytes", "peers"):
                    assert f in h, (key, h)
                assert ("grad_sent_bytes" in h and "grad_received_bytes" in h) == grad, h
                for p in h["peers"]:
                    assert set(p) == {"rank", "sent_bytes", "received_bytes"}, p
    assert abs(total - d["visible_pairs"]["total"]) < 1e-6 * total
# causal window 15,0 over 128 tokens, 2 heads: sum over i of min(i + 1, 16)
assert w["visible_pairs"]["total"] == 2 * sum(min(i + 1, 16) for i in range(128)), w["visible_pairs"]
print("json ok")
PY
    ;;
  mask_errors)  # every bad mask value stops every rank, naming the flag and the fix
    base=(--seq-len 64 --heads 4 --kv-heads 2 --head-dim 8)
    expect_error "--window -2,0 has a side below -1.*hint" "${base[@]}" --window -2,0
    expect_error "--window 'x' is not an integer.*hint" "${base[@]}" --window x,0
    expect_error "--window '5' has 1 part.*hint" "${base[@]}" --window 5
    expect_error "--window '1,2,3' has 3 parts.*hint" "${base[@]}" --window 1,2,3
    expect_error "--doc-lens lengths sum to 60.*hint" "${base[@]}" --doc-lens 30,30
    expect_error "--doc-lens length 0 must be at least 1.*hint" "${base[@]}" --doc-lens 32,0,32
    expect_error "--doc-lens 'a' is not an integer.*hint" "${base[@]}" --doc-lens 32,a
    expect_error "--stride 0 must be positive.*hint" "${base[@]}" --stride 0
    expect_error "--stride -3 must be positive.*hint" "${base[@]}" --stride -3
    expect_error "--global-tokens -1 is negative.*hint" "${base[@]}" --global-tokens -1
    expect_error "--mask-heads 6 exceeds the 4 query heads.*hint" "${base[@]}" --window 2,0 --mask-heads 6
    expect_error "--mask-heads 1 is not a multiple.*hint" "${base[@]}" --window 2,0 --mask-heads 1
    expect_error "--mask-heads 2 without a pattern.*hint" "${base[@]}" --mask-heads 2 ;;
  bad_cu_seqlens)  # a bad cu_seqlens.npy, or one beside --doc-lens, stops every rank naming the file
    "$py" "$helper" make "$work/in" --batch 1 --seq 64 --heads 2 --head-dim 8 || exit $?
    "$py" "$helper" cu "$work/in" 0,30,64 >/dev/null || die "cu failed"
    expect_error "--doc-lens and '.*cu_seqlens.npy' both give the documents.*hint" --load "$work/in" --doc-lens 30,34
    "$py" "$helper" cu "$work/in" 0,30,60 >/dev/null
    expect_error "cu_seqlens.npy' must hold .* from 0 to 60.*hint" --load "$work/in"
    "$py" "$helper" cu "$work/in" 1,30,64 >/dev/null
    expect_error "cu_seqlens.npy' must hold.*hint" --load "$work/in"
    "$py" "$helper" cu "$work/in" 0,30,30,64 --descr '<i4' >/dev/null
    expect_error "cu_seqlens.npy' must hold.*hint" --load "$work/in"
    "$py" "$helper" cu "$work/in" 0 >/dev/null
    expect_error "cu_seqlens.npy' must hold.*hint" --load "$work/in"
    "$py" "$helper" cu "$work/in" 0,30,64 --descr '<f8' >/dev/null
    expect_error "cu_seqlens.npy' is not a usable .npy file: dtype is a float.*hint" --load "$work/in"
    "$py" "$helper" cu "$work/in" 0,30,64 --shape2d >/dev/null
    expect_error "cu_seqlens.npy' is not a usable .npy file: shape .* is not one-dimensional.*hint" --load "$work/in" ;;
  load_values_named)  # a size from q.npy is named as the file's, not as a flag the user never passed
    "$py" "$helper" make "$work/in" --batch 1 --seq 100 --heads 2 --head-dim 8 || exit $?
    expect_error "the sequence length (axis 1) of '$work/in/q.npy', 100 is not divisible by 3" --load "$work/in"
    grep -q -- "--seq-len 100 is" "$work/stderr.txt" && die "the message names --seq-len, which was not given"
    echo "ok: the file's value is named" ;;
  save_locked)  # a second job on a --save directory in use is refused up front; no stale lock after
    mkdir -p "$work/out"
    echo "+ flock $work/out/.ringattn-save.lock (another job holding the directory)" >&2
    flock "$work/out/.ringattn-save.lock" timeout 120 "${mpi[@]}" "$cli" run --backend cpu --seq-len 48 --heads 2 \
      --head-dim 8 --save "$work/out" >"$out" 2>"$err"
    rc=$?
    cat "$err" >&2
    [ $rc -eq 1 ] || die "a locked --save directory gave exit $rc, expected 1"
    grep -q "ringattn: error:.*--save '$work/out' is being written by another ringattn job.*hint" "$err" ||
      die "no message naming --save and the other job"
    ls "$work/out" | grep -q npy && die "the refused job wrote files"
    expect_ok --seq-len 48 --heads 2 --head-dim 8 --save "$work/out"
    [ -f "$work/out/out.npy" ] || die "no out.npy once the directory is free"
    echo "ok: refused while locked, written once free" ;;
  nan_input)  # one NaN in q: that row's out is NaN (not 0), the summary counts it, --save keeps it
    "$py" "$helper" make "$work/in" --batch 1 --seq 48 --heads 2 --head-dim 8 --dtype float64 || exit $?
    "$py" - "$work/in" <<'PY' || die "poking a NaN into q.npy failed"
import numpy as np, sys
q = np.load(sys.argv[1] + "/q.npy"); q[0, 17, 1, 3] = np.nan; np.save(sys.argv[1] + "/q.npy", q)
PY
    expect_ok --load "$work/in" --dtype fp64 --save "$work/out"
    grep -q "non-finite outputs: 8 in out" "$work/stdout.txt" || die "the summary does not count the 8 NaN outputs"
    "$py" - "$work/out" <<'PY' || die "NaN did not propagate like the reference"
import numpy as np, sys
o = np.load(sys.argv[1] + "/out.npy"); l = np.load(sys.argv[1] + "/lse.npy")
bad = ~np.isfinite(o)
assert bad.sum() == 8 and bad[0, 17, 1].all(), np.argwhere(bad)
assert np.isnan(l[0, 1, 17]) and np.isfinite(np.delete(l.ravel(), 1 * 48 + 17)).all(), l
print("NaN row propagated")
PY
    expect_ok --seq-len 48 --heads 2 --head-dim 8
    grep -q "non-finite outputs: none" "$work/stdout.txt" || die "a clean run must say none" ;;
  *) die "unknown case $case_name" ;;
esac
echo "PASS: $case_name"
