#!/usr/bin/env bash
# qtl's GPU measurements in one command (target: <= 8 minutes on one NVIDIA GPU):
#   1. the circuit benchmark: qtl's fast simulator at n = 8, 14, 19, 24 and PennyLane
#      default.qubit (jax, jit) at n = 8, 14, 19 (value_and_grad of the dressed head);
#   2. Table III at the study's setting: ResNet-50, 224x224, batch 32 zero images, CXR-8/14/19,
#      CDL and DQC, JAX (PennyLane and fast columns), PyTorch eager, TensorFlow XLA;
#   3. on a machine with >= 2 GPUs only: one run's scaling, 1 vs 2 GPUs in one process and
#      1 vs 2 processes of one GPU each (python -m qtl.bench.devices), throughput + efficiency.
# JSON (and Markdown for Table III) go to docs/bench/gpu/.
#
#   scripts/gpu-bench.sh             # run on the GPU machine, from the repository root
#   scripts/gpu-bench.sh --dry-run   # print the commands and check them (configs compose,
#                                    # extras installed, every Table III case listed); no GPU
#
# Environment (all optional):
#   PYTHON        interpreter with qtl installed            (default: .venv/bin/python, else python)
#   QTL_GPU_OUT   output folder                             (default: docs/bench/gpu)
#   QTL_TORCH_COMPILE  [false] or [false,true]: add torch.compile columns (their compile
#                 takes minutes, which does not fit the 8-minute budget)  (default: [false])
#
# Needs GPU builds of the frameworks: jax[cuda12], a CUDA build of torch and TensorFlow's GPU
# wheel (tensorflow[and-cuda]==2.21.*); each record's `device` field says where it ran.
# Each case has a time cap (bench_step.case_timeout_s) and every part a wall budget
# (coreutils `timeout`), so the script ends in time; the JSON keeps every finished case.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
OUT=${QTL_GPU_OUT:-docs/bench/gpu}
TORCH_COMPILE=${QTL_TORCH_COMPILE:-[false]}

# fast at n = 8..24; PennyLane up to 19 (at 24 it would need ~50 GB and minutes to compile)
CIRCUIT=(mode=bench_circuit 'bench_circuit.qubits=[8,14,19]'
  'bench_circuit.simulators=[fast,pennylane]' bench_circuit.max_seconds=15
  "bench_circuit.out=$OUT/circuit.json")
CIRCUIT_24=(mode=bench_circuit 'bench_circuit.qubits=[24]' 'bench_circuit.simulators=[fast]'
  bench_circuit.max_seconds=15 "bench_circuit.out=$OUT/circuit-n24.json")
# CXR-19 first: if the budget runs out, the headline case (DQC-19 vs CDL) is already measured
TABLE3=(mode=bench_step experiment=paper 'bench_step.backends=[jax,torch,tf]'
  'bench_step.tasks=[cxr19,cxr14,cxr8]' 'bench_step.jax_simulators=[pennylane,fast]'
  "bench_step.torch_compile=$TORCH_COMPILE" bench_step.batch=32 bench_step.image_px=224
  bench_step.warmup=10 bench_step.steps=30 bench_step.max_seconds=30
  bench_step.case_timeout_s=120 bench_step.max_rss_gb=64 "bench_step.out=$OUT/table3.json")
# one run over 2 GPUs: the demo's DQC head on the small ResNet (seconds per epoch), same global
# batch in every case; devices in one process, then processes (jax.distributed, local port)
SCALE=(debug=tiny head=dqc train.max_epochs=3 train.patience=10 train.batch_size=64
  data.synth_sizes.train=2048)

show() {  # one command, copy-pasteable: arguments with brackets or commas in single quotes
  local a
  printf ' '
  for a in "$@"; do
    if [[ $a == *[][,]* ]]; then printf " '%s'" "$a"; else printf ' %s' "$a"; fi
  done
  printf '\n'
}

echo "qtl gpu-bench: output in $OUT"
echo "commands:"
for part in CIRCUIT CIRCUIT_24 TABLE3; do
  declare -n args=$part
  show "$PYTHON" launch.py "${args[@]}"
done
show "$PYTHON" -m qtl.bench.devices --devices 1 2 --out "$OUT/devices.json" --overrides "${SCALE[@]}"
show "$PYTHON" -m qtl.bench.devices --devices 1 --processes 1 2 --out "$OUT/processes.json" --overrides "${SCALE[@]}"

if [[ $DRY == 1 ]]; then
  # the configs compose (a typo in a key fails here) and every Table III case is listed
  # after bench_step's own checks, which include the torch and tf extras being installed
  "$PYTHON" launch.py "${CIRCUIT[@]}" --cfg job >/dev/null
  "$PYTHON" launch.py "${CIRCUIT_24[@]}" --cfg job >/dev/null
  "$PYTHON" launch.py "${SCALE[@]}" train.devices=2 train.processes=2 --cfg job >/dev/null
  "$PYTHON" launch.py "${TABLE3[@]}" bench_step.dry_run=true \
    "bench_step.out=${TMPDIR:-/tmp}/qtl-gpu-bench-dry-run.json"
  echo "dry run: all commands check out"
  exit 0
fi

command -v nvidia-smi >/dev/null || { echo "gpu-bench: no nvidia-smi: not an NVIDIA machine" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
mkdir -p "$OUT"
# what each framework sees (a CPU-only build would time the CPU; said here, not discovered later)
"$PYTHON" -c 'import jax; print("jax:", jax.devices())' || true
"$PYTHON" -c 'import torch; print("torch: cuda", torch.cuda.is_available(), torch.version.cuda)' || true
TF_CPP_MIN_LOG_LEVEL=2 "$PYTHON" -c 'import tensorflow as tf; print("tf:", tf.config.list_physical_devices("GPU"))' || true

start=$SECONDS
timeout 110 "$PYTHON" launch.py "${CIRCUIT[@]}" || echo "circuit benchmark stopped (budget 110 s)"
timeout 40 "$PYTHON" launch.py "${CIRCUIT_24[@]}" || echo "n=24 circuit stopped (budget 40 s)"
remaining=$(( 470 - (SECONDS - start) ))
timeout "$remaining" "$PYTHON" launch.py "${TABLE3[@]}" || echo "Table III stopped (budget ${remaining} s); the JSON and Markdown hold the finished cases"
gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
if [[ $gpus -ge 2 ]]; then
  remaining=$(( 600 - (SECONDS - start) ))
  if [[ $remaining -gt 60 ]]; then
    timeout "$remaining" "$PYTHON" -m qtl.bench.devices --devices 1 2 \
      --out "$OUT/devices.json" --overrides "${SCALE[@]}" || echo "devices scaling stopped"
    remaining=$(( 660 - (SECONDS - start) ))
    timeout "$remaining" "$PYTHON" -m qtl.bench.devices --devices 1 --processes 1 2 \
      --out "$OUT/processes.json" --overrides "${SCALE[@]}" || echo "processes scaling stopped"
  else
    echo "multi-GPU scaling skipped: no time left in the budget"
  fi
else
  echo "multi-GPU scaling skipped: $gpus GPU(s) here"
fi
echo "gpu-bench: $(( SECONDS - start )) s; results in $OUT"
ls -l "$OUT"
