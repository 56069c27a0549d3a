# The CPU recipe for a generalization bound on Tiny Shakespeare (characters): SubLoRA on the 4 x 128
# baby GPT at its seeded random init, w in R^2000 split evenly between the A and B factors (fixed 0.5,
# the best allocation of the sweep), 4,000 iterations (2 CPU cores: ~10 minutes), then
#   python eval_bounds.py --out_dir=out-bounds-cpu --levels_grid=5,7,11,15 --qat_steps=200   (~4.5 minutes, exact)
# (docs/bounds.md: 4.18 bits per character at 95% confidence, token level, empirical Bernstein).
out_dir = "out-bounds-cpu"
init_from = "scratch"
adapter = "sublora"
intrinsic_dim = 2000
allocation_mode = "fixed"
allocation_ratio = 0.5
sublora_projector = "rdkronqr"
lora_rank = 4
lora_alpha = 32.0
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
