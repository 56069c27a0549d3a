# The GPU recipe for a generalization bound on Tiny Shakespeare (characters): SubLoRA on nanoGPT's
# 6 x 384 baby GPT at its seeded random init, w in R^5000 split evenly between the A and B factors
# (fixed 0.5), 8,000 iterations of 64 x 256 tokens, then
#   python eval_bounds.py --out_dir=out-bounds-gpu --levels_grid=5,7,11,15 --qat_steps=500
# An earlier H100 run of this model, d and budget (old equal-width bins) had 3.66 bits per character
# unquantised on the training set; this recipe's bound has not been measured yet (README: bounds).
out_dir = "out-bounds-gpu"
init_from = "scratch"
adapter = "sublora"
intrinsic_dim = 5000
allocation_mode = "fixed"
allocation_ratio = 0.5
sublora_projector = "rdkronqr"
lora_rank = 4
lora_alpha = 32.0
lora_dropout = 0.1
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
batch_size = 64
dropout = 0.0
bias = False
learning_rate = 5e-3
weight_decay = 0.0
max_iters = 8000
lr_decay_iters = 8000
warmup_iters = 200
min_lr = 5e-4
eval_interval = 1000
eval_iters = 50
log_interval = 100
always_save_checkpoint = True
dataset = "shakespeare_char"
