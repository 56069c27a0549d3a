# SoRA on the baby GPT trained by config/train_shakespeare_char.py: LoRA rank 8 with gates, λ raised
# in 4 levels so that unneeded ranks are switched off; pruned to a plain LoRA at the end.
# python train.py config/finetune_shakespeare_sora.py
out_dir = "out-shakespeare-sora"
init_from = "auto"  # the trained base in out-shakespeare-char/ (config/train_shakespeare_char.py), else out-demo-base/ (make demo)
adapter = "sora"
lora_rank = 8
lora_alpha = 16.0
sora_lambda = 0.5
sora_lambda_max = 5.0
sora_lambda_levels = 4
sora_lambda_every = 75
sora_lambda_spacing = "linear"
eval_interval = 100
eval_iters = 20
log_interval = 25
always_save_checkpoint = True  # the last state is the sparsest: keep it, not the best val loss
dataset = "shakespeare_char"
batch_size = 32
block_size = 128
dropout = 0.0
learning_rate = 2e-3
weight_decay = 0.0
max_iters = 300
lr_decay_iters = 300
warmup_iters = 20
min_lr = 2e-4
