# SubLoRA's CPU recipe (config/bounds_shakespeare_cpu.py) with VeRA in its place, at the same number of
# trained numbers: VeRA on the 4 attention c_attn Linears with rank 116, 4 x (116 + 384) = 2,000 (d and b),
# against SubLoRA's w in R^2000. Then, as for SubLoRA:
#   python eval_bounds.py --out_dir=out-bounds-vera-cpu --levels_grid=5,7,11,15 --qat_steps=200
# (docs/bounds.md: the two bounds part by part).
out_dir = "out-bounds-vera-cpu"
init_from = "scratch"
adapter = "vera"
vera_rank = 116
lora_targets = "c_attn"
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
