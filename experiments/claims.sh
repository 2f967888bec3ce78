#!/usr/bin/env bash
# Issue 16's experiments (docs/RESULTS.md, "FELLRec's claims measured with power"), one part at a time:
#   experiments/claims.sh loo        FELLRec, FedAvg, FedProx, Local, Centralized; leave-one-out; 5 seeds
#   experiments/claims.sh ablation   FELLRec without heating, with uniform similarity, both; 5 seeds
#   experiments/claims.sh temporal   the `loo` runs on FELLRec's global temporal 8:1:1 split
#   experiments/claims.sh lora       FFA-LoRA, FedSA-LoRA, FLoRA, FedEx-LoRA; leave-one-out; 5 seeds
#   experiments/claims.sh attention  FELLRec's similarity on the round's update or on B, relative losses (§2)
#   experiments/claims.sh split      FELLRec with LoRA on the last 8 blocks, unsplit and split at k = 8
#   experiments/claims.sh noniid     FedAvg, FELLRec, Local over Dirichlet clients, alpha 0.1, 1, 10 (§3)
#   experiments/claims.sh crossdomain  the genre federation of configs/crossdomain-genres.yaml (§5)
#   experiments/claims.sh crossdomain-private  FedAvg and FELLRec there with the item vectors kept on the client
#   experiments/claims.sh fedprox    FedProx's mu: 1e-6, 1e-4, 1e-3 (0.01 is in `loo`)
# Each run is about 4 minutes here (2 cores, one run at a time); 25 runs take about 1 h 40 min. Every command
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
  attention)
    for s in $SEEDS; do
      run --set name=claims-loo-simupdate-s$s --set seed=$s --set "algorithms=[fellrec]" --set fellrec.similarity_of=update
      run --set name=claims-loo-simb-s$s --set seed=$s --set "algorithms=[fellrec]" --set fellrec.similarity_of=lora_b
      run --set name=claims-loo-relloss-s$s --set seed=$s --set "algorithms=[fellrec]" --set fellrec.losses=relative
    done ;;
  split)
    for s in $SEEDS; do
      run --set name=claims-loo-last8-s$s --set seed=$s --set "algorithms=[fellrec]" --set model.lora.last_blocks=8
      run --set name=claims-loo-split8-s$s --set seed=$s --set "algorithms=[fellrec]" --set model.lora.last_blocks=8 \
          --set storage.k=8
    done ;;
  noniid)
    for s in $SEEDS; do
      for a in 0.1 1 10; do
        run --set name=claims-dir$a-s$s --set seed=$s --set "algorithms=[fedavg, fellrec, local]" \
            --set partition.method=dirichlet --set partition.alpha=$a
      done
    done ;;
  crossdomain)
    for s in $SEEDS; do
      "$FELLREC" run configs/crossdomain-genres.yaml --resume --quiet --set name=crossdomain-genres-s$s --set seed=$s
    done ;;
  crossdomain-private)
    for s in $SEEDS; do
      "$FELLREC" run configs/crossdomain-genres.yaml --resume --quiet --set name=crossdomain-private-s$s --set seed=$s \
          --set "algorithms=[fedavg, fellrec]" --set model.item_vectors=private
    done ;;
  fedprox)
    for s in $SEEDS; do
      for mu in 1e-6 1e-4 1e-3; do
        run --set name=claims-loo-mu$mu-s$s --set seed=$s --set "algorithms=[fedprox]" --set train.prox_mu=$mu
      done
    done ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac
