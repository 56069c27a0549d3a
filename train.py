"""
One training loop for every model and adapter: pretraining, full fine-tuning, every adapter family.
Single process or DDP. Config: the globals below and each adapter family's own keys (adapters.py),
then a config file, then environment variables (USE_LORA=True, LORA_RANK, LORA_ALPHA, LORA_DROPOUT,
TEST_MODE=True), then --key=value.

    python prepare.py shakespeare_char
    python train.py config/train_shakespeare_char.py --device=cpu          # pretrain the baby GPT
    python train.py config/finetune_shakespeare_lora.py --device=cpu       # LoRA on top of it
    USE_LORA=True LORA_RANK=4 python train.py config/finetune_shakespeare_lora.py --device=cpu --out_dir=out-lora-r4
    TEST_MODE=True python train.py --device=cpu                            # a tiny run, seconds
    python train.py config/finetune_shakespeare_lora.py --init_from=resume # continue where it stopped
    torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char.py --device=cpu --out_dir=out-ddp
    torchrun --standalone --nproc_per_node=8 train.py config/finetune_gpt2_lora.py   # 8 GPUs
"""

import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from adapters import FAMILIES, AdapterError, adapter_state_dict, config_keys, count_params, family_of
from checkpoint import (
    FORMAT,
    RUN_FILES,
    remove_stale_temp_files,
    resolve_auto_base,
    restore_training,
    save_adapter_file,
    save_checkpoint,
    start_model,
)
from configurator import (
    COMPILE_MODES,
    ConfigError,
    check_device,
    check_folder,
    check_ranges,
    cli,
    config_defaults,
    configure,
)
from files import atomic_write, lock_folder
from model import MODELS, GPTConfig
from plots import plot_effective_ranks, plot_losses, plot_rank_allocation, read_metrics
from prepare import DataError, check_token_ids, get_batch, num_tokens, open_data  # noqa: F401 (DataError)

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
dropout = 0.2  # dropout in the model (adapters have their own lora_dropout); a fine-tune inherits its base's unless set
bias = False  # biases in Linears and LayerNorms
# adapter: the family (each family's keys, and those every family reads, follow: adapters.config_keys)
adapter = "none"  # 'none' | 'lora' | 'dora' | 'sora' | 'adalora' | 'adadora' | 'pissa' | 'sublora'
# AdamW
learning_rate = 1e-3  # peak learning rate
max_iters = 5000  # training iterations (a shorter or longer value rescales the schedules)
weight_decay = 1e-1  # AdamW weight decay
beta1 = 0.9  # AdamW beta1
beta2 = 0.99  # AdamW beta2
grad_clip = 1.0  # 0 disables
nonfinite = (
    "stop"  # a nan/inf loss: 'stop' the run (nothing saved over the last good checkpoint) | 'skip' the step
)
# learning-rate schedule: linear warmup, cosine decay to min_lr
decay_lr = True  # warmup then cosine decay; False keeps learning_rate
warmup_iters = 100  # linear warmup iterations
lr_decay_iters = 5000  # iteration where the cosine reaches min_lr
min_lr = 1e-4  # learning rate at the end of the decay
# system
device = "cuda" if torch.cuda.is_available() else "cpu"  # 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = (
    "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
)  # or 'float16'
compile = False  # torch.compile the model (worth it on a GPU)
compile_mode = "default"  # 'default' | 'reduce-overhead' (CUDA graphs: no launch cost) | 'max-autotune'
backend = ""  # DDP backend; '' = nccl on cuda, gloo on cpu
seed = 1337  # seeds the model init, dropout and the batch order
test_mode = False  # TEST_MODE=True: the sizes below, for a run of seconds
OWN_KEYS = config_defaults(globals())
TEST_MODE = dict(
    max_iters=20,
    eval_interval=10,
    eval_iters=4,
    log_interval=5,
    batch_size=8,
    block_size=32,
    n_layer=2,
    n_head=2,
    n_embd=32,
    warmup_iters=2,
    lr_decay_iters=20,
    dropout=0.0,
)
# the values each key may take (check_config): intervals, inf for no bound; the families give theirs
RANGES = {
    "learning_rate": "(0, inf)",
    "min_lr": "[0, inf)",
    "weight_decay": "[0, inf)",
    "grad_clip": "[0, inf)",
    "beta1": "[0, 1)",
    "beta2": "[0, 1)",
    "dropout": "[0, 1)",
    **{k: "[0, inf)" for k in ("max_iters", "warmup_iters", "lr_decay_iters")},
    **{
        k: "[1, inf)"
        for k in (
            "eval_iters",
            "batch_size",
            "block_size",
            "gradient_accumulation_steps",
            "log_interval",
            "eval_interval",
            "n_layer",
            "n_head",
            "n_embd",
        )
    },
}
SCHEDULE_KEYS = ("warmup_iters", "lr_decay_iters")  # + the family's: a --max_iters override rescales them


