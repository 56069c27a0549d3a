"""
One training loop for every model and adapter: pretraining, full fine-tuning, LoRA. Single process
or DDP. Config: the globals below, then a config file, then environment variables (USE_LORA=True,
LORA_RANK, LORA_ALPHA, LORA_DROPOUT, TEST_MODE=True), then --key=value.

    python prepare.py shakespeare_char
    python train.py config/train_shakespeare_char.py --device=cpu          # pretrain the baby GPT
    python train.py config/finetune_shakespeare_lora.py --device=cpu       # LoRA on top of it
    USE_LORA=True LORA_RANK=4 python train.py config/finetune_shakespeare_lora.py --device=cpu
    TEST_MODE=True python train.py --device=cpu                            # a tiny run, seconds
    python train.py config/finetune_shakespeare_lora.py --init_from=resume # continue where it stopped
    torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char.py --device=cpu
    torchrun --standalone --nproc_per_node=8 train.py config/finetune_gpt2_lora.py   # 8 GPUs
"""

import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from adapters import (ADAPTERS, RankAllocator, SubLoRA, adapter_layers, adapter_state_dict, build_sora_optimizers,
                      count_params, effective_ranks, find_targets, fused_on_cuda, inject_adapters, lambda_schedule,
                      max_orthogonality_error, merge_adapters, orthogonal_regularization, prune_sora_model,
                      rank_pattern_layers, rotation_penalty, slice_adalora_model)
from checkpoint import (ADAPTER_FILES, FORMAT, NO_ADAPTER, CheckpointError, build_model, load_checkpoint, save_adapter_file,
                        save_atomic)
from configurator import ConfigError, check_device, check_ranges, cli, config_defaults, configure
from model import GPT, MODELS, GPTConfig
from prepare import DATASETS, read_meta

# -----------------------------------------------------------------------------
# defaults: the baby Shakespeare GPT (nanoGPT's config/train_shakespeare_char.py)
out_dir = "out"  # where checkpoints, adapter files, metrics.jsonl and plots go
eval_interval = 250  # iterations between two evals (train and val loss, checkpoint)
log_interval = 10  # iterations between two printed / logged lines
eval_iters = 200  # batches per split in an eval
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # else only when val improves
overwrite = False  # allow a new run to replace the checkpoint already in out_dir
init_from = "auto"  # 'auto' (new model; an adapter: the base in AUTO_BASES) | 'scratch' | 'resume' | 'gpt2'..'gpt2-xl' | a path
wandb_log = False  # WANDB_MODE=offline works without internet
wandb_project = "lowrank-gpt"  # wandb project name
wandb_run_name = "run"  # wandb run name
# data
dataset = "shakespeare_char"  # data/<dataset>/ holds train.bin, val.bin, meta.json (prepare.py)
data_dir = ""  # '' = data/<dataset>
gradient_accumulation_steps = 1  # micro-batches per step, over all processes
batch_size = 64  # sequences per micro-batch
block_size = 256  # context length in tokens
# model (ignored when init_from loads one)
model_type = "gpt"  # 'gpt' | 'bigram'
n_layer = 6  # transformer blocks
n_head = 6  # attention heads
n_embd = 384  # embedding width
dropout = 0.2  # dropout in the model (adapters have their own lora_dropout)
bias = False  # biases in Linears and LayerNorms
# adapter
adapter = "none"  # 'none' | 'lora' | 'sora' | 'dora' | 'adalora' | 'adadora' | 'pissa' | 'sublora'
lora_rank = 8  # r: rank of every adapter (initial rank for AdaLoRA, directions for PiSSA)
lora_alpha = 16.0  # scaling alpha / r (alpha / sqrt(r) with use_rslora)
lora_dropout = 0.0  # dropout on the adapter's input
lora_targets = ""  # ';'-separated module-name patterns ('c_attn:q,v;lm_head'); '' = the adapter's defaults
lora_rank_pattern = ""  # per-layer ranks, 'lm_head=8;c_fc=2' (patterns as in lora_targets; PEFT's rank_pattern: scaling lora_alpha / that rank)
use_rslora = False  # scaling alpha / sqrt(r) instead of alpha / r
train_embeddings = False  # also train the token / position embeddings
# SoRA: gates between A and B, L1 proximal steps on them (the lora_* keys set rank, alpha, dropout)
sora_lambda = 0.1  # L1 strength; the gates are soft-thresholded by sora_lambda * lr every step
sora_lambda_max = 0.0  # > sora_lambda: raise λ to this in sora_lambda_levels steps (the sparsifying schedule)
sora_lambda_levels = 5  # steps of the λ schedule from sora_lambda to sora_lambda_max
sora_lambda_every = 200  # iterations per λ level
sora_lambda_spacing = "linear"  # 'linear' | 'log_linear' | 'exp_linear'
sora_gate_lr = 0.0  # peak learning rate of the gates; 0 = learning_rate
sora_gate_init = "randn"  # 'randn' (the SoRA code's) | 'ones'
sora_tune_iters = 0  # the last N iterations: λ = 0, zero gates held at zero, kept gates rebalanced into B (SoRALinear.rebalance)
sora_prune = True  # at the end, drop zero-gated ranks and save the smaller adapter_pruned.safetensors
# AdaLoRA / AdaDoRA: lora_rank is the initial rank; the budget falls to adalora_target_r per layer on average
adalora_target_r = 4  # average rank per layer at the end
adalora_tinit = 0  # iterations at the full budget
adalora_tfinal = 0  # final iterations at the target budget, mask fixed
adalora_deltaT = 10  # iterations between two allocations
adalora_beta1 = 0.85  # EMA of the sensitivity
adalora_beta2 = 0.85  # EMA of the uncertainty
adalora_orth_reg_weight = 0.5  # weight of the orthogonality regulariser on A and B (peft's default)
adalora_prune = True  # at the end, save adapter_pruned.safetensors holding only the ranks with E != 0
# Rotational PiSSA: lora_rank principal directions, scaling lora_alpha / lora_rank
pissa_method = "way0"  # 'way0' free R + penalty | 'way1' Givens | 'way2' Cayley low-rank skew | 'way3' exp
pissa_ortho_weight = 1e-2  # way0: weight of the penalty mean ‖RᵀR - I‖²_F
pissa_init_identity = True  # rotations start at the identity (the adapted model equals the base)
pissa_freeze_singular_values = False  # keep the r singular values fixed (train only the rotations)
pissa_quantize_residual = False  # W_res in 4-bit NormalFloat (QPiSSA)
pissa_quantize_base_components = False  # U_r and V_r in NF4 too
pissa_svd = "full"  # 'full' | 'lowrank' (randomized, torch.svd_lowrank)
pissa_svd_niter = 4  # power iterations of the randomized SVD
pissa_skew_rank = 4  # way2: rank of the skew-symmetric generator
pissa_fold_every = 0  # > 0: fold the rotations into U, V every N iterations (fresh way1 angles)
# SubLoRA: the lora_* keys set the LoRA inside (default targets: q and v of every block, the LM head);
# only w in R^intrinsic_dim trains, θ = θ₀ + P w
intrinsic_dim = 1000  # d: the size of the trained vector w
allocation_mode = "uniform"  # 'uniform' | 'fixed' | 'learned'
allocation_ratio = 0.5  # fixed mode: d_B / d, the share of w that feeds the B factors
sublora_seed = 0  # θ₀ and P come from it
sublora_projector = "rdkronqr"  # 'rdkronqr' | 'dense' | 'sparse'
sublora_gate_lr = 0.0  # learned mode: peak learning rate of the gate logits; 0 = learning_rate
sublora_gate_grad_width = 0.1  # learned mode: share of a block over which a gate's gradient is gathered (0 = the anchor's)
# AdamW
learning_rate = 1e-3  # peak learning rate
max_iters = 5000  # training iterations (a shorter or longer value rescales the schedules)
weight_decay = 1e-1  # AdamW weight decay
beta1 = 0.9  # AdamW beta1
beta2 = 0.99  # AdamW beta2
grad_clip = 1.0  # 0 disables
nonfinite = "stop"  # a nan/inf loss: 'stop' the run (nothing saved over the last good checkpoint) | 'skip' the step
# learning-rate schedule: linear warmup, cosine decay to min_lr
decay_lr = True  # warmup then cosine decay; False keeps learning_rate
warmup_iters = 100  # linear warmup iterations
lr_decay_iters = 5000  # iteration where the cosine reaches min_lr
min_lr = 1e-4  # learning rate at the end of the decay
# system
device = "cuda" if torch.cuda.is_available() else "cpu"  # 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"  # or 'float16'
compile = False  # torch.compile the model (worth it on a GPU)
compile_mode = "default"  # 'default' | 'reduce-overhead' (CUDA graphs: no launch cost) | 'max-autotune'
backend = ""  # DDP backend; '' = nccl on cuda, gloo on cpu
seed = 1337  # seeds the model init, dropout and the batch order
test_mode = False  # TEST_MODE=True: the sizes below, for a run of seconds
DEFAULTS = config_defaults(globals())
TEST_MODE = dict(max_iters=20, eval_interval=10, eval_iters=4, log_interval=5, batch_size=8, block_size=32,
                 n_layer=2, n_head=2, n_embd=32, warmup_iters=2, lr_decay_iters=20, dropout=0.0)
