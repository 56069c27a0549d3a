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
import sys
import time
from contextlib import contextmanager, nullcontext
from types import MappingProxyType

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from adapters import (
    FAMILIES,
    SHARED_KEYS,
    AdapterError,
    adapter_state_dict,
    config_keys,
    count_params,
    family_of,
)
from checkpoint import (
    FORMAT,
    MODEL_SETTINGS,
    auto_base,
    base_args,
    base_checkpoint,
    data_provenance,
    load_resumed,
    lock_run_folder,
    remove_run_files,
    restore_training,
    resume_settings,
    run_files,
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
    import_plugins,
)
from files import atomic_write
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
data_part = ""  # '' = all of train.bin | 'prior' | 'bound': a part of it (prepare.py --prior_fraction)
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
adapter = "none"  # 'none', or a family: lora dora loraga sora adalora adadora pissa sublora vera
# AdamW
learning_rate = 1e-3  # peak learning rate
max_iters = 5000  # training iterations (a shorter or longer value rescales the schedules)
weight_decay = 1e-1  # AdamW weight decay
beta1 = 0.9  # AdamW beta1
beta2 = 0.99  # AdamW beta2
grad_clip = 1.0  # 0 disables
nonfinite = "stop"  # a nan/inf loss: 'stop' the run (the last good checkpoint kept) | 'skip' the step
# learning-rate schedule: linear warmup, cosine decay to min_lr
decay_lr = True  # warmup then cosine decay; False keeps learning_rate
warmup_iters = 100  # linear warmup iterations
lr_decay_iters = 5000  # iteration where the cosine reaches min_lr
min_lr = 1e-4  # learning rate at the end of the decay
# system
device = "cuda" if torch.cuda.is_available() else "cpu"  # 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"  # float16
compile = False  # torch.compile the model (worth it on a GPU)
compile_mode = "default"  # 'default' | 'reduce-overhead' (CUDA graphs: no launch cost) | 'max-autotune'
backend = ""  # DDP backend; '' = nccl on cuda, gloo on cpu
seed = 1337  # seeds the model init, dropout and the batch order
test_mode = False  # TEST_MODE=True: the sizes below, for a run of seconds
plugins = ""  # modules imported first (names or .py paths, comma-separated): they may register() families
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
# where and how this process runs: a resume takes these from its command, every other key from its checkpoint
SESSION_KEYS = (
    "out_dir",
    "init_from",
    "eval_only",
    "overwrite",
    "device",
    "compile",
    "compile_mode",
    "backend",
    "wandb_log",
    "wandb_project",
    "wandb_run_name",
    "test_mode",
)


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
    import_plugins(argv)  # before the keys: a plugin's family brings its own
    defaults, given = all_keys(), {}
    described = {k: (section, text) for k, (_, _, text, section) in config_keys().items()}
    c = configure(defaults, list(argv), environ, TEST_MODE, described, given)
    if c["init_from"] == "auto" and c["adapter"] in FAMILIES:  # made concrete (a wrong adapter: below)
        c["init_from"] = auto_base(c)
        if c["init_from"] != "scratch" and int(os.environ.get("RANK", 0)) == 0:
            print(
                f"note: {c['adapter']} fine-tunes the trained base in {c['init_from']}/ (init_from='auto'; set "
                "--init_from to choose)"
            )
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


