# Rotational PiSSA on the baby GPT trained by config/train_shakespeare_char.py: the top-8 singular
# directions of every Linear, trained through rotations of U and V and the singular values.
# python train.py config/finetune_shakespeare_pissa.py --pissa_method=way3
# --pissa_quantize_residual=True keeps W_res in 4-bit NormalFloat (QPiSSA)
out_dir = "out-shakespeare-pissa"
init_from = "auto"  # the trained base in out-shakespeare-char/ (config/train_shakespeare_char.py), else out-demo-base/ (make demo)
adapter = "pissa"
pissa_method = "way3"  # way0 | way1 | way2 | way3
lora_rank = 8
lora_alpha = 8.0  # scaling 1
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