ADAPTER_KINDS = ("none", *ADAPTERS, "sublora")
# the values each key may take (check_config): intervals, inf for no bound
RANGES = {"learning_rate": "(0, inf)", "min_lr": "[0, inf)", "weight_decay": "[0, inf)", "grad_clip": "[0, inf)",
          "beta1": "[0, 1)", "beta2": "[0, 1)", "dropout": "[0, 1)", "lora_dropout": "[0, 1)", "lora_alpha": "(0, inf)",
          "allocation_ratio": "[0, 1]", "sora_lambda": "[0, inf)", "sora_lambda_max": "[0, inf)", "sora_gate_lr": "[0, inf)",
          "sublora_gate_lr": "[0, inf)", "adalora_beta1": "[0, 1)", "adalora_beta2": "[0, 1)",
          "adalora_orth_reg_weight": "[0, inf)", "pissa_ortho_weight": "[0, inf)",
          **{k: "[0, inf)" for k in ("max_iters", "warmup_iters", "lr_decay_iters", "adalora_tinit", "adalora_tfinal",
                                     "sora_tune_iters", "pissa_fold_every", "pissa_svd_niter")},
          **{k: "[1, inf)" for k in ("eval_iters", "batch_size", "block_size", "gradient_accumulation_steps", "log_interval",
                                     "eval_interval", "n_layer", "n_head", "n_embd", "lora_rank", "intrinsic_dim",
                                     "adalora_target_r", "adalora_deltaT", "sora_lambda_levels", "sora_lambda_every",
                                     "pissa_skew_rank")}}
# schedules counted in iterations: a --max_iters override rescales those the command line does not set
SCHEDULE_KEYS = ("warmup_iters", "lr_decay_iters", "sora_lambda_every", "sora_tune_iters", "adalora_tinit",
                 "adalora_tfinal")
AUTO_BASES = ("out-shakespeare-char", "out-demo-base")  # where the pretraining config and `make demo` write
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
SUBLORA_TARGETS = ["c_attn:q,v", "query", "value", "lm_head"]  # q and v of every block and the head (the anchor's)


class Diverged(RuntimeError):
    """The loss or the weights became nan / inf: the run stops before anything is saved over the last
    good checkpoint."""


class DataError(FileNotFoundError):
    """The data directory or its files are missing."""


# -----------------------------------------------------------------------------
# helpers


def adapter_settings(c):
    """The adapter layer's keyword arguments, from the flat config keys."""
    settings = dict(rank=c["lora_rank"], alpha=c["lora_alpha"], dropout=c["lora_dropout"])
    if c["adapter"] in ("lora", "sora", "dora", "sublora"):
        settings["use_rslora"] = c["use_rslora"]
    if c["adapter"] == "sora":
        settings["gate_init"] = c["sora_gate_init"]
    if c["adapter"] == "pissa":
        settings.update(method=c["pissa_method"], init_identity=c["pissa_init_identity"],
                        freeze_singular_values=c["pissa_freeze_singular_values"],
                        quantize_residual=c["pissa_quantize_residual"],
                        quantize_base_components=c["pissa_quantize_base_components"], svd=c["pissa_svd"],
                        svd_niter=c["pissa_svd_niter"], skew_rank=c["pissa_skew_rank"])
    return settings


