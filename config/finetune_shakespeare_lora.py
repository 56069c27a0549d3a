# LoRA on the baby GPT trained by config/train_shakespeare_char.py (its weights become the frozen base)
# python train.py config/finetune_shakespeare_lora.py
out_dir = "out-shakespeare-lora"
init_from = "auto"  # the trained base in out-shakespeare-char/ (config/train_shakespeare_char.py), else out-demo-base/ (make demo)
adapter = "lora"
lora_rank = 4
lora_alpha = 8.0
eval_interval = 100
eval_iters = 20
log_interval = 25
always_save_checkpoint = False
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
