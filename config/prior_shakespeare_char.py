# The prior of the fine-tune bound recipe: the baby GPT pretrained on the prior part of Tiny
# Shakespeare's training characters only (the first half, cut at a blank line), so a bound on the other
# part may use it as its prior (it has provably never seen those tokens; eval_bounds.py checks):
#   python prepare.py shakespeare_char --input=testdata/tinyshakespeare.txt --out_dir=data/shakespeare_char_parts --prior_fraction=0.5
#   python train.py config/prior_shakespeare_char.py
#   python train.py config/bounds_shakespeare_prior_cpu.py
#   python eval_bounds.py --out_dir=out-bounds-prior-cpu --levels_grid=5,7,11,15 --qat_steps=200
out_dir = "out-prior-char"
data_dir = "data/shakespeare_char_parts"
data_part = "prior"
init_from = "scratch"
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = False  # only keep the best val loss (val.bin: the last tenth, in neither part)
batch_size = 32
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
learning_rate = 2e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 2e-4
warmup_iters = 50