def parse_rank_pattern(c):
    """lora_rank_pattern 'lm_head=8;c_fc=2' as {'lm_head': 8, 'c_fc': 2}."""
    pattern = {}
    for item in (t.strip() for t in c["lora_rank_pattern"].split(";")):
        key, eq, rank = item.partition("=")
        if item and (not eq or not key.strip() or not rank.strip().isdigit() or int(rank) < 1):
            raise ConfigError(f"lora_rank_pattern item {item!r} is not 'pattern=rank' with a rank >= 1; write e.g. "
                              "'lm_head=8;c_fc=2'")
        if item:
            pattern[key.strip()] = int(rank)
    if c["adapter"] not in ("lora", "dora", "sora"):
        raise ConfigError(f"lora_rank_pattern sets ranks for lora, dora and sora, not {c['adapter']} (its ranks come "
                          "from lora_rank" + (" and the allocator)" if c["adapter"].startswith("ada") else ")"))
    return pattern


def regularizer(c):
    """(function of the model, weight) of the term an adapter adds to the loss, or None."""
    if c["adapter"] in ("adalora", "adadora") and c["adalora_orth_reg_weight"] > 0:
        return orthogonal_regularization, c["adalora_orth_reg_weight"]
    if c["adapter"] == "pissa" and c["pissa_method"] == "way0" and c["pissa_ortho_weight"] > 0:
        return rotation_penalty, c["pissa_ortho_weight"]
    return None


def build_optimizers(model, c, device_type):
    """[(optimizer, peak learning rate)]: the model's AdamW, and for SoRA the gates' proximal one."""
    betas = (c["beta1"], c["beta2"])
    if c["adapter"] == "sora":
        gate_lr = c["sora_gate_lr"] or c["learning_rate"]
        gates, rest = build_sora_optimizers(model, c["learning_rate"], gate_lr, c["sora_lambda"], c["weight_decay"], betas)
        return [(rest, c["learning_rate"]), (gates, gate_lr)]
    if c["adapter"] == "sublora":  # w (a vector: no weight decay), and the learned mode's gates on their own rate
        opts = [(torch.optim.AdamW([model.w], lr=c["learning_rate"], betas=betas, weight_decay=0.0,
                                   **fused_on_cuda([model.w])), c["learning_rate"])]
        if c["allocation_mode"] == "learned":
            gate_lr = c["sublora_gate_lr"] or c["learning_rate"]
            opts.append((torch.optim.AdamW([model.gate_logits], lr=gate_lr, betas=betas, weight_decay=0.0,
                                           **fused_on_cuda([model.gate_logits])), gate_lr))
        return opts
    return [(model.configure_optimizers(c["weight_decay"], c["learning_rate"], betas, device_type), c["learning_rate"])]


def sora_tuning(it, c):
    """Whether iteration `it` is in SoRA's final tuning phase (λ = 0, zero gates held at zero)."""
    return c["sora_tune_iters"] > 0 and it >= c["max_iters"] - c["sora_tune_iters"]


def sora_lambda_at(it, c):
    """λ of the sparsifying schedule at iteration `it` (constant sora_lambda without one; 0 while tuning)."""
    if sora_tuning(it, c):
        return 0.0
    if c["sora_lambda_max"] <= c["sora_lambda"]:
        return c["sora_lambda"]
    levels = lambda_schedule(c["sora_lambda"], c["sora_lambda_max"], c["sora_lambda_levels"], c["sora_lambda_spacing"])
    return levels[min(it // c["sora_lambda_every"], len(levels) - 1)]


def adapter_stats(c, model, lossf, ortho, reg_weight, known):
    """The adapter's own numbers for a log row: what the loop already knows (λ, the rank budget), ranks
    in use, the regulariser beside the task loss, rotation orthogonality, SubLoRA's A/B gradients."""
    stats = dict(known, **adapter_report(model))
    if ortho is not None:
        stats.update(task_loss=lossf, ortho_loss=ortho.item(), total_loss=lossf + reg_weight * ortho.item())
    if c["adapter"] == "pissa":
        stats["max_orthogonality_error"] = max_orthogonality_error(model)
    if isinstance(model, SubLoRA):
        norms = model.grad_part_norms()  # None when compiled (the hooks that keep them would break the graph)
        if norms:
            stats["grad_norm_A"], stats["grad_norm_B"] = norms
        if model.mode == "learned":
            stats["gamma"] = model.gammas()
    return stats


def _brief(value):
    if isinstance(value, dict):
        value = [round(v, 3) if isinstance(v, float) else v for v in value.values()]
    return f"{value:.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)


def adapter_report(model):
    """Per-step adapter statistics for the log: effective rank per layer (SoRA gates, AdaLoRA E) and
    the adapter parameters in use (r · (in + out + 1) per layer, plus DoRA magnitudes)."""
    ranks = effective_ranks(model)
    if not ranks:
        return {}
    layers = adapter_layers(model)
    remaining = sum(r * (layers[n].in_features + layers[n].out_features + 1) for n, r in ranks.items())
    remaining += sum(m.magnitude.numel() for m in layers.values() if m.magnitude is not None)
    return {"effective_rank": ranks, "adapter_params_remaining": remaining}


def resolve_auto_base(c):
    """init_from='auto' made concrete: a new model for pretraining, SubLoRA (a random base is its
    setting) and TEST_MODE; for any other adapter, the first trained base of AUTO_BASES, else one line
    saying what to run first."""
    if c["init_from"] != "auto" or c["adapter"] not in ADAPTER_KINDS:  # check_config names a wrong adapter
        return
    if c["adapter"] in ("none", "sublora") or c["test_mode"]:
        c["init_from"] = "scratch"
        return
    for base in AUTO_BASES:
        if os.path.isfile(os.path.join(base, "ckpt.pt")):
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"note: {c['adapter']} fine-tunes the trained base in {base}/ (init_from='auto'; set --init_from "
                      "to choose)")
            c["init_from"] = base
            return
    raise ConfigError(f"adapter={c['adapter']} needs a trained base and none is in {' or '.join(AUTO_BASES)}: run `make demo` "
                      "or `python train.py config/train_shakespeare_char.py` first, or pass --init_from=PATH "
                      "(--init_from=scratch trains it on a random frozen base)")


def given_keys(argv):
    """The keys set with --key=value on the command line."""
    return {a[2:].partition("=")[0] for a in argv if a.startswith("--")}


def check_out_dir(out_dir):
    """An out_dir that cannot be a folder (a file, or below one) gets one line before any work."""
    path = os.path.abspath(out_dir)
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"out_dir {out_dir!r} cannot be a folder: {path!r} is a file; choose another --out_dir")


