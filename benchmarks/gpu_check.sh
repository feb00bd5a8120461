#!/usr/bin/env bash
# The one GPU check for a lent CUDA machine (see the device tool): install onnxruntime-gpu,
# export a few zoo entries, verify golden parity on CUDA (fp32 variants and the fp16 variant),
# run the CUDA-marked tests and bench on CUDA. Results go to $OUT (the device tool's folder)
# or to the folder given as $1; copy them to benchmarks/results/gpu/ afterwards.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Every step runs even when an earlier one fails; the summary at the end lists each step's
# exit code, and the script exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$out"
declare -A status

step() {  # step NAME COMMAND...: run, log to $out/NAME.log, remember the exit code
  local name=$1; shift
  echo "== $name: $*" | tee "$out/$name.log"
  "$@" >>"$out/$name.log" 2>&1
  status[$name]=$?
  tail -n 5 "$out/$name.log"
}

step venv python3 -m venv /tmp/attnx-gpu
# shellcheck disable=SC1091
. /tmp/attnx-gpu/bin/activate
step install_torch pip install torch==2.13.0
step install_attnx pip install -e '.[cuda,export,test]'
step providers python -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
entries="causal_self gqa_rope mha_self encoder_layer decoder_lm"
step export attnx export $entries --out "$out/artifacts"
bundles=$(for e in $entries; do echo "$out/artifacts/$e"; done)
# verify runs every variant meant for CUDA: base, attention23, fused (fp32) and fp16.
step verify_cuda attnx verify $bundles --provider cuda --junit "$out/verify_cuda.xml"
step verify_cpu attnx verify $bundles --provider cpu
step pytest_cuda python -m pytest -q -m cuda tests
step bench_cuda attnx bench $bundles --provider cuda --shape seq=512 --iters 200 --json
step bench_fp16 attnx bench "$out/artifacts/causal_self" --provider cuda --variant fp16 \
  --shape seq=4096 --shape batch=1 --iters 50 --json
step generate_cuda attnx generate "$out/artifacts/decoder_lm" --prompt-ids 1,2,3 \
  --max-new-tokens 16 --provider cuda

echo "== summary" | tee "$out/summary.txt"
failed=0
for name in venv install_torch install_attnx providers export verify_cuda verify_cpu \
  pytest_cuda bench_cuda bench_fp16 generate_cuda; do
  echo "$name ${status[$name]:-skipped}" | tee -a "$out/summary.txt"
  [ "${status[$name]:-1}" = 0 ] || failed=1
done
exit $failed
