# SubLoRA's CPU recipe (config/bounds_shakespeare_cpu.py) with VeRA in its place, at about the same number
# of trained numbers and on the Linears SubLoRA adapts (the 4 c_attn, of which SubLoRA takes the q and v
# thirds, and the head): rank 65, the head's size, 4 x (65 + 384) + (65 + 65) = 1,926 numbers (d and b),
# against SubLoRA's w in R^2000. 2 CPU cores: ~10 minutes. Then, as for SubLoRA:
#   python eval_bounds.py --out_dir=out-bounds-vera-cpu --levels_grid=5,7,11,15 --qat_steps=200
# (docs/bounds.md: the two bounds part by part, and VeRA without the head:
# --lora_targets=c_attn --vera_rank=116, 2,000 numbers).
out_dir = "out-bounds-vera-cpu"
init_from = "scratch"
adapter = "vera"
vera_rank = 65
lora_targets = "c_attn;lm_head"
lora_dropout = 0.1
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 32
dropout = 0.0
bias = False
learning_rate = 5e-3
weight_decay = 0.0
max_iters = 4000
lr_decay_iters = 4000
warmup_iters = 100
min_lr = 5e-4
eval_interval = 500
eval_iters = 20
log_interval = 100
always_save_checkpoint = True
dataset = "shakespeare_char"