def remove_stale_temp_files(out_dir):
    """Temp files of saves that were killed before their rename (checkpoint.save_atomic names them
    FILE.tmp.PID): never valid, so removed at the next start, with a note."""
    if not os.path.isdir(out_dir):
        return
    stale = [os.path.join(out_dir, f) for f in os.listdir(out_dir) if re.search(r"\.(pt|safetensors)\.tmp\.\d+$", f)]
    if stale:
        size = sum(os.path.getsize(f) for f in stale)
        for f in stale:
            os.remove(f)
        print(f"note: removed {len(stale)} temp file(s) ({size / 2**20:.1f} MB) left in {out_dir} by interrupted saves")


def check_resume_shape(c, ckpt, given):
    """A resumed run keeps its checkpoint's model: a shape key given on the command line that differs
    from it is a mistake, named in one line (not silently ignored)."""
    saved = dict(ckpt["model_args"], model_type=ckpt.get("model_type", "gpt"))
    for key in ("n_layer", "n_head", "n_embd", "bias", "block_size", "model_type"):
        if key in given and c[key] != saved[key]:
            raise ConfigError(f"--{key}={c[key]} but the checkpoint being resumed has {key}={saved[key]}: a resumed run "
                              f"keeps its model; drop --{key}, or start a new run in another --out_dir")


def vocabulary(meta):
    """What a token id means: ('char', its characters in id order), ('gpt2',) or None if unknown."""
    if not meta:
        return None
    if meta.get("tokenizer") == "char":
        return ("char", "".join(meta["itos"][str(i)] if str(i) in meta["itos"] else meta["itos"][i]
                                for i in range(meta["vocab_size"])))
    return (meta.get("tokenizer", "gpt2"),)


def check_vocabulary(base_meta, meta, source, data_dir):
    """A base trained on one vocabulary fine-tuned on data prepared with another would read every
    token id as another character: refused in one line."""
    have, want = vocabulary(base_meta), vocabulary(meta)
    if have is None or want is None or have == want:
        return
    if have[0] == want[0] == "char":
        extra = sorted(set(want[1]) - set(have[1]))
        detail = f"characters the base never saw: {''.join(extra)!r}" if extra else "the same characters with other ids"
        raise ConfigError(f"the base {source!r} was trained on a {len(have[1])}-character vocabulary and {data_dir!r} uses "
                          f"another ({len(want[1])} characters; {detail}): prepare the data with the base's vocabulary "
                          f"(python prepare.py shakespeare_char --input=FILE --vocab_from=DIR_OF_THE_BASE_DATA)")
    raise ConfigError(f"the base {source!r} reads {have[0]} tokens but {data_dir!r} holds {want[0]} tokens: prepare the "
                      "data with the base's tokenizer")


def follow_max_iters(c, argv, environ):
    """A run shortened (or lengthened) with --max_iters keeps the shape of its schedules: every
    SCHEDULE_KEYS value the command line does not set is scaled by the new max_iters over the one the
    config file (or default) gave, with a note. A value set on the command line is kept as given."""
    given = given_keys(argv)
    if "max_iters" not in given or c["init_from"] == "resume":
        return
    planned = configure(DEFAULTS, [a for a in argv if not a.startswith("--max_iters=")], environ, TEST_MODE)["max_iters"]
    if planned == c["max_iters"] or planned == 0:
        return
    ratio = c["max_iters"] / planned
    owner = {"sora_lambda_every": ("sora",), "sora_tune_iters": ("sora",), "adalora_tinit": ("adalora", "adadora"),
             "adalora_tfinal": ("adalora", "adadora")}
    keys = [k for k in SCHEDULE_KEYS if k not in given and c["adapter"] in owner.get(k, (c["adapter"],))]
    scaled = {k: max(1 if k == "sora_lambda_every" else 0, round(c[k] * ratio)) for k in keys}
    changed = {k: v for k, v in scaled.items() if v != c[k]}
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"note: max_iters {planned} -> {c['max_iters']}: schedules scaled to match, "
              + ", ".join(f"{k} {c[k]} -> {v}" for k, v in changed.items()) + " (set them to override)")
    c.update(changed)


def check_config(c):
    if c["adapter"] not in ADAPTER_KINDS:
        raise ConfigError(f"adapter must be one of {ADAPTER_KINDS}, got {c['adapter']!r}")
    if c["model_type"] not in MODELS:
        raise ConfigError(f"model_type must be one of {sorted(MODELS)}, got {c['model_type']!r}")
    if c["compile_mode"] not in COMPILE_MODES:
        raise ConfigError(f"compile_mode must be one of {COMPILE_MODES}, got {c['compile_mode']!r}")
    if c["dtype"] not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {c['dtype']!r}")
    if c["nonfinite"] not in ("stop", "skip"):
        raise ConfigError(f"nonfinite must be 'stop' or 'skip', got {c['nonfinite']!r}")
    check_ranges(c, RANGES)
    if c["lora_rank_pattern"]:
        parse_rank_pattern(c)
    if c["adapter"] == "sora" and c["sora_tune_iters"] >= max(1, c["max_iters"]):
        raise ConfigError(f"sora_tune_iters {c['sora_tune_iters']} leaves no iteration to sparsify in max_iters "
                          f"{c['max_iters']}; lower it below max_iters (0 = no tuning phase)")


def open_data(c):
    path = c["data_dir"] or os.path.join("data", c["dataset"])
    for f in ("train.bin", "val.bin"):
        if not os.path.isfile(os.path.join(path, f)):
            how = f"run `python prepare.py {c['dataset']}`" if c["dataset"] in DATASETS else \
                f"prepare it with prepare.py ({', '.join(DATASETS)}, or --input=FILE for your own text)"
            raise DataError(f"data directory {path!r} has no {f}: {how}, or set --data_dir")
    for split in ("train", "val"):  # before any model is built: a block needs block_size + 1 tokens
        n = num_tokens(path, split)
        if n <= c["block_size"]:
            raise DataError(f"{path}/{split}.bin holds {n:,} tokens, not more than block_size {c['block_size']}: lower "
                            "--block_size" + (" or prepare with a larger --val_fraction" if split == "val" else ""))
    # memmaps are reopened per batch (nanoGPT: avoids a slow memory leak of a long-lived memmap)
    return path, read_meta(path)


