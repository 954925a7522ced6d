# The paper's optimisation settings, shared by the launch scripts (source this file):
# SGD momentum 0.9, lr 0.01, weight decay 0.01, reduce-on-plateau on validation accuracy,
# micro-batches of one image per CIFAR-100 class and two micro-batches per process and step.
PAPER_ARGS=(
  --per_device_train_batch_size 100 --class_balanced_batches --gradient_accumulation_steps 2
  --optim sgd --optim_args "momentum=0.9" --learning_rate 0.01 --weight_decay 0.01
  --lr_scheduler_type reduce_lr_on_plateau --lr_scheduler_kwargs '{"mode": "max", "factor": 0.1, "patience": 10}'
  --eval_strategy epoch --metric_for_best_model accuracy --greater_is_better true
  --num_train_epochs 200 --save_strategy epoch --save_total_limit 2
  --bf16 --dataloader_num_workers 8 --report_to tensorboard --logging_steps 50
)
