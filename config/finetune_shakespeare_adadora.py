# AdaDoRA on the baby GPT trained by config/train_shakespeare_char.py: AdaLoRA's SVD-form adapter
# starting at rank 8 per matrix, its budget falling to 4 on average by importance, with DoRA's
# magnitude. --adapter=adalora drops the magnitude; --adapter=dora is a fixed-rank LoRA with it.
# python train.py config/finetune_shakespeare_adadora.py
out_dir = "out-shakespeare-adadora"
init_from = "auto"  # the trained base in out-shakespeare-char/ (config/train_shakespeare_char.py), else out-demo-base/ (make demo)
adapter = "adadora"
lora_rank = 8
lora_alpha = 16.0
adalora_target_r = 4
adalora_tinit = 30
adalora_tfinal = 60
adalora_deltaT = 10
adalora_orth_reg_weight = 0.1  # the AdaLoRA paper's
eval_interval = 100
eval_iters = 20
log_interval = 10  # = adalora_deltaT: each log shows an allocation (masked E regrow in between, as in PEFT)
always_save_checkpoint = True  # keep the final allocation
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