def get_batch(data_dir, split, ix, block_size, device):
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
    x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in ix.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block_size].astype(np.int64)) for i in ix.tolist()])
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def num_tokens(data_dir, split):
    return os.path.getsize(os.path.join(data_dir, f"{split}.bin")) // 2


def get_lr(it, c):
    """Linear warmup, then cosine decay from learning_rate to min_lr at lr_decay_iters."""
    if not c["decay_lr"]:
        return c["learning_rate"]
    if it < c["warmup_iters"]:
        return c["learning_rate"] * (it + 1) / (c["warmup_iters"] + 1)
    if it > c["lr_decay_iters"]:
        return c["min_lr"]
    ratio = (it - c["warmup_iters"]) / max(1, c["lr_decay_iters"] - c["warmup_iters"])
    return c["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c["learning_rate"] - c["min_lr"])


def load_base(c, meta):
    """The model before any new adapter: from scratch, GPT-2, or another run's checkpoint (whose own
    adapters, if any, are merged first: its weights become the frozen base)."""
    source = c["init_from"]
    if source == "scratch":
        vocab = meta["vocab_size"] if meta else 50304
        args = dict(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], block_size=c["block_size"],
                    bias=c["bias"], vocab_size=vocab, dropout=c["dropout"])
        return MODELS[c["model_type"]](GPTConfig(**args)), c["model_type"]
    data_dir = c["data_dir"] or os.path.join("data", c["dataset"])
    if source.startswith("gpt2") or os.path.isfile(os.path.join(source, "model.safetensors")):
        check_vocabulary({"tokenizer": "gpt2"}, meta, source, data_dir)
        return GPT.from_pretrained(source, dict(dropout=c["dropout"])), "gpt"  # hub name or local GPT-2 folder
    if not os.path.exists(source):
        raise ConfigError(f"init_from {source!r} is not 'scratch', 'resume', a gpt2 name, nor an existing path")
    ckpt = load_checkpoint(source)
    cfg = ckpt.get("config", {})
    base_data = cfg.get("data_dir") or os.path.join("data", cfg.get("dataset", ""))
    check_vocabulary(ckpt.get("meta") or (read_meta(base_data) if cfg else None), meta, source, data_dir)
    ckpt["model_args"]["dropout"] = c["dropout"]
    return merge_adapters(build_model(ckpt)), ckpt["model_type"]


def save_pruned_adapter(model, info, model_type, model_args, base, out_dir):
    """Drop the unused ranks in place and save the smaller adapter as adapter_pruned.safetensors: SoRA becomes
    the plain LoRA of its non-zero gates; AdaLoRA / AdaDoRA keep only the ranks with E != 0."""
    before = sum(v.numel() for v in adapter_state_dict(model).values())
    if info["kind"] == "sora":
        kept = prune_sora_model(model)
        layers = adapter_layers(model)
        pruned = dict(kind="lora", targets=[t for t in info["targets"] if kept[t.partition(":")[0]]],
                      settings=dict(dropout=info["settings"]["dropout"]), train_embeddings=info["train_embeddings"],
                      layers={n: dict(rank=r, scaling=layers[n].scaling) for n, r in kept.items() if r})
    else:
        kept = slice_adalora_model(model)
        pruned = dict(info, layers={n: dict(rank=r, ranknum=info["settings"]["rank"]) for n, r in kept.items()})
    state = adapter_state_dict(model)
    path = os.path.join(out_dir, "adapter_pruned.safetensors")
    save_adapter_file({"format": FORMAT, "adapter": pruned, "model_type": model_type, "model_args": model_args,
                       "base": base, "state": state}, path)
    after = sum(v.numel() for v in state.values())
    ranks = sorted(kept.values())
    print(f"pruned {info['kind']}: {sum(ranks)} ranks kept in {len(ranks)} layers (per layer {ranks[0]}..{ranks[-1]}, "
          f"median {ranks[len(ranks) // 2]}); adapter parameters {before:,} -> {after:,}; wrote {path} "
          f"({os.path.getsize(path):,} bytes)")
    return path


