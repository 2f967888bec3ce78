#!/usr/bin/env bash
# Issue 16's experiments (docs/RESULTS.md, "FELLRec's claims measured with power"), one part at a time:
#   experiments/claims.sh loo        FELLRec, FedAvg, FedProx, Local, Centralized; leave-one-out; 5 seeds
#   experiments/claims.sh ablation   FELLRec without heating, with uniform similarity, both; 5 seeds
#   experiments/claims.sh temporal   the `loo` runs on FELLRec's global temporal 8:1:1 split
#   experiments/claims.sh lora       FFA-LoRA, FedSA-LoRA, FLoRA, FedEx-LoRA; leave-one-out; 5 seeds
# Each run is about 4 minutes here (2 cores); a part of 25 runs takes about 1 h 40 min. Every command
# resumes: run a part again and it skips the finished runs and continues one that was cut short.
# SEEDS="2024 2025" experiments/claims.sh loo  runs fewer seeds; FELLREC=... picks the command.
set -euo pipefail
FELLREC=${FELLREC:-fellrec}
SEEDS=${SEEDS:-"2024 2025 2026 2027 2028"}
run() { "$FELLREC" run configs/claims.yaml --resume --quiet "$@"; }

case "${1:-}" in
  loo)
    for s in $SEEDS; do run --set name=claims-loo-s$s --set seed=$s; done ;;
  temporal)
    for s in $SEEDS; do run --set name=claims-temporal-s$s --set seed=$s --set split.method=temporal; done ;;
  ablation)
    for s in $SEEDS; do
      run --set name=claims-loo-noheat-s$s --set seed=$s --set "algorithms=[fellrec]" --set fellrec.heating=false
      run --set name=claims-loo-uniform-s$s --set seed=$s --set "algorithms=[fellrec]" --set fellrec.similarity=uniform
      run --set name=claims-loo-neither-s$s --set seed=$s --set "algorithms=[fellrec]" --set fellrec.heating=false \
          --set fellrec.similarity=uniform
    done ;;
  lora)
    for s in $SEEDS; do
      run --set name=claims-loo-s$s --set seed=$s --set "algorithms=[ffa-lora, fedsa-lora, flora, fedex-lora]"
    done ;;
  *) sed -n '2,9p' "$0"; exit 2 ;;
esac
