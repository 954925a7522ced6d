#!/usr/bin/env bash
# The default digits run split over two CPU processes (gloo): GAF filters across processes.
set -euo pipefail
accelerate launch --config_file examples/accelerate/cpu.yaml -m hf_gaf.train \
  --gradient_accumulation_steps 1 --output_dir outputs/gaf-digits-2proc "$@"