def all_keys():
    """Every config key: this script's, then the adapter families' (a family registered later counts)."""
    return dict(OWN_KEYS, **{k: default for k, (default, *_) in config_keys().items()})


DEFAULTS = all_keys()


class Diverged(RuntimeError):
    """The loss or the weights became nan / inf: the run stops before anything is saved over the last
    good checkpoint."""


# -----------------------------------------------------------------------------
# config


def read_config(argv, environ):
    """(config, {key: where the user set it}), every check that needs no data or model done."""
    defaults, given = all_keys(), {}
    described = {k: (section, text) for k, (_, _, text, section) in config_keys().items()}
    c = configure(defaults, list(argv), environ, TEST_MODE, described, given)
    resolve_auto_base(c)  # init_from='auto' made concrete
    follow_max_iters(c, defaults, list(argv), environ, given)
    choices = {
        "adapter": tuple(FAMILIES),
        "model_type": tuple(MODELS),
        "compile_mode": COMPILE_MODES,
        "dtype": ("float32", "bfloat16", "float16"),
        "nonfinite": ("stop", "skip"),
    }
    for key, allowed in choices.items():
        if c[key] not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, allowed))}, got {c[key]!r}")
    check_ranges(c, dict(RANGES, **{k: r for k, (_, r, *_) in config_keys().items() if r}))
    try:
        family_of(c["adapter"])(c).check()
    except AdapterError as e:
        raise ConfigError(str(e)) from None
    check_device(c["device"])
    check_folder(c["out_dir"], "out_dir")
    return c, given


def follow_max_iters(c, defaults, argv, environ, given):
    """A run shortened (or lengthened) with --max_iters keeps the shape of its schedules: every schedule
    key (this script's and the family's) the command line does not set is scaled by the new max_iters
    over the one the config file (or default) gave, with a note."""
    cli_keys = {a[2:].partition("=")[0] for a in argv if a.startswith("--")}
    if "max_iters" not in cli_keys or c["init_from"] == "resume" or c["adapter"] not in FAMILIES:
        return
    planned = configure(defaults, [a for a in argv if not a.startswith("--max_iters=")], environ, TEST_MODE)[
        "max_iters"
    ]
    if planned == c["max_iters"] or planned == 0:
        return
    keys = [k for k in (*SCHEDULE_KEYS, *FAMILIES[c["adapter"]].schedule_keys) if k not in cli_keys]
    lowest = {k: 1 for k, (_, r, _) in FAMILIES[c["adapter"]].keys.items() if r == "[1, inf)"}
    scaled = {k: max(lowest.get(k, 0), round(c[k] * c["max_iters"] / planned)) for k in keys}
    changed = {k: v for k, v in scaled.items() if v != c[k]}
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(
            f"note: max_iters {planned} -> {c['max_iters']}: schedules scaled to match, "
            + ", ".join(f"{k} {c[k]} -> {v}" for k, v in changed.items())
            + " (set them to override)"
        )
    c.update(changed)


# -----------------------------------------------------------------------------
# schedule, model


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