def peak_memory_mb(device):
    """The run's peak memory: on a GPU the allocator's high-water mark (tensors only), else this
    process's peak resident set (everything it held, torch's libraries included)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def format_eta(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# -----------------------------------------------------------------------------


def train(argv=(), environ=None):
    """Run training; returns the final {'iter', 'train_loss', 'val_loss', ...} metrics of rank 0."""
    c = configure(DEFAULTS, list(argv), environ, test_overrides=TEST_MODE)
    resolve_auto_base(c)
    follow_max_iters(c, list(argv), environ)
    check_config(c)
    check_device(c["device"])
    check_out_dir(c["out_dir"])

    # distributed set-up: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = c["device"]
    if ddp:
        if device.startswith("cuda"):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend=c["backend"] or ("nccl" if device.startswith("cuda") else "gloo"))
    try:
        last = _train(c, device, ddp, rank, world, given_keys(argv))
        if ddp:  # rank 0 still writes plots and pruned adapters: tear down together (gloo aborts otherwise)
            dist.barrier()
        return last
    finally:
        if ddp:
            dist.destroy_process_group()


def _train(c, device, ddp, rank, world, given):
    master = rank == 0
    if c["gradient_accumulation_steps"] % world:  # it counts micro-batches over all processes (nanoGPT's)
        raised = -(-c["gradient_accumulation_steps"] // world) * world
        if master:
            print(f"note: gradient_accumulation_steps={c['gradient_accumulation_steps']} raised to {raised}, a multiple "
                  f"of the {world} processes (each runs {raised // world} micro-batch(es) per step)")
        c["gradient_accumulation_steps"] = raised
    accum = c["gradient_accumulation_steps"] // world  # micro-batches per process per step
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[c["dtype"]]
    autocast = nullcontext() if device_type == "cpu" or ptdtype == torch.float32 else torch.autocast(device_type, ptdtype)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    data_dir, meta = open_data(c)
    out_dir = c["out_dir"]
    ckpt_file = os.path.join(out_dir, "ckpt.pt")
    metrics_file = os.path.join(out_dir, "metrics.jsonl")
    resume = c["init_from"] == "resume"
    held = [f for f in ("ckpt.pt", "metrics.jsonl", *ADAPTER_FILES) if os.path.exists(os.path.join(out_dir, f))]
    if not resume and not c["overwrite"] and held:
        raise ConfigError(f"{out_dir!r} already holds a run ({', '.join(held)}); continue it with --init_from=resume, "
                          "choose another --out_dir, or pass --overwrite=True to replace it")
    if master:
        remove_stale_temp_files(out_dir)

    # the model: every process builds the same one (same seed), DDP then checks they agree
    torch.manual_seed(c["seed"])
    ckpt = None
    if resume:
        ckpt = load_checkpoint(ckpt_file)
        saved = ckpt["adapter"]["kind"]
        if saved != c["adapter"]:
            raise CheckpointError(f"{ckpt_file} was trained with adapter={saved!r} but this run asks for "
                                  f"adapter={c['adapter']!r}; pass --adapter={saved} to resume it")
        check_resume_shape(c, ckpt, given)
        check_vocabulary(ckpt.get("meta"), meta, ckpt_file, data_dir)
        ckpt["model_args"]["dropout"] = c["dropout"]
        model, model_type, info = build_model(ckpt), ckpt["model_type"], ckpt["adapter"]
        # the run keeps its real base (what checkpoints, adapter files and bounds record), not 'resume'
        c["init_from"] = ckpt.get("config", {}).get("init_from", "scratch")
    else:
        model, model_type = load_base(c, meta)
        if meta and meta["vocab_size"] > model.config.vocab_size:
            raise ConfigError(f"dataset {data_dir!r} has {meta['vocab_size']} tokens but the model only "
                              f"{model.config.vocab_size}: use a dataset with this model's tokenizer")
        if c["block_size"] < model.config.block_size:
            model.crop_block_size(c["block_size"])
        info = dict(NO_ADAPTER)
        if c["adapter"] != "none":
            if c["init_from"] == "scratch" and c["adapter"] != "sublora" and master:
                print("note: adapters on a randomly initialised frozen base (the SubLoRA setting); set "
                      "init_from to fine-tune a trained model")
            targets = [t.strip() for t in c["lora_targets"].split(";") if t.strip()] or None
            settings = adapter_settings(c)
            if c["adapter"] == "sublora":
                names = inject_adapters(model, "lora", targets, False, defaults=SUBLORA_TARGETS, **settings)
                sub = dict(intrinsic_dim=c["intrinsic_dim"], projector=c["sublora_projector"],
                           allocation_mode=c["allocation_mode"], allocation_ratio=c["allocation_ratio"],
                           seed=c["sublora_seed"], gate_grad_width=c["sublora_gate_grad_width"])
                model = SubLoRA(model, **sub)
                info = dict(kind="sublora", targets=names, settings=settings, train_embeddings=False, sublora=sub)
                if master:
                    print(f"sublora: w in R^{c['intrinsic_dim']} drives D = {model.D:,} LoRA parameters through a "
                          f"{c['sublora_projector']} projector, {c['allocation_mode']} allocation")
            else:
                names = find_targets(model, targets)
                layers = rank_pattern_layers(names, parse_rank_pattern(c)) if c["lora_rank_pattern"] else None
                inject_adapters(model, c["adapter"], names, c["train_embeddings"], layers=layers, **settings)
                info = dict(kind=c["adapter"], targets=names, settings=settings, train_embeddings=c["train_embeddings"],
                            **({"layers": layers} if layers else {}))
            if c["adapter"] == "pissa" and master:
                times = {n: m.init_seconds for n, m in adapter_layers(model).items()}
                slowest = max(times, key=times.get)
                print(f"pissa: {c['pissa_svd']} SVD init of {len(times)} layers in {sum(times.values()):.3f}s "
                      f"(slowest {slowest}, {1000 * times[slowest]:.1f}ms)")
    if c["block_size"] > model.config.block_size:  # a loaded base with a shorter context
        if "block_size" in given:
            raise ConfigError(f"--block_size={c['block_size']} exceeds the model's context {model.config.block_size}: "
                              f"lower it to {model.config.block_size} or less")
        if master:
            print(f"note: block_size {c['block_size']} -> {model.config.block_size}, the context of the model it starts from")
        c["block_size"] = model.config.block_size
    tokens_per_iter = c["gradient_accumulation_steps"] * c["batch_size"] * c["block_size"]
    model.to(device)
    model_args = {k: getattr(model.config, k) for k in GPTConfig.__dataclass_fields__}
    if master:  # a size that makes one step take minutes is allowed, but said before the long wait
        cfg = model.config
        flops = (6 * model.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * c["block_size"]) * tokens_per_iter
        rate = 3e14 if device_type == "cuda" else 1e11  # FLOP/s an H100 in bf16 / 2 CPU cores reach here (bench.py)
        if flops / rate > 60:
            print(f"note: one iteration is about {flops / 1e12:,.0f} TFLOP, roughly {format_eta(flops / rate)} per "
                  f"iteration on this {device_type}; lower --block_size ({c['block_size']}) or --batch_size for a quick run")
    trainable, total = count_params(model)
    torch.manual_seed(c["seed"] + rank)  # dropout differs per process; the data does not (below)

    optimizers = build_optimizers(model, c, device_type)
    adaptive = c["adapter"] in ("adalora", "adadora")
    reg = regularizer(c)
    allocator = RankAllocator(model, c["adalora_target_r"], c["max_iters"], c["adalora_tinit"], c["adalora_tfinal"],
                              c["adalora_deltaT"], c["adalora_beta1"], c["adalora_beta2"]) if adaptive else None
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
    # training batches: one generator, the same on every process, drawing all micro-batches of a
    # step; each process takes its slice. A DDP run sees exactly the batches of a 1-process run.
    batches = torch.Generator().manual_seed(c["seed"])
    iter_num, best_val_loss, resume_row = 0, 1e9, None
    if resume:
        for (opt, _), state in zip(optimizers, [ckpt["optimizer"], *ckpt.get("extra_optimizers", [])]):
            opt.load_state_dict(state)
        if allocator:
            allocator.load_state_dict(ckpt["allocator"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        resume_row = ckpt.get("eval_row")
        batches.set_state(ckpt["rng"]["batches"])
        if master:
            torch.set_rng_state(ckpt["rng"]["torch"])
    ckpt = None  # free memory

    raw_model = model
    if c["compile"]:
        model = torch.compile(model, mode=c["compile_mode"])
    if ddp:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)

    if master:
        os.makedirs(out_dir, exist_ok=True)
        if not resume and os.path.exists(metrics_file):
            os.remove(metrics_file)  # --overwrite=True was given
        if resume and not c["eval_only"] and os.path.exists(metrics_file):  # rows after the checkpoint come again
            kept = [r for r in read_metrics(out_dir) if r["iter"] < iter_num]
            with open(metrics_file + ".tmp", "w") as f:
                f.write("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(metrics_file + ".tmp", metrics_file)
        print(f"model {model_type} {model_args}")
        print(f"adapter {info['kind']}: {len(info['targets'])} layers adapted; trainable {trainable:,} of "
              f"{total:,} parameters ({100 * trainable / total:.3f}%)")
        print(f"{world} process(es), {accum} micro-batch(es) each; {tokens_per_iter:,} tokens per iteration")
    wandb = None
    if c["wandb_log"] and master:
        import wandb  # noqa: F811

        wandb.init(project=c["wandb_project"], name=c["wandb_run_name"], config=c, resume="allow")

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over eval_iters fixed batches per split (the same ones at every eval), shared
        among the processes."""
        model.eval()
        out = {}
        for split in ("train", "val"):
            gen = torch.Generator().manual_seed(c["seed"] + 1)
            n = num_tokens(data_dir, split) - c["block_size"]
            ix = torch.randint(n, (c["eval_iters"], c["batch_size"]), generator=gen)
            total_loss = torch.zeros(2, device=device)
            for k in range(rank, c["eval_iters"], world):
                X, Y = get_batch(data_dir, split, ix[k], c["block_size"], device)
                with autocast:
                    _, loss = model(X, Y)
                total_loss += torch.stack([loss.float(), torch.ones((), device=device)])
            if ddp:
                dist.all_reduce(total_loss)
            out[split] = (total_loss[0] / total_loss[1]).item()
        model.train()
        return out

    def save_checkpoint(eval_row):
        states = [opt.state_dict() for opt, _ in optimizers]
        ckpt = {"format": FORMAT, "model": raw_model.state_dict(), "optimizer": states[0], "extra_optimizers": states[1:],
                "model_type": model_type, "model_args": model_args, "iter_num": iter_num,
                "best_val_loss": best_val_loss, "config": c, "adapter": info, "meta": meta, "eval_row": eval_row,
                "rng": {"torch": torch.get_rng_state(), "batches": batches.get_state()}}
        if allocator:
            ckpt["allocator"] = allocator.state_dict()
        save_atomic(ckpt, ckpt_file)
        if info["kind"] != "none":
            blob = {"format": FORMAT, "adapter": info, "model_type": model_type, "model_args": model_args,
                    "base": c["init_from"], "seed": c["seed"], "state": adapter_state_dict(raw_model)}
            save_adapter_file(blob, os.path.join(out_dir, "adapter.safetensors"))

    def log(row):
        with open(metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        if wandb:
            wandb.log(row, step=row["iter"])

    n_train = num_tokens(data_dir, "train") - c["block_size"]  # > 0: open_data checked it
    model.train()
    start_iter, t_start, t_outside, dt_avg, last = iter_num, time.time(), 0.0, None, {}
    saved_iter, skipped = (iter_num if resume else None), 0
    budget = allocator.budget(iter_num)[0] if allocator else None

    def diverged(what, at):
        kept = f"{ckpt_file} still holds iteration {saved_iter}" if saved_iter is not None else "no checkpoint was written"
        raise Diverged(f"{what} at iteration {at}: stopped, and {kept}; lower --learning_rate (now {c['learning_rate']:g}) "
                       "or pass --nonfinite=skip to skip non-finite steps")

    while True:
        lr = get_lr(iter_num, c)
        for opt, peak in optimizers:  # every optimizer follows the same schedule, scaled to its peak
            for group in opt.param_groups:
                group["lr"] = lr * peak / c["learning_rate"]
        if c["adapter"] == "sora":
            sparse_lambda, tuning = sora_lambda_at(iter_num, c), sora_tuning(iter_num, c)
            if master and iter_num > 0 and sparse_lambda != sora_lambda_at(iter_num - 1, c):
                report = adapter_report(raw_model)
                print(f"λ level reached {sora_lambda_at(iter_num - 1, c):g}: {report['adapter_params_remaining']:,} "
                      f"adapter parameters remain; effective ranks {list(report['effective_rank'].values())}"
                      + ("; tuning the kept ranks with λ = 0 from here" if tuning else ""))
            optimizers[1][0].set_lambda(sparse_lambda, hold_zeros=tuning)
            if tuning and not sora_tuning(iter_num - 1, c):  # idempotent: safe on resume
                for layer in adapter_layers(raw_model).values():
                    layer.rebalance()
        if allocator and iter_num >= c["max_iters"] and not c["eval_only"]:
            allocator.finalize()  # the final mask is what the last eval sees and every save holds
        first_of_resume = resume and iter_num == start_iter  # that eval was done before the checkpoint
        row = resume_row if first_of_resume else None  # its row joins this iteration's, as uninterrupted
        evaluate = c["eval_only"] or (iter_num % c["eval_interval"] == 0 or iter_num == c["max_iters"]) and not first_of_resume
        if evaluate:
            t_eval = time.time()
            if master and iter_num == start_iter:  # the first eval can take a while on a CPU: say what runs
                print(f"step {iter_num}: evaluating {c['eval_iters']} batches of {c['batch_size']} x {c['block_size']} "
                      "tokens per split (train, val)", flush=True)
            losses = estimate_loss()
            if not all(map(math.isfinite, losses.values())):  # the same numbers on every process
                diverged(f"the eval loss became {losses}", iter_num)
            if master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                row = dict(iter=iter_num, train_loss=None, val_loss=losses["val"], eval_train_loss=losses["train"],
                           lr=lr, tokens_per_s=None, trainable_params=trainable, total_params=total)
                if effective_ranks(raw_model):  # the ranks the eval saw: the last row is the final state
                    row.update(adapter_report(raw_model))
                improved = losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val"])
                if iter_num > 0 and (improved or c["always_save_checkpoint"]) and not c["eval_only"]:
                    save_checkpoint(row)
                    saved_iter = iter_num
                    print(f"saved {ckpt_file}")
            t_outside += time.time() - t_eval  # evals and saves are not training speed
        if c["eval_only"] or iter_num >= c["max_iters"]:
            if row:
                if iter_num > start_iter:
                    row["mean_tokens_per_s"] = (iter_num - start_iter) * tokens_per_iter / (time.time() - t_start - t_outside)
                row["peak_mem_mb"] = peak_memory_mb(device)
                log(row)
                last = row
            break

        # one optimizer step over `accum` micro-batches
        t0 = time.time()
        log_now = iter_num % c["log_interval"] == 0 or evaluate  # the same on every process
        ix = torch.randint(n_train, (c["gradient_accumulation_steps"], c["batch_size"]), generator=batches)
        loss_sum = torch.zeros((), device=device)
        ortho = None
        for micro_step in range(accum):
            X, Y = get_batch(data_dir, "train", ix[rank * accum + micro_step], c["block_size"], device)
            if ddp:  # all-reduce gradients only at the last micro-step
                model.require_backward_grad_sync = micro_step == accum - 1
            with autocast:
                _, loss = model(X, Y)
            total_loss = loss
            if reg:  # the adapter's regulariser, once per step: 1/accum of it per micro-step
                ortho = reg[0](raw_model)
                total_loss = loss + reg[1] * ortho
            scaler.scale(total_loss / accum).backward()
            loss_sum += loss.detach().float()
        for opt, _ in optimizers:
            scaler.unscale_(opt)  # true gradients for clipping and for AdaLoRA's importance (no-op in fp32)
        step_ok = True
        if c["nonfinite"] == "skip":  # one host sync per step: the price of knowing before the update
            grads = [p.grad for p in raw_model.parameters() if p.grad is not None]
            step_ok = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
            if not step_ok:
                skipped += 1
                if master:
                    print(f"iter {iter_num}: non-finite gradient, step skipped ({skipped} so far)")
        if step_ok:
            if c["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_([p for p in raw_model.parameters() if p.requires_grad], c["grad_clip"])
            for opt, _ in optimizers:
                scaler.step(opt)
            if allocator:  # AdaLoRA's order: after optimizer.step(), before zero_grad() (PEFT's)
                budget = allocator.update_and_allocate(iter_num)
            if c["pissa_fold_every"] and c["adapter"] == "pissa" and (iter_num + 1) % c["pissa_fold_every"] == 0:
                for layer in adapter_layers(raw_model).values():
                    layer.fold_rotations()
        scaler.update()
        for opt, _ in optimizers:
            opt.zero_grad(set_to_none=True)

        if log_now:
            if ddp:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            lossf = loss_sum.item() / accum  # mean over all micro-batches of the step (a sync point)
            if not math.isfinite(lossf) and c["nonfinite"] == "stop":
                diverged(f"the training loss became {lossf}", iter_num)
            dt = time.time() - t0
            if iter_num > start_iter:  # the first step pays for compilation and warm-up
                dt_avg = dt if dt_avg is None else 0.9 * dt_avg + 0.1 * dt
            if master:
                eta = format_eta((c["max_iters"] - iter_num) * (dt_avg or dt))
                mfu = raw_model.estimate_mfu(c["batch_size"] * accum, dt) if device_type == "cuda" else None
                print(f"iter {iter_num}/{c['max_iters']}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f}ms, "
                      f"{tokens_per_iter / dt:,.0f} tok/s" + (f", mfu {100 * mfu:.1f}%" if mfu else "") + f", eta {eta}")
                known = dict(sora_lambda=sparse_lambda) if c["adapter"] == "sora" else {}
                if allocator:
                    known["rank_budget"] = budget
                stats = adapter_stats(c, raw_model, lossf, ortho, reg[1] if reg else 0.0, known)
                if stats:
                    print(f"  {c['adapter']}: " + ", ".join(f"{k} {_brief(v)}" for k, v in stats.items() if k != "task_loss"))
                row = dict(row or {}, iter=iter_num, train_loss=lossf, lr=lr, tokens_per_s=tokens_per_iter / dt,
                           trainable_params=trainable, total_params=total, **stats)
                row.setdefault("val_loss", None)
                log(row)
                last = row
        iter_num += 1

    if master:
        speed = f", {last['mean_tokens_per_s']:,.0f} tok/s on average (evals excluded)" if "mean_tokens_per_s" in last else ""
        print(f"done: {iter_num - start_iter} iterations in {format_eta(time.time() - t_start)}{speed}; "
              f"best val loss {best_val_loss:.4f}")
        import plots

        if not c["eval_only"]:
            print(f"wrote {plots.plot_losses([out_dir])}")
        if effective_ranks(raw_model) and not c["eval_only"]:
            print(f"wrote {plots.plot_effective_ranks(out_dir)} and {plots.plot_rank_allocation(out_dir)}")
            if c["sora_prune"] if c["adapter"] == "sora" else c["adalora_prune"]:
                save_pruned_adapter(raw_model, info, model_type, model_args, c["init_from"], out_dir)
    if wandb:
        wandb.finish()
    return last


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def report(out_dirs):
    """One line per run: val loss at its first and last eval, trainable fraction, speed (the run's mean,
    evals excluded; the median logged step for runs from before it was recorded)."""
    print(f"{'run':<28} {'iters':>6} {'val first':>10} {'val last':>9} {'trainable':>22} {'tok/s':>8}")
    for d in out_dirs:
        rows = read_metrics(d)
        evals = [r for r in rows if r["val_loss"] is not None]
        speed = [r["tokens_per_s"] for r in rows if r["tokens_per_s"]]
        speed = [rows[-1]["mean_tokens_per_s"]] if "mean_tokens_per_s" in rows[-1] else speed
        frac = f"{rows[-1]['trainable_params']:,} ({100 * rows[-1]['trainable_params'] / rows[-1]['total_params']:.2f}%)"
        print(f"{d:<28} {rows[-1]['iter']:>6} {evals[0]['val_loss']:>10.4f} {evals[-1]['val_loss']:>9.4f} {frac:>22} "
              f"{sorted(speed)[len(speed) // 2] if speed else 0:>8,.0f}")


def main():
    cli(train, sys.argv[1:])  # a mistake ends in one line (once under torchrun); LOWRANK_DEBUG=1 for the traceback


if __name__ == "__main__":
    main()
