"""Training: the one step skeleton and its config (`loop`), pre-training (`pretrain`) and
fine-tuning (`finetune`) as recipes for it, their loss functions (`losses`), the learning-rate
schedule (`schedule`) and data-parallel mechanics (`distributed`)."""