@torch.no_grad()
def estimate_loss(model, c, data_dir, device, autocast, rank, world):
    """Mean loss over eval_iters fixed batches per split (the same ones at every eval), shared among
    the processes."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(c["seed"] + 1)
        ix = torch.randint(
            num_tokens(data_dir, split) - c["block_size"], (c["eval_iters"], c["batch_size"]), generator=gen
        )
        total_loss = torch.zeros(2, device=device)
        for k in range(rank, c["eval_iters"], world):
            X, Y = get_batch(data_dir, split, ix[k], c["block_size"], device)
            with autocast:
                _, loss = model(X, Y)
            total_loss += torch.stack([loss.float(), torch.ones((), device=device)])
        if world > 1:
            dist.all_reduce(total_loss)
        out[split] = (total_loss[0] / total_loss[1]).item()
    model.train()
    return out


def train_step(
    model, raw_model, family, optimizers, scaler, batches, it, c, data_dir, device, autocast, rank, world
):
    """One optimizer step over this process's micro-batches: (summed task loss, the family's last
    extra-loss term or None, whether the step was taken)."""
    accum = c["gradient_accumulation_steps"] // world
    ix = torch.randint(
        num_tokens(data_dir, "train") - c["block_size"],
        (c["gradient_accumulation_steps"], c["batch_size"]),
        generator=batches,
    )
    loss_sum, extra = torch.zeros((), device=device), None
    for micro_step in range(accum):
        X, Y = get_batch(data_dir, "train", ix[rank * accum + micro_step], c["block_size"], device)
        if world > 1:  # all-reduce gradients only at the last micro-step
            model.require_backward_grad_sync = micro_step == accum - 1
        with autocast:
            _, loss = model(X, Y)
        extra = family.extra_loss(raw_model)  # the family's regulariser: 1/accum of it per micro-step
        scaler.scale((loss if extra is None else loss + extra) / accum).backward()
        loss_sum += loss.detach().float()
    for opt, _ in optimizers:
        scaler.unscale_(opt)  # true gradients for clipping and for AdaLoRA's importance (no-op in fp32)
    step_ok = True
    if c["nonfinite"] == "skip":  # one host sync per step: the price of knowing before the update
        grads = [p.grad for p in raw_model.parameters() if p.grad is not None]
        step_ok = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
    if step_ok:
        if c["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in raw_model.parameters() if p.requires_grad], c["grad_clip"]
            )
        for opt, _ in optimizers:
            scaler.step(opt)
        family.after_step(raw_model, it)
    scaler.update()
    for opt, _ in optimizers:
        opt.zero_grad(set_to_none=True)
    return loss_sum, extra, step_ok


def open_run_folder(out_dir, old, resume_at):
    """The run folder made and locked to this process (the lock is returned); an earlier run's files
    (`old`: --overwrite=True was given) removed; on a resume at iteration `resume_at`, the metrics rows
    logged after the checkpoint dropped (they come again)."""
    os.makedirs(out_dir, exist_ok=True)
    lock = lock_folder(out_dir, "python train.py " + " ".join(sys.argv[1:]))
    for f in old:
        path = os.path.join(out_dir, f)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    if resume_at is not None and os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
        kept = [r for r in read_metrics(out_dir) if r["iter"] < resume_at]
        atomic_write(os.path.join(out_dir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in kept))
    return lock


def finish_run(c, model, family, info, model_type, model_args, last, iters, seconds, best_val_loss):
    """The end of a run (rank 0): the summary line, the plots, and the family's smaller adapter file."""
    speed = (
        f", {last['mean_tokens_per_s']:,.0f} tok/s on average (evals excluded)"
        if "mean_tokens_per_s" in last
        else ""
    )
    print(f"done: {iters} iterations in {format_eta(seconds)}{speed}; best val loss {best_val_loss:.4f}")
    if c["eval_only"]:
        return
    print(f"wrote {plot_losses([c['out_dir']])}")
    if last.get("effective_rank"):
        print(f"wrote {plot_effective_ranks(c['out_dir'])} and {plot_rank_allocation(c['out_dir'])}")
    finished = family.finish(model, info)  # a smaller adapter file (pruned ranks), if the family makes one
    if finished:
        path = os.path.join(c["out_dir"], "adapter_pruned.safetensors")
        save_adapter_file(
            {
                "format": FORMAT,
                "adapter": finished[0],
                "model_type": model_type,
                "model_args": model_args,
                "base": c["init_from"],
                "state": finished[1],
            },
            path,
        )
        print(f"wrote {path} ({os.path.getsize(path):,} bytes)")


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


def _brief(value):
    if isinstance(value, dict):
        value = [round(v, 3) if isinstance(v, float) else v for v in value.values()]
    return (
        f"{value:.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)
    )


# -----------------------------------------------------------------------------


def train(argv=(), environ=None):
    """Run training; returns the final {'iter', 'train_loss', 'val_loss', ...} metrics of rank 0."""
    c, given = read_config(argv, environ)
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
        last = _train(c, device, ddp, rank, world, given)
        if ddp:  # rank 0 still writes plots and pruned adapters: tear down together (gloo aborts otherwise)
            dist.barrier()
        return last
    finally:
        if ddp:
            dist.destroy_process_group()


