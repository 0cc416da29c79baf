#!/usr/bin/env bash
# The GPU check of issue 5, one command, at most 8½ minutes on one H100/H200 (its timeouts):
#   1. lab/bench.py on GPT-2 small, B=16, T=1024, bf16, torch.compile: the baseline loop and the
#      project's step under every strategy (acceptance 3: ≥ 40% MFU, param within 3% of none);
#   2. lab/bench.py on the two small configs (eager), for the record;
#   2b. lab/bench.py --batched: K fine-tunes as one stacked model (lab/batched.py) against one run;
#   3. a real fine-tune with train.py on the GPU (--data real when a data folder is there,
#      else the synthetic default), align + fine-tune under the param constraint;
#   4. in a call of its own, GPU_PRESETS=paper (or paper-real-gpu, real-gpu): that sweep only.
# Everything lands in one folder; copy its tables into BENCHMARKS.md with the date and device.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # default: gpu_check_<date>
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_$(date +%Y%m%d_%H%M%S)}
mkdir -p "$OUT"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }

{ date; uptime; nvidia-smi; git rev-parse --short HEAD
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
log "env: $(tail -1 "$OUT/env.txt")"
PRESETS=${GPU_PRESETS:-}
[ "$PRESETS" = 0 ] && PRESETS=""
if [ "$PRESETS" = 1 ]; then  # each preset fills most of one 10-minute call: name the one to run
    log "GPU_PRESETS=1 is not a preset: call again with GPU_PRESETS=paper, then paper-real-gpu, then real-gpu"
    exit 2
fi
DATA=${SAFETY_DATA_DIR:-../shared/data}

if [ -z "$PRESETS" ]; then  # the first call: steps 1-3; a call with GPU_PRESETS runs step 4 only

# 1. GPT-2 small (compile takes about a minute; 20 timed steps per variant after 5 warm-ups;
#    the variants are lab/bench.py's: the baseline loop and every strategy of the registry)
log "bench gpt2-small B=16 T=1024 bf16 compile"
timeout 300 python -m lab.bench --config gpt2-small --device cuda --dtype bfloat16 --compile \
    --batch 16 --seq_len 1024 --steps 20 --json "$OUT/bench_gpt2_small.json" > "$OUT/bench_gpt2_small.txt" 2>&1
log "  exit $? ; $(grep -E 'MFU|none tokens|param time|loss time' "$OUT/bench_gpt2_small.txt" | tr '\n' ' ')"

# 2. the small configs, eager (Python-overhead bound on a GPU)
log "bench nanogpt-cpu, synthetic (eager)"
timeout 45 python -m lab.bench --config nanogpt-cpu,synthetic --device cuda --steps 20 \
    --json "$OUT/bench_small.json" > "$OUT/bench_small.txt" 2>&1
log "  exit $?"

# 2b. the batched path (lab/batched.py): K fine-tunes of the synthetic config as one model against one
#     run; on a GPU one of these models uses a sliver of the device, so K of them should cost about one
log "bench batched K = 1, 8, 32 (synthetic, eager)"
timeout 60 python -m lab.bench --config synthetic --variants none --device cuda --batched 1,8,32 --steps 20 \
    --json "$OUT/bench_batched.json" > "$OUT/bench_batched.txt" 2>&1
log "  exit $?; $(grep -A9 '^batched' "$OUT/bench_batched.txt" | tr '\n' ' ')"

# 3. a fine-tune on the GPU, timed end to end
if ls "$DATA"/safety_tuned_llamas >/dev/null 2>&1; then
    log "fine-tune: real data from $DATA"
    # every value that --data real would otherwise default (configs/real.json, for a CPU)
    ARGS=(--data real --data_dir "$DATA" --n_layer 6 --n_head 6 --n_embd 384 --block_size 128 --vocab_cap 0
          --eval_examples 256 --lr 2e-3 --batch_tokens 8192 --micro_batch 64 --align_iters 300 --max_iters 200
          --eval_interval 100)
else
    log "fine-tune: no real data folder at $DATA, the synthetic default instead"
    ARGS=()
fi
start=$(date +%s)
timeout 90 python train.py --out_dir "$OUT/finetune" --device cuda --compile --no-progress \
    --constraint param --radius 1.0 "${ARGS[@]}" > "$OUT/finetune.txt" 2>&1
log "  exit $? after $(( $(date +%s) - start )) s; $(tail -3 "$OUT/finetune.txt" | tr '\n' ' ')"
fi

# 4. with GPU_PRESETS=NAME (a call of its own per preset: each is cut at 9 minutes), that preset:
#    "paper" (the synthetic grid, 90 fine-tunes as 9 batched groups of 10 at once, lab/sweep.py
#    --batch_runs), "paper-real-gpu" (arm P) or "real-gpu" (arm R). E.g. GPU_PRESETS=paper bash
#    scripts/gpu_check.sh OUT
for preset in $PRESETS; do
    start=$(date +%s)
    if [ "$preset" = paper ]; then
        timeout 540 python -m lab.sweep --preset paper --batch_runs 10 --jobs 9 --out_dir "$OUT/paper" > "$OUT/paper.txt" 2>&1
    elif ls "$DATA"/safety_tuned_llamas >/dev/null 2>&1; then
        timeout 540 python -m lab.sweep --preset "$preset" --data_dir "$DATA" --out_dir "$OUT/$preset" > "$OUT/$preset.txt" 2>&1
    else
        log "$preset: no real data folder at $DATA, skipped"; continue
    fi
    log "$preset: exit $? after $(( $(date +%s) - start )) s; $(tail -2 "$OUT/$preset.txt" | tr '\n' ' ')"
done
log "done: $OUT"
