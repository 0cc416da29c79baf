#!/usr/bin/env bash
# The real-data measurement of README "Real data", for one seed, on CPU (~35 minutes on
# 2 shared cores, two runs at a time, one thread each):
#     SAFETY_DATA_DIR=../shared/data TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache bash scripts/real_cpu.sh 1 out_real
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${1:-1}
O=${2:-out_real}/s$SEED
mkdir -p "$O"
export OMP_NUM_THREADS=1  # small models: one thread per run beats two fighting for two cores
COMMON="--data real --block_size 64 --vocab_cap 4096 --n_layer 2 --n_head 4 --n_embd 64 --batch_tokens 2048
        --micro_batch 32 --align_iters 800 --align_lr 3e-3 --warmup_iters 50 --eval_interval 100
        --eval_examples 128 --no-progress --seed $SEED"
python train.py $COMMON --stage align --out_dir "$O/align" > "$O/align.out"
FT="$COMMON --stage finetune --theta0 $O/align/theta0.pt --max_iters 300 --lr 1e-3 --eval_interval 300"
run() { name=$1; shift; python train.py $FT --out_dir "$O/$name" "$@" > "$O/$name.out"; }
run none-alpaca_safety_only --task_data alpaca_safety_only & run none-alpaca_small --task_data alpaca_small; wait
run none-code_alpaca --task_data code_alpaca & \
  run loss1-same --task_data alpaca_small --constraint loss --lam 1 --proxy_data safety_llamas_proxy; wait
run loss1-xstest_gpt4 --task_data alpaca_small --constraint loss --lam 1 --proxy_data xstest_gpt4 & \
  run loss1-rd_llama2 --task_data alpaca_small --constraint loss --lam 1 --proxy_data rd_llama-2-7b-chat-hf; wait
run loss10-same --task_data alpaca_small --constraint loss --lam 10 --proxy_data safety_llamas_proxy & \
  run param1 --task_data alpaca_small --constraint param --radius 1; wait
run param4 --task_data alpaca_small --constraint param --radius 4 & \
  run loss1-same-code --task_data code_alpaca --constraint loss --lam 1 --proxy_data safety_llamas_proxy; wait
# refusal rates (first 128 prompts of each set, greedy, 24 tokens) beside each run's metrics.json
python evaluate.py --ckpt "$O/align/theta0.pt" --refusals --limit 128 --max_new_tokens 24 > "$O/align/refusals.json"
for d in "$O"/*/; do
  if [ -f "$d/ckpt.pt" ]; then
    python evaluate.py --ckpt "$d/ckpt.pt" --refusals --limit 128 --max_new_tokens 24 > "$d/refusals.json"
  fi
done
echo "done: $O/*/metrics.json and refusals.json"
