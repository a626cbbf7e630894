#!/usr/bin/env bash
# Sleeper Agent from scratch on the poisoning benchmark's from-scratch setups, CPU scale:
# the first 1,000 training images of each class (10,000), the exactly stored test images,
# convnet, 20 epochs; undefended and EPIC-0.1/0.2 with the paper's 40-epoch schedule halved
# (warmup 5 / 10, a round every epoch until the last lr milestone).
# Usage: EPIC_DATA_DIR=... benchmarks/cpu_scratch_sa.sh [WORK_DIR] [FIRST_N_SETUPS]
set -euo pipefail
work=${1:-runs/cpu-scratch-sa}
first=${2:-3}
data=(--dataset cifar10 --data-dir "$EPIC_DATA_DIR" --model convnet --test-subset 1000)
setups=(--setups "$EPIC_DATA_DIR/poisoning-benchmark/cifar10_from_scratch.pickle"
        --first "$first" --victim-per-class 1000 --exact-test 1000)
[ -f "$work/clean/model.pt" ] || \
  epic train "${data[@]}" --subset 10000 --epochs 20 --out "$work/clean"
epic craft "${data[@]}" "${setups[@]}" --attack sa --pretrained "$work/clean/model.pt" \
  --retrain-epochs 5 --out "$work/poisons"
run=(epic bench run "${data[@]}" "${setups[@]}" --epochs 20 --poisons "$work"/poisons/setup-*
     --out "$work/bench")
"${run[@]}" --defenses none
"${run[@]}" --defenses epic-0.1 --warmup 5 --every 1
"${run[@]}" --defenses epic-0.2 --warmup 10 --every 1
epic bench report "$work/bench/results.jsonl" --json