def _train(c, device, ddp, rank, world, given):
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    if c["gradient_accumulation_steps"] % world:  # it counts micro-batches over all processes (nanoGPT's)
        raised = -(-c["gradient_accumulation_steps"] // world) * world
        say(
            f"note: gradient_accumulation_steps={c['gradient_accumulation_steps']} raised to {raised}, a multiple "
            f"of the {world} processes (each runs {raised // world} micro-batch(es) per step)"
        )
        c["gradient_accumulation_steps"] = raised
    accum = c["gradient_accumulation_steps"] // world  # micro-batches per process per step
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[c["dtype"]]
    autocast = (
        nullcontext()
        if device_type == "cpu" or ptdtype == torch.float32
        else torch.autocast(device_type, ptdtype)
    )
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    data_dir, meta = open_data(c)
    out_dir = c["out_dir"]
    ckpt_file, metrics_file = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "metrics.jsonl")
    resume = c["init_from"] == "resume"
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]
    if not resume and not c["overwrite"] and held:
        raise ConfigError(
            f"{out_dir!r} already holds a run ({', '.join(held)}); continue it with --init_from=resume, "
            "choose another --out_dir, or pass --overwrite=True to replace it"
        )
    if master:
        remove_stale_temp_files(out_dir)

    # the model: every process builds the same one (same seed), DDP then checks they agree
    torch.manual_seed(c["seed"])
    model, model_type, info, family, ckpt = start_model(c, meta, given, say)
    if meta is None:
        check_token_ids(data_dir, model.config.vocab_size)
    tokens_per_iter = c["gradient_accumulation_steps"] * c["batch_size"] * c["block_size"]
    model.to(device)
    model_args = {k: getattr(model.config, k) for k in GPTConfig.__dataclass_fields__}
    flops = (
        model.flops_per_token() * tokens_per_iter
    )  # a step of minutes is allowed, but said before the long wait
    rate = (
        3e14 if device_type == "cuda" else 1e11
    )  # FLOP/s an H100 in bf16 / 2 CPU cores reach here (bench.py)
    if flops / rate > 60:
        say(
            f"note: one iteration is about {flops / 1e12:,.0f} TFLOP, roughly {format_eta(flops / rate)} per iteration "
            f"on this {device_type}; lower --block_size ({c['block_size']}) or --batch_size for a quick run"
        )
    trainable, total = count_params(model)
    torch.manual_seed(c["seed"] + rank)  # dropout differs per process; the data does not (below)

    optimizers = family.optimizers(
        model, c["learning_rate"], (c["beta1"], c["beta2"]), c["weight_decay"], device_type
    )
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
    # training batches: one generator, the same on every process, drawing all micro-batches of a
    # step; each process takes its slice. A DDP run sees exactly the batches of a 1-process run.
    batches = torch.Generator().manual_seed(c["seed"])
    iter_num, best_val_loss, resume_row = (
        restore_training(ckpt, out_dir, optimizers, family, batches, master, say)
        if resume
        else (0, 1e9, None)
    )
    ckpt = None  # free memory

    raw_model = model
    if c["compile"]:
        model = torch.compile(model, mode=c["compile_mode"])
    if ddp:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)

    lock = None
    if master:
        lock = open_run_folder(
            out_dir, [] if resume else held, iter_num if resume and not c["eval_only"] else None
        )
        print(f"model {model_type} {model_args}")
        print(
            f"adapter {info['kind']}: {len(info['targets'])} layers adapted; trainable {trainable:,} of "
            f"{total:,} parameters ({100 * trainable / total:.3f}%)"
        )
        print(f"{world} process(es), {accum} micro-batch(es) each; {tokens_per_iter:,} tokens per iteration")
    wandb = None
    if c["wandb_log"] and master:
        import wandb  # noqa: F811

        wandb.init(project=c["wandb_project"], name=c["wandb_run_name"], config=c, resume="allow")

    def save(eval_row):
        if info["targets"]:  # the adapter file first: the checkpoint, written last, is what a resume takes
            blob = {
                "format": FORMAT,
                "adapter": info,
                "model_type": model_type,
                "model_args": model_args,
                "base": c["init_from"],
                "seed": c["seed"],
                "iter_num": iter_num,
                "state": adapter_state_dict(raw_model),
            }
            save_adapter_file(blob, os.path.join(out_dir, "adapter.safetensors"))
        states = [opt.state_dict() for opt, _ in optimizers]
        save_checkpoint(
            {
                "format": FORMAT,
                "model": raw_model.state_dict(),
                "optimizer": states[0],
                "extra_optimizers": states[1:],
                "model_type": model_type,
                "model_args": model_args,
                "iter_num": iter_num,
                "best_val_loss": best_val_loss,
                "config": c,
                "adapter": info,
                "family": family.state_dict(),
                "meta": meta,
                "eval_row": eval_row,
                "rng": {"torch": torch.get_rng_state(), "batches": batches.get_state()},
            },
            ckpt_file,
        )

    def log(row):
        with open(metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        if wandb:
            wandb.log(row, step=row["iter"])

    def diverged(what, at):
        kept = (
            f"{ckpt_file} still holds iteration {saved_iter}"
            if saved_iter is not None
            else "no checkpoint was written"
        )
        raise Diverged(
            f"{what} at iteration {at}: stopped, and {kept}; lower --learning_rate (now {c['learning_rate']:g}) "
            "or pass --nonfinite=skip to skip non-finite steps"
        )

    model.train()
    start_iter, t_start, t_outside, dt_avg, last = iter_num, time.time(), 0.0, None, {}
    saved_iter, skipped = (iter_num if resume else None), 0
    while True:
        lr = get_lr(iter_num, c)
        for opt, peak in optimizers:  # every optimizer follows the same schedule, scaled to its peak
            for group in opt.param_groups:
                group["lr"] = lr * peak / c["learning_rate"]
        if not c["eval_only"]:
            family.before_step(raw_model, iter_num)
        first_of_resume = resume and iter_num == start_iter  # that eval was done before the checkpoint
        row = resume_row if first_of_resume else None  # its row joins this iteration's, as uninterrupted
        evaluate = (
            c["eval_only"]
            or (iter_num % c["eval_interval"] == 0 or iter_num == c["max_iters"])
            and not first_of_resume
        )
        if evaluate:
            t_eval = time.time()
            if iter_num == start_iter:  # the first eval can take a while on a CPU: say what runs
                say(
                    f"step {iter_num}: evaluating {c['eval_iters']} batches of {c['batch_size']} x {c['block_size']} "
                    "tokens per split (train, val)",
                    flush=True,
                )
            losses = estimate_loss(model, c, data_dir, device, autocast, rank, world)
            if not all(map(math.isfinite, losses.values())):  # the same numbers on every process
                diverged(f"the eval loss became {losses}", iter_num)
            if master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                row = dict(
                    iter=iter_num,
                    train_loss=None,
                    val_loss=losses["val"],
                    eval_train_loss=losses["train"],
                    lr=lr,
                    tokens_per_s=None,
                    trainable_params=trainable,
                    total_params=total,
                    **family.stats(raw_model),
                )
                improved = losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val"])
                if iter_num > 0 and (improved or c["always_save_checkpoint"]) and not c["eval_only"]:
                    save(row)
                    saved_iter = iter_num
                    print(f"saved {ckpt_file}")
            t_outside += time.time() - t_eval  # evals and saves are not training speed
        if c["eval_only"] or iter_num >= c["max_iters"]:
            if row:
                if iter_num > start_iter:
                    row["mean_tokens_per_s"] = (
                        (iter_num - start_iter) * tokens_per_iter / (time.time() - t_start - t_outside)
                    )
                row["peak_mem_mb"] = peak_memory_mb(device)
                log(row)
                last = row
            break

        # one optimizer step over `accum` micro-batches
        t0 = time.time()
        log_now = iter_num % c["log_interval"] == 0 or evaluate  # the same on every process
        loss_sum, extra, step_ok = train_step(
            model,
            raw_model,
            family,
            optimizers,
            scaler,
            batches,
            iter_num,
            c,
            data_dir,
            device,
            autocast,
            rank,
            world,
        )
        if not step_ok:
            skipped += 1
            say(f"iter {iter_num}: non-finite gradient, step skipped ({skipped} so far)")
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
                print(
                    f"iter {iter_num}/{c['max_iters']}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f}ms, "
                    f"{tokens_per_iter / dt:,.0f} tok/s"
                    + (f", mfu {100 * mfu:.1f}%" if mfu else "")
                    + f", eta {eta}"
                )
                stats = family.stats(raw_model)
                if extra is not None:
                    stats.update(
                        task_loss=lossf,
                        extra_loss=extra.item(),
                        total_loss=lossf + extra.item(),
                    )
                if stats:
                    print(
                        f"  {info['kind']}: "
                        + ", ".join(f"{k} {_brief(v)}" for k, v in stats.items() if k != "task_loss")
                    )
                row = dict(
                    row or {},
                    iter=iter_num,
                    train_loss=lossf,
                    lr=lr,
                    tokens_per_s=tokens_per_iter / dt,
                    trainable_params=trainable,
                    total_params=total,
                    **stats,
                )
                row.setdefault("val_loss", None)
                log(row)
                last = row
        iter_num += 1

    if master:
        finish_run(
            c,
            raw_model,
            family,
            info,
            model_type,
            model_args,
            last,
            iter_num - start_iter,
            time.time() - t_start,
            best_val_loss,
        )
    if wandb:
        wandb.finish()
    if lock:
        lock.close()
    return last


def main():
    cli(
        train, sys.argv[1:]
    )  # a mistake ends in one line (once under torchrun); LOWRANK_DEBUG=1 for the traceback


if __name__ == "__main__":
    main()
