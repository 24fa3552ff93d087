#!/usr/bin/env bash
# Builds the CUDA flavour of `mip` on a machine without a GPU and packs it for the GPU machine.
#
#   scripts/gpu/build-cuda.sh [--toolkit-only]
#
# 1. installs the pinned CUDA 13.0 toolkit wheels (nvcc, nvvm, crt, runtime, cccl, nvrtc, curand, cublas) into a
#    venv under ~/.cache (nvcc >= 13.1 emits PTX that driver 580 rejects, so every wheel is pinned);
# 2. lays out CUDA_ROOT (bin/, include/, lib64/ as symlinks into the wheels, unversioned .so names, and a
#    libcuda.so stub built from the cu* symbols of cuda.h: no driver can be installed here);
# 3. builds `mip --features cuda` into its own target dir (the shared CPU target is not invalidated);
# 4. strips and xz-compresses it into gpu-pack/ (ignored by git, carried to the GPU machine) with the fixture
#    folder (fixtures.tar.xz, without the CPU-only preprocessing case), the PyTorch anchor bench and
#    scripts/gpu/run.sh; the whole pack stays under the 64 MiB a GPU call may carry.
#
# Needs about 6 GB free on disk (toolkit 1.2 GB, target dir 4-5 GB). Environment: CARGO_BUILD_JOBS (default 1), MIP_CUDA_CACHE (default ~/.cache/mip-cuda),
# MIP_CUDA_TARGET (default ~/.cache/mip-target-cuda), MIP_FIXTURES (default tests/fixtures/mip-tiny-sdxl),
# MIP_ANCHOR_BENCH (a folder with the PyTorch anchor benchmark, anchor_bench.py; unset: the pack has no anchor).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${MIP_CUDA_CACHE:-$HOME/.cache/mip-cuda}"
VENV="$CACHE/venv"
CUDA_ROOT="$CACHE/cuda-root"
TARGET="${MIP_CUDA_TARGET:-$HOME/.cache/mip-target-cuda}"
PACK="$ROOT/gpu-pack"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"

WHEELS=(
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14
)

