#!/usr/bin/env bash
# The one prepared GPU script: unpack the CUDA `mip`, check parity on the fixtures in f32 (fixture tolerances)
# and f16/bf16 (scaled checks within 1e-2 relative), time `mip bench --sdxl` beside the PyTorch anchor bench in
# the same run, and print a summary with ratios. Everything it writes lands in $OUT.
#
# On the GPU machine (carry gpu-pack):   bash gpu-pack/run.sh
# Tried on the CPU (plumbing only):
#   MIP_BIN=/root/.cache/mip-target/debug/mip MIP_DEVICE=cpu MIP_DTYPES="f32 f16" MIP_BENCH_DTYPES=f32 \
#   MIP_BENCH_ARGS="--tiny --size 128x128 --steps 4 --iters 2" ANCHOR_ARGS="--tiny --reps 2" \
#   PACK=gpu-pack OUT=/tmp/mip-out bash scripts/gpu/run.sh
#
# Environment: PACK (folder with mip.xz, fixtures.tar.xz or fixtures/, bench/, whl/; default: this script's folder), OUT,
# MIP_BIN (a ready binary instead of PACK/mip.xz), MIP_DEVICE (cuda), MIP_DTYPES (parity: "f32 f16 bf16"),
# MIP_BENCH_DTYPES ("f16"), MIP_BENCH_ARGS (extra `mip bench --sdxl` flags), ANCHOR_ARGS, ANCHOR_PYTHON (python3),
# STEP_TIMEOUT (seconds per step, 240). A failing parity or bench is rerun with MIP_KERNELS=off (our
# CUDA kernels off) so the logs tell a kernel fault from anything else.
set -u

HERE="$(cd "$(dirname "$0")" && pwd)"
PACK="${PACK:-$HERE}"
OUT="${OUT:-/tmp/mip-out}"
DEVICE="${MIP_DEVICE:-cuda}"
DTYPES="${MIP_DTYPES:-f32 f16 bf16}"
BENCH_DTYPES="${MIP_BENCH_DTYPES:-f16}"
BENCH_ARGS="${MIP_BENCH_ARGS:-}"
ANCHOR_ARGS="${ANCHOR_ARGS:-}"
PY="${ANCHOR_PYTHON:-python3}"
STEP_TIMEOUT="${STEP_TIMEOUT:-240}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
T0=$SECONDS

say() { printf '[run %4ds] %s\n' $((SECONDS - T0)) "$*"; }

# 1. the binary
if [[ -n "${MIP_BIN:-}" ]]; then
  MIP="$MIP_BIN"
else
  MIP="$WORK/mip"
  xz -dc "$PACK/mip.xz" >"$MIP" && chmod +x "$MIP" || { say "cannot unpack $PACK/mip.xz"; exit 2; }
fi

# 1b. the fixtures (packed as fixtures.tar.xz; an unpacked fixtures/ folder is used as it is)
if [[ ! -f "$PACK/fixtures/index.json" && -f "$PACK/fixtures.tar.xz" ]]; then
  tar -C "$WORK" -xJf "$PACK/fixtures.tar.xz" || { say "cannot unpack $PACK/fixtures.tar.xz"; exit 2; }
  FIXTURES="$WORK/fixtures"
else
  FIXTURES="$PACK/fixtures"
fi

# 2. CUDA libraries from python3's wheels (cublas, cublasLt, curand, nvrtc, cudart; cudnn)
SP="$($PY -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null || true)"
for d in "$SP/nvidia/cu13/lib" "$SP/nvidia/cudnn/lib"; do
  [[ -d "$d" ]] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
say "device $DEVICE; LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

# 3. diffusers for the anchor bench (wheels brought along; the GPU machine has no network)
if [[ -d "$PACK/whl" ]] && ! $PY -c 'import diffusers' 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$PACK"/whl/*.whl &&
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# 4. parity. A failure is rerun with our CUDA kernels off (candle's own ops) to tell a kernel fault from anything
# else (GroupNorm and the convolution run our kernels in f32 too). `VAR=value fn` passes VAR to the function's mip.
parity() { timeout "$STEP_TIMEOUT" "$MIP" parity "$FIXTURES" --device "$DEVICE" --dtype "$1"; }
summary_line() { grep -E 'passed, [0-9]+ failed' "$1" | tail -1; }
declare -A PARITY
for dt in $DTYPES; do
  say "parity $dt"
  parity "$dt" >"$OUT/parity_$dt.log" 2>&1
  rc=$?
  grep -E '^FAIL|passed' "$OUT/parity_$dt.log" | head -20
  PARITY[$dt]="$(summary_line "$OUT/parity_$dt.log") (rc $rc)"
  if [[ $rc -ne 0 ]]; then
    say "parity $dt with MIP_KERNELS=off"
    MIP_KERNELS=off parity "$dt" >"$OUT/parity_${dt}_kernels_off.log" 2>&1
    rc=$?
    PARITY[$dt]+="; kernels off: $(summary_line "$OUT/parity_${dt}_kernels_off.log") (rc $rc)"
  fi
done

# 5. benchmarks, ours then PyTorch's, in the same run (a failing bench of ours once more with the kernels off)
# shellcheck disable=SC2086
bench() { timeout "$STEP_TIMEOUT" "$MIP" bench --sdxl --device "$DEVICE" --dtype "$1" --json $BENCH_ARGS; }
for dt in $BENCH_DTYPES; do
  say "mip bench --sdxl $dt $BENCH_ARGS"
  if ! bench "$dt" >"$OUT/mip_bench_$dt.json" 2>"$OUT/mip_bench_$dt.err"; then
    say "mip bench $dt failed; once more with MIP_KERNELS=off"
    tail -5 "$OUT/mip_bench_$dt.err"
    MIP_KERNELS=off bench "$dt" >"$OUT/mip_bench_$dt.json" 2>"$OUT/mip_bench_${dt}_kernels_off.err" ||
      say "mip bench $dt failed again"
  fi
done
if [[ -f "$PACK/bench/anchor_bench.py" ]]; then
  say "anchor_bench.py $ANCHOR_ARGS"
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 timeout "$STEP_TIMEOUT" $PY "$PACK/bench/anchor_bench.py" $ANCHOR_ARGS >"$OUT/anchor.json" \
    2>"$OUT/anchor.err" || { say "anchor bench failed"; tail -5 "$OUT/anchor.err"; }
else
  say "no anchor_bench.py in the pack (build-cuda.sh without MIP_ANCHOR_BENCH): PyTorch not timed"
fi

# 6. summary
{
  echo "== parity"
  for dt in $DTYPES; do echo "$dt: ${PARITY[$dt]}"; done
  echo "== bench"
  $PY - "$OUT" $BENCH_DTYPES <<'EOF'
import json, os, re, sys
out, dts = sys.argv[1], sys.argv[2:]
def load(p):
    try:
        with open(p) as f:
            return json.load(f)
    except Exception as e:  # noqa: BLE001
        print(f"({os.path.basename(p)}: {e})")
        return {}
a = load(os.path.join(out, "anchor.json"))
ms = lambda k: a[k] * 1e3 if k in a else None
pairs = [("unet step, weighted merge", "unet_step_ms_merge", ["unet_step_s_mip_official", "unet_step_s_mip_sdpa", "unet_step_s_mip_fast"]),
         ("unet step, plain", "unet_step_ms_plain", ["unet_step_s_plain_sdpa"]),
         ("vae decode", "vae_decode_ms_1img", ["vae_decode_s_1img"]),
         ("text encode", "text_encode_ms_6seqs_both", ["text_encode_s_6seqs_both"]),
         ("image encode", "image_encode_ms_2imgs", ["image_encode_s_2imgs_bigG"]),
         ("whole image, estimated", "whole_image_ms_30steps_estimated", ["e2e_30steps_s_mip_official", "e2e_30steps_s_mip_fast"]),
         ("whole image, measured", "whole_image_ms_30steps_measured", ["e2e_30steps_s_mip_official", "e2e_30steps_s_mip_fast", "e2e_30steps_s_plain_sdpa"])]
print(f"anchor: {a.get('device')} {a.get('dtype')} torch {a.get('torch')}")
for dt in dts:
    m = load(os.path.join(out, f"mip_bench_{dt}.json"))
    print(f"-- mip {dt} (peak GPU mem {m.get('peak_gpu_mem_gib', 'n/a')} GiB)")
    for label, mk, aks in pairs:
        ours = m.get(mk)
        if ours is None and mk.startswith("whole"):  # another --steps: the same key with its step count
            pat = re.compile(mk.replace("30steps", r"\d+steps") + "$")
            ours = next((v for k, v in m.items() if pat.match(k)), None)
        row = f"{label:<28} mip {ours if ours is None else round(ours, 2)} ms"
        for ak in aks:
            ref = ms(ak)
            if ref is not None and ours:
                row += f" | {ak} {ref:.2f} ms, ratio torch/mip {ref / ours:.2f}x"
        print(row)
    for k, v in m.items():
        if k.startswith("vae_decode_ms_1img_") or k.endswith("pipeline_vae_estimated"):
            print(f"{k:<44} {round(v, 2)} ms")
    check = m.get("kernel_check")
    for k, v in (check.items() if isinstance(check, dict) else []):
        print(f"kernel {k}: {v}")
    if isinstance(check, str):
        print(f"kernel check: {check}")
    prof = m.get("op_profile")
    for k, v in (prof.items() if isinstance(prof, dict) else []):
        rate = f"{v['tflops']:.3g} TFLOP/s" if "tflops" in v else f"{v.get('gbps', 0):.3g} GB/s"
        print(f"op {k:<44} {v['ms']:8.3f} ms  {rate}")
    blocks = m.get("block_profile")
    for k, v in (blocks.items() if isinstance(blocks, dict) else []):
        print(f"block {k:<41} {v}")
EOF
} | tee "$OUT/summary.txt"
rm -rf "$WORK"
say "done"
