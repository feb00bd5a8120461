#!/usr/bin/env bash
# The one GPU check for a lent CUDA machine (see the device tool). That machine reaches no
# package index: its python3 has torch (CUDA), onnx, onnxscript and pytest; onnxruntime-gpu
# travels in pieces, and the bundles come exported on a CPU machine, both made here by
# benchmarks/gpu_prepare.sh into .gpu/. Results go to $OUT (the device tool's folder) or the
# folder given as $1; copy them to benchmarks/results/gpu/ afterwards.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Steps: unpack onnxruntime-gpu; golden parity on CUDA (base, attention23, fused and fp16) and
# on CPU; the CUDA-marked tests; bench on CUDA; each variant of causal_self at the benchmark's
# size against torch on CUDA (batch 1 seq 4096, batch 8 seq 512); generate on CUDA.
# Every step runs even when an earlier one fails, each under a time limit; summary.txt lists
# each step's exit code, and the script exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results/gpu}}
gpu=.gpu
art=$gpu/artifacts
site=/tmp/attnx-site
bin=/tmp/attnx-bin
mkdir -p "$out" "$site" "$bin"
declare -A status
steps=()

step() {  # step NAME SECONDS COMMAND...: run under a time limit, log to $out/NAME.log
  local name=$1 limit=$2
  shift 2
  steps+=("$name")
  echo "== $name: $*" | tee "$out/$name.log"
  timeout "$limit" "$@" >>"$out/$name.log" 2>&1
  status[$name]=$?
  tail -n 8 "$out/$name.log"
}

# The image's python3 and its nvidia-* CUDA 13 libraries; attnx from this checkout.
nvidia_libs=$(python3 -c '
import pathlib, site
dirs = {str(p.parent) for sp in site.getsitepackages()
        for p in pathlib.Path(sp, "nvidia").rglob("lib*.so*")}
print(":".join(sorted(dirs)))')
export LD_LIBRARY_PATH=$nvidia_libs:${LD_LIBRARY_PATH:-}
export PYTHONPATH=$site:$PWD
printf '#!/bin/sh\nexec python3 -c "import sys; from export._cli import main; sys.exit(main(sys.argv[1:]))" "$@"\n' >"$bin/attnx"
chmod +x "$bin/attnx"
export PATH=$bin:$PATH

nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
step unpack 180 bash -c "
  test \"\$(cat $gpu/ort.tar.xz.part* | sha256sum | cut -d' ' -f1)\" = \"\$(cat $gpu/ort.tar.xz.sha256)\" &&
  cat $gpu/ort.tar.xz.part* | python3 -c \"import sys, tarfile
tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('$site', filter='data')\""
step providers 60 python3 -c "import onnxruntime as o, torch
print(o.__file__, o.__version__, o.get_available_providers())
print('torch', torch.__version__, torch.cuda.is_available())"
entries="causal_self gqa_rope mha_self encoder_layer decoder_lm"
bundles=$(for e in $entries; do echo "$art/$e"; done)
window=$art/sliding_window  # attention23 is opset 25 here (Attention's left_window_size)
big=$gpu/bench/causal_self  # d_model 512, 8 heads, seq up to 8192
# verify runs every variant meant for the provider: on CUDA base, attention23 and fp16.
step verify_cuda 180 attnx verify $bundles "$big" --provider cuda --junit "$out/verify_cuda.xml"
# onnxruntime 1.31 (the newest onnxruntime-gpu on PyPI) predates Attention-25: this one fails
# there, and the runner's own choice (bench_cuda below) skips that variant.
step verify_cuda_window 60 attnx verify "$window" --provider cuda
step verify_cpu 120 attnx verify $bundles --provider cpu
step pytest_cuda 240 python3 -m pytest -q -p export.pytest_plugin -m cuda tests/runtime tests/decode
step bench_cuda 120 attnx bench $bundles "$window" --provider cuda --shape seq=256 --iters 200
# torch on CUDA against each variant on CUDA, same inputs; the bench lines say where nodes ran.
vs_torch() {  # vs_torch BATCH SEQ: every CUDA variant of the benchmark-size causal_self
  local rc=0
  for v in base attention23 fp16; do
    attnx bench "$big" --provider cuda --variant "$v" --vs-torch --shape "batch=$1" \
      --shape "seq=$2" --iters 50 || rc=1
  done
  return $rc
}
export -f vs_torch
export big
step vs_torch_b1_s4096 240 bash -c "vs_torch 1 4096"
step vs_torch_b8_s512 120 bash -c "vs_torch 8 512"
step generate_cuda 120 attnx generate "$art/decoder_lm" --prompt-ids 1,2,3 \
  --max-new-tokens 16 --provider cuda

echo "== summary" | tee "$out/summary.txt"
failed=0
for name in "${steps[@]}"; do
  echo "$name ${status[$name]}" | tee -a "$out/summary.txt"
  [ "${status[$name]}" = 0 ] || failed=1
done
exit $failed
