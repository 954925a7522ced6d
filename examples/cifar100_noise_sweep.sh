#!/usr/bin/env bash
# The paper's CIFAR-100 label-noise sweep (Figure 6): ResNet-18 from scratch, symmetric noise
# 0..75%, GAF (tau 0.97) against averaging, 8 GPUs. Each micro-batch holds one image of every
# class (100 = 1 x 100) and every process does 2 accumulation steps: M = 8 x 2 micro-gradients.
# Paper hyper-parameters: SGD momentum 0.9, lr 0.01, weight decay 0.01, reduce-on-plateau.
set -euo pipefail
source "$(dirname "$0")/paper_hparams.sh"
CONFIG=${CONFIG:-examples/accelerate/8gpu.yaml}
for noise in 0 0.15 0.3 0.45 0.6 0.75; do
  for threshold in 0.97 2; do
    accelerate launch --config_file "$CONFIG" -m hf_gaf.train \
      --dataset uoft-cs/cifar100 --label_column fine_label --noise_rate "$noise" --noise_seed 0 \
      --model_name resnet18 --image_size 32 \
      --gaf_threshold "$threshold" --gaf_rule sequential \
      "${PAPER_ARGS[@]}" \
      --output_dir "outputs/cifar100-resnet18-noise${noise}-tau${threshold}"
  done
done