def resolve_config(argv, environ, world):
    """The run's config, resolved once, here, and read-only after: read_config's, then what the number of
    processes and the model it starts from decide (the checkpoint resumed keeps what shaped it; a base
    gives its MODEL_SETTINGS unless set, and a shorter context), each change said in a note. Returns (c,
    {key: where the user set it}, the checkpoint to resume or None, the base run's checkpoint or None)."""
    c, given = read_config(argv, environ)
    say = print if int(os.environ.get("RANK", 0)) == 0 else (lambda *a, **k: None)
    resumed = None
    if c["init_from"] == "resume":
        resumed = load_resumed(c)
        shaping = ("adapter", "model_type", "n_layer", "n_head", "n_embd", "bias", "block_size", "dropout")
        shaping += (*SHARED_KEYS, *family_of(resumed["adapter"]["kind"]).keys)
        kept, notes = resume_settings(c, resumed, given, shaping, SESSION_KEYS)
        c.update(kept)
        for note in notes:
            say(note)
        # the run keeps its real base (what checkpoints, adapter files and bounds record), not 'resume'
        c["init_from"] = resumed.get("config", {}).get("init_from", "scratch")
    # checked after a resume took its checkpoint's dtype
    if c["dtype"] == "float16" and not c["device"].startswith("cuda"):
        raise ConfigError(
            f"dtype='float16' needs a CUDA device (its gradient scaler), not {c['device']!r}: use --dtype=bfloat16 "
            "or --dtype=float32"
        )
    if c["gradient_accumulation_steps"] % world:  # it counts micro-batches over all processes (nanoGPT's)
        raised = -(-c["gradient_accumulation_steps"] // world) * world
        say(
            f"note: gradient_accumulation_steps={c['gradient_accumulation_steps']} raised to {raised}, a multiple "
            f"of the {world} processes (each runs {raised // world} micro-batch(es) per step)"
        )
        c["gradient_accumulation_steps"] = raised
    if resumed is not None:
        return MappingProxyType(c), given, resumed, None
    base = base_checkpoint(c)
    args = base_args(c, base) or {}
    for key in MODEL_SETTINGS:  # how a trained base (ours or a GPT-2's) computes, unless the user set it
        if key not in given and key in args and args[key] != c[key]:
            say(f"note: {key} {c[key]} -> {args[key]}, the base's (set --{key} to choose)")
            c[key] = args[key]
    context = args.get("block_size", c["block_size"])
    if c["block_size"] > context:  # a base with a shorter context
        if given.get("block_size") == "command line":
            raise ConfigError(
                f"--block_size={c['block_size']} exceeds the model's context {context}: lower it to {context} or less"
            )
        say(f"note: block_size {c['block_size']} -> {context}, the context of the model it starts from")
        c["block_size"] = context
    if c["init_from"] == "scratch" and not FAMILIES[c["adapter"]].scratch_base:
        say(
            "note: adapters on a randomly initialised frozen base (the SubLoRA setting); set init_from to fine-tune a "
            "trained model"
        )
    return MappingProxyType(c), given, None, base


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
def estimate_loss(model, c, data, device, autocast, rank, world, say=None):
    """Mean loss over eval_iters fixed batches per split (the same ones at every eval; train's from the
    run's part of train.bin), shared among the processes. data: (folder, vocabulary size, the train
    range [lo, hi)). `say` (process 0's print) gets a progress line every 15 seconds of a long eval."""
    data_dir, vocab, (lo, hi) = data
    model.eval()
    out, start, shown = {}, time.time(), time.time()
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(c["seed"] + 1)
        first, end = (lo, hi) if split == "train" else (0, num_tokens(data_dir, split))
        ix = first + torch.randint(
            end - first - c["block_size"], (c["eval_iters"], c["batch_size"]), generator=gen
        )
        total_loss = torch.zeros(2, device=device)
        for k in range(rank, c["eval_iters"], world):
            X, Y = get_batch(data_dir, split, ix[k], c["block_size"], device, vocab)
            with autocast:
                _, loss = model(X, Y)
            total_loss += torch.stack([loss.float(), torch.ones((), device=device)])
            if say and time.time() - shown > 15:
                done = (k + 1) / c["eval_iters"] / 2 + (split == "val") / 2  # of both splits
                eta = format_eta((time.time() - start) * (1 - done) / done)
                say(
                    f"  eval {split}: batch {k + 1}/{c['eval_iters']}, {100 * done:.0f}% of the eval, eta {eta}"
                )
                shown = time.time()
        if world > 1:
            dist.all_reduce(total_loss)
        out[split] = (total_loss[0] / total_loss[1]).item()
    model.train()
    return out


def trim_metrics(out_dir, resume_at):
    """A resume at iteration `resume_at`: the metrics rows logged after the checkpoint dropped (they
    come again)."""
    if os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
        kept = [r for r in read_metrics(out_dir) if r["iter"] < resume_at]
        atomic_write(os.path.join(out_dir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in kept))


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


class Clock:
    """Training time: the wall time since the start less evals and saves (not training speed), and the
    smoothed time per iteration the ETA uses (the first iteration pays for compilation and warm-up)."""

    def __init__(self):
        self.start, self.outside, self.per_iter = time.time(), 0.0, None

    @contextmanager
    def paused(self):
        t = time.time()
        yield
        self.outside += time.time() - t

    def lap(self, dt, first):
        if not first:
            self.per_iter = dt if self.per_iter is None else 0.9 * self.per_iter + 0.1 * dt

    def eta(self, iterations_left, dt):
        return format_eta(iterations_left * (self.per_iter or dt))

    def training_seconds(self):
        return time.time() - self.start - self.outside


class Run:
    """What the loop writes and reports for one run: the checkpoint and adapter file, the metrics rows
    (metrics.jsonl, wandb), the eval row and the log line. Process 0 writes; every process evaluates."""

    def __init__(self, c, raw_model, family, info, optimizers, data, device, precision, rank, world):
        self.c, self.model, self.raw_model, self.family, self.info = c, raw_model, raw_model, family, info
        self.optimizers, (self.data_dir, self.meta), self.device = optimizers, data, device
        self.autocast, self.scaler = precision
        self.rank, self.world, self.master = rank, world, rank == 0
        self.accum = c["gradient_accumulation_steps"] // world  # micro-batches per process per step
        # training batches: one generator, the same on every process, drawing all micro-batches of a
        # step; each process takes its slice. A DDP run sees exactly the batches of a 1-process run.
        self.batches = torch.Generator().manual_seed(c["seed"])
        self.model_args = {k: getattr(raw_model.config, k) for k in GPTConfig.__dataclass_fields__}
        self.vocab = self.meta["vocab_size"] if self.meta else raw_model.config.vocab_size  # ids must fit
        self.trainable, self.total = count_params(raw_model)
        self.ckpt_file = os.path.join(c["out_dir"], "ckpt.pt")
        self.best_val_loss, self.saved_iter, self.skipped, self.last, self.wandb = 1e9, None, 0, {}, None

    def open(self, held, resume_at, tokens_per_iter):
        """Process 0, holding the folder's lock: an earlier run's files removed (`held`: --overwrite=True
        was given), a resume's later metrics rows dropped, the run described, wandb started."""
        if not self.master:
            return
        c, info = self.c, self.info
        remove_run_files(c["out_dir"], held)
        if resume_at is not None:
            trim_metrics(c["out_dir"], resume_at)
        print(f"model {self.model_type} {self.model_args}")
        print(
            f"adapter {info['kind']}: {len(info['targets'])} layers adapted; trainable {self.trainable:,} of "
            f"{self.total:,} parameters ({100 * self.trainable / self.total:.3f}%)"
        )
        print(
            f"{self.world} process(es), {self.accum} micro-batch(es) each; {tokens_per_iter:,} tokens per iteration"
        )
        if c["wandb_log"]:
            import wandb

            wandb.init(project=c["wandb_project"], name=c["wandb_run_name"], config=dict(c), resume="allow")
            self.wandb = wandb

    def step(self, it):
        """One optimizer step over this process's micro-batches: (summed task loss, the family's last
        extra-loss term or None, whether the step was taken)."""
        c, model, raw_model, accum, scaler = self.c, self.model, self.raw_model, self.accum, self.scaler
        lo, hi = self.provenance["range"]  # the part of train.bin this run trains on
        ix = lo + torch.randint(
            hi - lo - c["block_size"],
            (c["gradient_accumulation_steps"], c["batch_size"]),
            generator=self.batches,
        )
        loss_sum, extra = torch.zeros((), device=self.device), None
        for micro_step in range(accum):
            X, Y = get_batch(
                self.data_dir,
                "train",
                ix[self.rank * accum + micro_step],
                c["block_size"],
                self.device,
                self.vocab,
            )
            if self.world > 1:  # all-reduce gradients only at the last micro-step
                model.require_backward_grad_sync = micro_step == accum - 1
            with self.autocast:
                _, loss = model(X, Y)
            extra = self.family.extra_loss(
                raw_model
            )  # the family's regulariser: 1/accum of it per micro-step
            scaler.scale((loss if extra is None else loss + extra) / accum).backward()
            loss_sum += loss.detach().float()
        for opt, _ in self.optimizers:
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
            for opt, _ in self.optimizers:
                scaler.step(opt)
            self.family.after_step(raw_model, it)
        else:
            self.skipped += 1
            if self.master:
                print(f"iter {it}: non-finite gradient, step skipped ({self.skipped} so far)")
        scaler.update()
        for opt, _ in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return loss_sum, extra

    def mean_loss(self, loss_sum, it):
        """The step's mean loss over every micro-batch of every process (a sync point); a non-finite
        one stops the run (nonfinite='stop')."""
        if self.world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        lossf = loss_sum.item() / self.accum
        if not math.isfinite(lossf) and self.c["nonfinite"] == "stop":
            self.diverged(f"the training loss became {lossf}", it)
        return lossf

    def save(self, it, row):
        """The adapter file first: the checkpoint, written last, is what a resume takes."""
        c, common = self.c, dict(format=FORMAT, model_type=self.model_type, model_args=self.model_args)
        if self.info["targets"]:
            state = adapter_state_dict(self.raw_model)
            blob = dict(
                common, adapter=self.info, base=c["init_from"], seed=c["seed"], iter_num=it, state=state
            )
            save_adapter_file(blob, os.path.join(c["out_dir"], "adapter.safetensors"))
        states = [opt.state_dict() for opt, _ in self.optimizers]
        rng = {"torch": torch.get_rng_state(), "batches": self.batches.get_state()}
        ckpt = dict(
            common, model=self.raw_model.state_dict(), optimizer=states[0], extra_optimizers=states[1:]
        )
        ckpt.update(iter_num=it, best_val_loss=self.best_val_loss, config=dict(c), adapter=self.info)
        ckpt.update(family=self.family.state_dict(), meta=self.meta, eval_row=row, rng=rng)
        ckpt.update(provenance=self.provenance)
        save_checkpoint(ckpt, self.ckpt_file)
        self.saved_iter = it
        print(f"saved {self.ckpt_file}")

    def log(self, row):
        with open(os.path.join(self.c["out_dir"], "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb:
            self.wandb.log(row, step=row["iter"])
        self.last = row

    def diverged(self, what, at):
        kept = (
            f"{self.ckpt_file} still holds iteration {self.saved_iter}"
            if self.saved_iter is not None
            else "no checkpoint was written"
        )
        raise Diverged(
            f"{what} at iteration {at}: stopped, and {kept}; lower --learning_rate (now "
            f"{self.c['learning_rate']:g}) or pass --nonfinite=skip to skip non-finite steps"
        )

    def evaluate(self, it, lr, first):
        """Train and val loss; process 0 returns the eval row and saves the checkpoint."""
        c, say = self.c, print if self.master else None
        if first and self.master:  # the first eval can take a while on a CPU: say what runs
            print(
                f"step {it}: evaluating {c['eval_iters']} batches of {c['batch_size']} x {c['block_size']} "
                "tokens per split (train, val)",
                flush=True,
            )
        losses = estimate_loss(
            self.model,
            c,
            (self.data_dir, self.vocab, self.provenance["range"]),
            self.device,
            self.autocast,
            self.rank,
            self.world,
            say,
        )
        if not all(map(math.isfinite, losses.values())):  # the same numbers on every process
            self.diverged(f"the eval loss became {losses}", it)
        if not self.master:
            return None
        print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        row = dict(iter=it, train_loss=None, val_loss=losses["val"], eval_train_loss=losses["train"], lr=lr)
        row.update(tokens_per_s=None, trainable_params=self.trainable, total_params=self.total)
        row.update(self.family.stats(self.raw_model))
        improved = losses["val"] < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        if it > 0 and (improved or c["always_save_checkpoint"]) and not c["eval_only"]:
            self.save(it, row)
        return row

    def report(self, it, lr, lossf, extra, dt, row, clock, tokens_per_iter):
        """The log line of iteration `it` and its metrics row (joined to the eval row of the same
        iteration, if any)."""
        c, accum = self.c, self.c["gradient_accumulation_steps"] // self.world
        eta = clock.eta(c["max_iters"] - it, dt)
        mfu = (
            self.raw_model.estimate_mfu(c["batch_size"] * accum, dt)
            if self.device.startswith("cuda")
            else None
        )
        print(
            f"iter {it}/{c['max_iters']}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f}ms, "
            f"{tokens_per_iter / dt:,.0f} tok/s" + (f", mfu {100 * mfu:.1f}%" if mfu else "") + f", eta {eta}"
        )
        stats = self.family.stats(self.raw_model)
        if extra is not None:
            stats.update(task_loss=lossf, extra_loss=extra.item(), total_loss=lossf + extra.item())
        if stats:
            brief = ", ".join(f"{k} {_brief(v)}" for k, v in stats.items() if k != "task_loss")
            print(f"  {self.info['kind']}: {brief}")
        row = dict(row or {}, iter=it, train_loss=lossf, lr=lr, tokens_per_s=tokens_per_iter / dt)
        row.update(trainable_params=self.trainable, total_params=self.total, **stats)
        row.setdefault("val_loss", None)
        self.log(row)


def train(argv=(), environ=None):
    """Run training; returns the final {'iter', 'train_loss', 'val_loss', ...} metrics of rank 0."""
    # distributed set-up: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    c, given, resumed, base = resolve_config(argv, environ, world)
    device = c["device"]
    if ddp:
        if device.startswith("cuda"):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend=c["backend"] or ("nccl" if device.startswith("cuda") else "gloo"))
    try:
        last = _train(c, resumed, base, device, ddp, rank, world)
        if ddp:  # rank 0 still writes plots and pruned adapters: tear down together (gloo aborts otherwise)
            dist.barrier()
        return last
    finally:
        if ddp:
            dist.destroy_process_group()


def precision(c, device):
    """(device type, autocast context, gradient scaler) for the run's dtype on `device`."""
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[c["dtype"]]
    fp32 = ptdtype == torch.float32  # bfloat16 autocasts on the CPU too
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = nullcontext() if fp32 else torch.autocast(device_type, ptdtype)
    return device_type, autocast, torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)


def init_batches(c, data_dir, data_range, vocab, device):
    """Training batches for a family's init (Family.init_from_data), from their own generator (seed + 2),
    so the training batches come in the same order with or without it."""
    gen, (lo, hi) = torch.Generator().manual_seed(c["seed"] + 2), data_range
    while True:
        ix = lo + torch.randint(hi - lo - c["block_size"], (c["batch_size"],), generator=gen)
        yield get_batch(data_dir, "train", ix, c["block_size"], device, vocab)


def held_files(c, resuming):
    """The files of an earlier run in out_dir (to replace, with --overwrite=True); refused otherwise. A
    resume's metrics rows are read, so a damaged file is refused before any work."""
    held = run_files(c["out_dir"])
    if resuming and "metrics.jsonl" in held:
        read_metrics(c["out_dir"])
    if not resuming and not c["overwrite"] and held:
        raise ConfigError(
            f"{c['out_dir']!r} already holds a run ({', '.join(held)}); continue it with --init_from=resume, "
            "choose another --out_dir, or pass --overwrite=True to replace it"
        )
    return [] if resuming else held


def _train(c, resumed, base, device, ddp, rank, world):
    master, resuming = rank == 0, resumed is not None
    say = print if master else (lambda *a, **k: None)
    device_type, autocast, scaler = precision(c, device)
    data_dir, meta, data_range = open_data(c)
    held_files(c, resuming)  # every process refuses alike, before any work; process 0 again under the lock

    # the model: every process builds the same one (same seed), DDP then checks they agree
    torch.manual_seed(c["seed"])
    model, model_type, info, family = start_model(c, meta, resumed, base, say)
    if meta is None:
        check_token_ids(data_dir, model.config.vocab_size)
    # the folder locked once every refusal is out of the way, and checked again under the lock
    lock = lock_run_folder(c["out_dir"], "python train.py " + " ".join(sys.argv[1:])) if master else None
    held = held_files(c, resuming)
    tokens_per_iter = c["gradient_accumulation_steps"] * c["batch_size"] * c["block_size"]
    model.to(device)
    flops, rate = model.flops_per_token() * tokens_per_iter, 3e14 if device_type == "cuda" else 1e11
    if flops / rate > 60:  # FLOP/s an H100 in bf16 / 2 CPU cores reach here (bench.py)
        say(
            f"note: one iteration is about {flops / 1e12:,.0f} TFLOP, roughly {format_eta(flops / rate)} per "
            f"iteration on this {device_type}; lower --block_size ({c['block_size']}) or --batch_size for a quick run"
        )
    if not resuming:  # a family whose init reads training data (LoRA-GA), the same on every process
        vocab = meta["vocab_size"] if meta else model.config.vocab_size
        family.init_from_data(model, init_batches(c, data_dir, data_range, vocab, device))
    torch.manual_seed(c["seed"] + rank)  # dropout differs per process; the data does not
    optimizers = family.optimizers(
        model, c["learning_rate"], (c["beta1"], c["beta2"]), c["weight_decay"], device_type
    )
    run = Run(c, model, family, info, optimizers, (data_dir, meta), device, (autocast, scaler), rank, world)
    run.provenance = data_provenance(c, data_dir, data_range, base, resumed, digest=master)
    run.model_type, iter_num, resume_row = model_type, 0, None
    if resuming:
        iter_num, run.best_val_loss, resume_row = restore_training(
            resumed, c["out_dir"], optimizers, family, run.batches, master, say
        )
        run.saved_iter = iter_num
    resumed = None  # free memory
    if c["compile"]:
        run.model = torch.compile(run.model, mode=c["compile_mode"])
    if ddp:
        run.model = DDP(run.model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)
    run.open(held, iter_num if resuming and not c["eval_only"] else None, tokens_per_iter)

    run.model.train()
    start_iter, clock = iter_num, Clock()
    while True:
        lr = get_lr(iter_num, c)
        for opt, peak in optimizers:  # every optimizer follows the same schedule, scaled to its peak
            for group in opt.param_groups:
                group["lr"] = lr * peak / c["learning_rate"]
        if not c["eval_only"]:
            family.before_step(model, iter_num)
        first_of_resume = resuming and iter_num == start_iter  # that eval was done before the checkpoint
        row = resume_row if first_of_resume else None  # its row joins this iteration's, as uninterrupted
        at_eval = iter_num % c["eval_interval"] == 0 or iter_num == c["max_iters"]
        evaluate = c["eval_only"] or at_eval and not first_of_resume
        if evaluate:
            with clock.paused():
                row = run.evaluate(iter_num, lr, first=iter_num == start_iter)
        if c["eval_only"] or iter_num >= c["max_iters"]:
            if row and master:
                if iter_num > start_iter:
                    row["mean_tokens_per_s"] = (
                        (iter_num - start_iter) * tokens_per_iter / clock.training_seconds()
                    )
                run.log(dict(row, peak_mem_mb=peak_memory_mb(device)))
            break
        t0 = time.time()
        loss_sum, extra = run.step(iter_num)
        if iter_num % c["log_interval"] == 0 or evaluate:  # the same on every process
            lossf = run.mean_loss(loss_sum, iter_num)
            dt = time.time() - t0
            clock.lap(dt, first=iter_num == start_iter)
            if master:
                run.report(iter_num, lr, lossf, extra, dt, row, clock, tokens_per_iter)
        iter_num += 1

    if master:
        iters, seconds = iter_num - start_iter, time.time() - clock.start
        finish_run(
            c, model, family, info, model_type, run.model_args, run.last, iters, seconds, run.best_val_loss
        )
    if run.wandb:
        run.wandb.finish()
    if lock:
        lock.close()
    return run.last


def main():
    cli(
        train, sys.argv[1:]
    )  # a mistake ends in one line (once under torchrun); LOWRANK_DEBUG=1 for the traceback


if __name__ == "__main__":
    main()
