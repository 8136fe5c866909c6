#!/usr/bin/env bash
# Every GPU check issue 16 asks for, in one call of a few minutes (a lent device is counted by the second).
# Figures and logs go to $OUT (the device tool brings them back). Try it on the CPU first:
#     DEVICE=cpu SIZE=--smoke OUT=/tmp/gpu-dry bash bench/gpu_all.sh
# On the device:  bash bench/gpu_all.sh        (PYTHON: an interpreter with a CUDA torch and this package)
#
#   run.json / run.txt      bench/run.py --device cuda on a char GPT with 10-50 ms steps (MODEL): step_ratio_sinks,
#                           loop_ratio_raw (the pinned-copy path of on_step_end is the one these steps take),
#                           step_ratio_monitoring (the sampler on and off), publish_us, replay, the journal
#   gpu_check.json / .txt   bench/gpu_check.py: the NVML system records on the real GPU
#   control.txt             bench/control_agreement.py: the control agreement, 2 processes, old and new path
#   device.txt              nvidia-smi, torch's view of the device, the date
# Each part runs under its own time limit; a part that fails is recorded and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:---quick}
MODEL=${MODEL:-n_layer=8,n_head=8,n_embd=512}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
status=0

part() {  # part NAME SECONDS COMMAND...: run it, its output in $OUT/NAME.txt, its exit status recorded
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/parts.txt"
    [ "$rc" -eq 0 ] || status=1
}

{ date -u; nvidia-smi 2>&1 || true
  "$PYTHON" -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
} > "$OUT/device.txt" 2>&1
part run 330 "$PYTHON" bench/run.py "$SIZE" --device "$DEVICE" --model "$MODEL" --json "$OUT/run.json"
if [ "$DEVICE" = cuda ]; then
    part gpu_check 120 "$PYTHON" bench/gpu_check.py --steps 200 --rounds 2 --out "$OUT/gpu_check"
fi
part control 90 "$PYTHON" bench/control_agreement.py --calls 300 --steps-ms 0,2,20
echo "figures in $OUT"
exit $status
