#!/usr/bin/env bash
# The paper's CIFAR-100 label-noise sweep (Figure 6): ResNet-18 from scratch, symmetric noise
# 0..75%, GAF (tau 0.97) against averaging, 8 GPUs. Each micro-batch holds one image of every
# class (100 = 1 x 100) and every process does 2 accumulation steps: M = 8 x 2 micro-gradients.
# Paper hyper-parameters: SGD momentum 0.9, lr 0.01, weight decay 0.01, reduce-on-plateau.
set -euo pipefail
CONFIG=${CONFIG:-examples/accelerate/8gpu.yaml}
for noise in 0 0.15 0.3 0.45 0.6 0.75; do
  for threshold in 0.97 2; do
    accelerate launch --config_file "$CONFIG" -m hf_gaf.train \
      --dataset uoft-cs/cifar100 --label_column fine_label --noise_rate "$noise" --noise_seed 0 \
      --model_name resnet18 --image_size 32 \
      --gaf_threshold "$threshold" --gaf_rule sequential \
      --per_device_train_batch_size 100 --class_balanced_batches --gradient_accumulation_steps 2 \
      --optim sgd --optim_args "momentum=0.9" --learning_rate 0.01 --weight_decay 0.01 \
      --lr_scheduler_type reduce_lr_on_plateau --lr_scheduler_kwargs '{"mode": "max", "factor": 0.1, "patience": 10}' \
      --eval_strategy epoch --metric_for_best_model accuracy --greater_is_better true \
      --num_train_epochs 200 --save_strategy epoch --save_total_limit 2 \
      --bf16 --dataloader_num_workers 8 --report_to tensorboard --logging_steps 50 \
      --output_dir "outputs/cifar100-resnet18-noise${noise}-tau${threshold}"
  done
done
