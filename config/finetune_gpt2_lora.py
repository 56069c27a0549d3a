# LoRA on OpenAI's GPT-2 (124M) for Shakespeare in GPT-2 BPE, one GPU (not run on the CPU machines
# this repo is tested on: they cannot download the weights).
# python prepare.py shakespeare && python train.py config/finetune_gpt2_lora.py
out_dir = "out-gpt2-lora"
init_from = "gpt2"  # gpt2-medium / -large / -xl work the same way
adapter = "lora"
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05
dataset = "shakespeare"
block_size = 512
batch_size = 8
gradient_accumulation_steps = 4
dropout = 0.0
learning_rate = 2e-4  # the LoRA paper's GPT-2 setting
weight_decay = 0.0
max_iters = 2000
lr_decay_iters = 2000
warmup_iters = 100
min_lr = 2e-5
eval_interval = 200
eval_iters = 40
log_interval = 10
always_save_checkpoint = False
compile = True
