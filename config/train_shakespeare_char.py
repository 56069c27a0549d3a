# the baby GPT on Tiny Shakespeare, characters (nanoGPT's config, sized down for a CPU)
# python prepare.py shakespeare_char && python train.py config/train_shakespeare_char.py
# on a GPU: --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --batch_size=64 --max_iters=5000 --compile=True
out_dir = "out-shakespeare-char"
eval_interval = 250
eval_iters = 20
log_interval = 25
always_save_checkpoint = False  # only keep the best val loss
dataset = "shakespeare_char"
batch_size = 32
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
learning_rate = 2e-3
max_iters = 1000
lr_decay_iters = 1000
min_lr = 2e-4
warmup_iters = 50
