# SubLoRA on Tiny Shakespeare (characters) from scratch: the baby GPT stays at its seeded random init,
# LoRA (rank 4, alpha 32, dropout 0.1, Sanaelotfi/sublora-bounds-for-llms') sits on q and v of every block and on the head,
# and only w in R^intrinsic_dim trains. The training half of the bounds workflow (eval_bounds.py).
# python train.py config/train_shakespeare_sublora.py --allocation_mode=learned
out_dir = "out-shakespeare-sublora"
init_from = "scratch"
adapter = "sublora"
intrinsic_dim = 1000
allocation_mode = "uniform"
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
max_iters = 300
lr_decay_iters = 300
warmup_iters = 20
min_lr = 5e-4
eval_interval = 100
eval_iters = 20
log_interval = 25
always_save_checkpoint = True
dataset = "shakespeare_char"
