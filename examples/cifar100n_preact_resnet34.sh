#!/usr/bin/env bash
# CIFAR-100N (human noisy labels, 40.2% wrong) with PreAct ResNet-34 (timm resnetv2_34), as in
# the paper: micro-batch 100 (one image of every class) x 2 micro-batches per step, one GPU.
# LABELS: CIFAR-100_human.pt from the CIFAR-N release, a local path or hf://datasets/<repo>/<path>.
# Paper hyper-parameters: SGD momentum 0.9, lr 0.01, weight decay 0.01, reduce-on-plateau.
set -euo pipefail
source "$(dirname "$0")/paper_hparams.sh"
CONFIG=${CONFIG:-examples/accelerate/1gpu.yaml}
LABELS=${LABELS:-../shared/data/CIFAR-100_human.pt}
for threshold in 0.97 2; do
  accelerate launch --config_file "$CONFIG" -m hf_gaf.train \
    --dataset uoft-cs/cifar100 --noisy_labels "$LABELS" \
    --model_name resnetv2_34 --image_size 32 \
    --gaf_threshold "$threshold" \
    "${PAPER_ARGS[@]}" \
    --output_dir "outputs/cifar100n-preact-resnet34-tau${threshold}"
done