log() { printf '[build-cuda %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

install_wheels() {
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV"
    python3 -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -m pip show nvidia-cuda-nvcc 2>/dev/null | grep -q '^Version: 13.0.88'; then
    log "installing pinned wheels"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${WHEELS[@]}"
  fi
}

# The nvidia/ namespace folder of the venv: nvidia/cu13/{bin,include,lib,nvvm} (13.x wheels).
wheel_dir() {
  local sp
  sp="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
  if [[ -d "$sp/nvidia/cu13" ]]; then echo "$sp/nvidia/cu13"; else echo "$sp/nvidia"; fi
}

# Symlinks every file of each wheel's bin/include/lib/nvvm into CUDA_ROOT.
layout_root() {
  local src
  src="$(wheel_dir)"
  log "laying out $CUDA_ROOT from $src"
  mkdir -p "$CUDA_ROOT/bin" "$CUDA_ROOT/include" "$CUDA_ROOT/lib64"
  for d in bin include; do
    [[ -d "$src/$d" ]] && cp -rs --remove-destination "$src/$d/." "$CUDA_ROOT/$d/"
  done
  # nvcc looks for nvvm/ beside bin/.
  [[ -d "$src/nvvm" ]] && ln -sfn "$src/nvvm" "$CUDA_ROOT/nvvm"
  for lib in "$src"/lib/*.so*; do
    ln -sf "$lib" "$CUDA_ROOT/lib64/$(basename "$lib")"
    local base="${lib##*/}"
    base="${base%%.so*}.so"
    [[ -e "$CUDA_ROOT/lib64/$base" ]] || ln -sf "$lib" "$CUDA_ROOT/lib64/$base"
  done
  [[ -f "$src/lib/libcudart_static.a" ]] && ln -sf "$src/lib/libcudart_static.a" "$CUDA_ROOT/lib64/"
  ln -sfn lib64 "$CUDA_ROOT/lib"
  chmod +x "$CUDA_ROOT"/bin/* 2>/dev/null || true
  build_libcuda_stub
}

# A libcuda.so with every cu* function of cuda.h as an empty symbol: enough for the linker, never loaded on the
# GPU machine (its real driver library is found first through the loader's path).
build_libcuda_stub() {
  local stub="$CUDA_ROOT/lib64/libcuda.so"
  [[ -f "$stub" && ! -L "$stub" ]] && return 0
  log "building the libcuda.so stub"
  local tmp
  tmp="$(mktemp -d)"
  # The functions declared in cuda.h, plus the versioned names its `#define cuFoo cuFoo_v2` lines map them to
  # (the names the driver really exports and cudarc links against).
  {
    grep -oE '\bcu[A-Za-z0-9_]+\s*\(' "$CUDA_ROOT/include/cuda.h" | sed -E 's/\s*\($//'
    grep -oE '^#define\s+cu[A-Za-z0-9_]+\s+cu[A-Za-z0-9_]+' "$CUDA_ROOT/include/cuda.h" | awk '{ print $3 }'
  } | sort -u | awk '{ printf "void %s(void) {}\n", $1 }' >"$tmp/stub.c"
  cc -shared -fPIC -o "$tmp/libcuda.so.1" -Wl,-soname,libcuda.so.1 "$tmp/stub.c"
  rm -f "$stub" "$CUDA_ROOT/lib64/libcuda.so.1"
  mv "$tmp/libcuda.so.1" "$CUDA_ROOT/lib64/libcuda.so.1"
  ln -sf libcuda.so.1 "$stub"
  rm -rf "$tmp"
}

export_env() {
  export CUDA_ROOT CUDA_PATH="$CUDA_ROOT" CUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT"
  export PATH="$CUDA_ROOT/bin:$PATH"
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  export LIBRARY_PATH="$CUDA_ROOT/lib64${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export LD_LIBRARY_PATH="$CUDA_ROOT/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

build_binary() {
  log "cargo build -p mip-cli --features cuda (jobs $CARGO_BUILD_JOBS) into $TARGET"
  local t0=$SECONDS
  (cd "$ROOT" && CARGO_TARGET_DIR="$TARGET" cargo build -p mip-cli --bin mip --features cuda)
  log "cargo build took $((SECONDS - t0)) s"
}

pack() {
  local fixtures="${MIP_FIXTURES:-$ROOT/tests/fixtures/mip-tiny-sdxl}"
  local bench="${MIP_ANCHOR_BENCH:-}"
  log "packing into $PACK"
  rm -rf "$PACK"
  mkdir -p "$PACK/bench"
  strip -o "$PACK/mip" "$TARGET/debug/mip"
  xz -T1 -6 -f "$PACK/mip"
  # The fixtures as one .tar.xz (carry is limited to 64 MiB in all), without what only checks CPU-side code
  # (checked by the CPU tests in every build): the preprocessing case (image decoding, CLIP preprocessing) and the
  # pickled `.bin` adapters (the pickle loader, compared with the safetensors ones); and, to fit, the sdxl_plus
  # case (the Resampler runs the same attention and GEMMs as the sdxl case; it is checked on the CPU).
  local staged
  staged="$(mktemp -d)"
  cp -r "$fixtures" "$staged/fixtures"
  chmod -R u+w "$staged/fixtures"
  rm -rf "$staged/fixtures/cases/preprocess" "$staged/fixtures/cases/sdxl_plus_two_objects_multi_ref" \
    "$staged/fixtures/image_encoder_plus" "$staged/fixtures/adapter/"mip_sdxl_plus_2obj.*
  python3 - "$staged/fixtures/index.json" <<'PY'
import json, os, sys
p = sys.argv[1]
d = json.load(open(p))
skipped = ("/preprocess", "/sdxl_plus_two_objects_multi_ref")
d["cases"] = [c for c in d["cases"] if not c.endswith(skipped)]
json.dump(d, open(p, "w"))
root = os.path.dirname(p)
for case in d["cases"]:
    cp = os.path.join(root, case, "case.json")
    if not os.path.exists(cp):
        continue
    spec = json.load(open(cp))
    binary = spec.pop("adapter_bin", None)
    if binary:
        os.remove(os.path.normpath(os.path.join(root, case, binary)))
    json.dump(spec, open(cp, "w"))
PY
  tar -C "$staged" -cf - fixtures | xz -T"$CARGO_BUILD_JOBS" -9 >"$PACK/fixtures.tar.xz"
  rm -rf "$staged"
  if [[ -n "$bench" && -f "$bench/anchor_bench.py" ]]; then
    cp "$bench"/*.py "$PACK/bench/"
  else
    log "MIP_ANCHOR_BENCH unset or without anchor_bench.py: the pack has no PyTorch anchor"
  fi
  cp "$ROOT/scripts/gpu/run.sh" "$PACK/"
  # diffusers is not installed on the GPU machine (PyTorch and transformers are) and it has no network.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$PACK/whl" \
    diffusers==0.42.1 importlib_metadata zipp || log "could not download the diffusers wheels"
  ls -l "$PACK/mip.xz" "$PACK/fixtures.tar.xz" >&2
  du -sh --apparent-size "$PACK" >&2
}

main() {
  install_wheels
  layout_root
  export_env
  nvcc --version | tail -2 >&2
  if [[ "${1:-}" == "--toolkit-only" ]]; then
    echo "export CUDA_ROOT=$CUDA_ROOT PATH=$CUDA_ROOT/bin:\$PATH CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
    return 0
  fi
  build_binary
  pack
}

main "$@"
