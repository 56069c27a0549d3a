# The CPU recipe for a bound on a fine-tune: SubLoRA (w in R^2000, fixed 0.5, as the from-scratch
# recipe) fine-tunes the prior of config/prior_shakespeare_char.py on the bound part of the training
# characters, which that prior never saw; eval_bounds.py scores the bound part alone, and the message is
# only w (the prior is rebuilt from its checkpoint). Commands: config/prior_shakespeare_char.py.
out_dir = "out-bounds-prior-cpu"
data_dir = "data/shakespeare_char_parts"
data_part = "bound"
init_from = "out-prior-char"
adapter = "sublora"
intrinsic_dim = 2000
allocation_mode = "fixed"
allocation_ratio = 0.5
sublora_projector = "rdkronqr"
lora_rank = 4
lora_alpha = 32.0
lora_dropout = 0.1
batch_size = 32
block_size = 128
dropout = 0.0
learning_rate = 5e-3
weight_decay = 0.0
max_iters = 1000
lr_decay_iters = 1000
warmup_iters = 50
min_lr = 5e-4
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = True
