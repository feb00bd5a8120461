#!/usr/bin/env bash
# Prepares, on this machine, what benchmarks/gpu_check.sh needs on a lent CUDA machine that
# reaches no package index (see the device tool): onnxruntime-gpu for that machine's Python,
# unpacked, xz-packed and cut into pieces small enough to travel one per call (a call carries
# at most 64 MiB), and the bundles it checks, exported here on the CPU (the user's path: export
# on a CPU box, run on CUDA): five zoo entries, and causal_self at the benchmark's size.
#
#   bash benchmarks/gpu_prepare.sh     # -> .gpu/ort.tar.xz.part*, .gpu/ort.tar.xz.sha256,
#                                      #    .gpu/artifacts/, .gpu/bench/ (git-ignored locally)
#
# ORT_GPU_VERSION and GPU_PYTHON pick the wheel (onnxruntime-gpu >= 1.30 is built for CUDA 13,
# which the device image's nvidia-* libraries provide).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${ORT_GPU_VERSION:-1.31.1}
python_version=${GPU_PYTHON:-3.12}
piece=${GPU_PIECE:-40M}
gpu=.gpu
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >>.git/info/exclude
mkdir -p "$gpu"
wheel_id="onnxruntime-gpu==$version cp$python_version $piece"
if [ "$(cat "$gpu/ort.id" 2>/dev/null)" != "$wheel_id" ]; then  # pieces made once per wheel
  rm -rf "$gpu"/ort.* "$gpu/wheel" "$gpu/unpacked"
  mkdir -p "$gpu/wheel" "$gpu/unpacked"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation cp --platform manylinux_2_28_x86_64 -d "$gpu/wheel" \
    "onnxruntime-gpu==$version"
  (cd "$gpu/unpacked" && unzip -q ../wheel/*.whl)
  tar cf - -C "$gpu/unpacked" . | xz -9 -T0 | split -b "$piece" -d - "$gpu/ort.tar.xz.part"
  cat "$gpu"/ort.tar.xz.part* | sha256sum | cut -d' ' -f1 >"$gpu/ort.tar.xz.sha256"
  rm -rf "$gpu/wheel" "$gpu/unpacked"
  echo "$wheel_id" >"$gpu/ort.id"
fi
rm -rf "$gpu/artifacts" "$gpu/bench"
attnx export causal_self gqa_rope mha_self encoder_layer decoder_lm sliding_window \
  --out "$gpu/artifacts"
python3 benchmarks/bench.py --entries causal_self --bundles "$gpu/bench"
du -sh "$gpu"/*
