#!/usr/bin/env bash
# ViT-L/16 from scratch on an ImageNet-format Hub dataset (columns image, label), 2 nodes x 8 GPUs.
# Run the same command on both machines with MACHINE_RANK=0 and MACHINE_RANK=1.
# Each process holds micro-batches of 32 and accumulates 2: M = 16 x 2 = 32 micro-gradients.
# Paper hyper-parameters: SGD momentum 0.9, lr 0.01, weight decay 0.01, reduce-on-plateau.
set -euo pipefail
CONFIG=${CONFIG:-examples/accelerate/2x8gpu.yaml}
DATASET=${DATASET:-ILSVRC/imagenet-1k}
MACHINE_RANK=${MACHINE_RANK:-0}
accelerate launch --config_file "$CONFIG" --machine_rank "$MACHINE_RANK" -m hf_gaf.train \
  --dataset "$DATASET" --image_column image --label_column label --eval_split validation --noise_rate 0 \
  --model_name vit_large_patch16_224 --image_size 224 \
  --gaf_threshold 0.97 --gaf_exchange sharded \
  --per_device_train_batch_size 32 --gradient_accumulation_steps 2 \
  --optim sgd --optim_args "momentum=0.9" --learning_rate 0.01 --weight_decay 0.01 --max_grad_norm 1.0 \
  --lr_scheduler_type reduce_lr_on_plateau --lr_scheduler_kwargs '{"mode": "max", "factor": 0.1, "patience": 5}' \
  --eval_strategy epoch --metric_for_best_model accuracy --greater_is_better true \
  --num_train_epochs 90 --save_strategy epoch --save_total_limit 2 \
  --bf16 --dataloader_num_workers 16 --report_to tensorboard --logging_steps 100 \
  --output_dir outputs/imagenet-vit-large-gaf
