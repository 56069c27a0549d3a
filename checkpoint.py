"""
Checkpoints: one nanoGPT-style dict, written atomically, read with weights_only=True, and turned
back into a model with its adapters. train.py writes them; sample.py (and every later reader)
calls load_checkpoint + build_model.

    {"format": FORMAT, "model": state_dict, "optimizer": state_dict, "model_type": "gpt",
     "model_args": {...}, "iter_num": int, "best_val_loss": float, "config": {...},
     "adapter": {"kind": "lora", "targets": [...], "settings": {...}, "train_embeddings": False},
     "family": the family's own state (AdaLoRA: its allocator), "rng": {"torch": ..., "batches": ...}}

The adapter-only file (adapter.safetensors, adapter_pruned.safetensors) is safetensors, no pickle:
its tensors are adapters.adapter_state_dict, and its header's metadata holds, as JSON under
"lowrank", the settings that rebuild the layers: "format", "adapter", "model_type", "model_args",
"base" (where the frozen weights came from), "seed" and "iter_num" (the iteration it holds: the
checkpoint, saved after it, holds the same one unless a save was interrupted). Older adapter.pt files (the same dict, with
the tensors under "state", torch-saved) still load.

    blob = read_adapter_file("out-shakespeare-lora/adapter.safetensors")   # {"adapter": ..., "state": ...}
    model = load_adapter(base_model, "out-shakespeare-lora/adapter.safetensors")
"""

import json
import os
import re
import shutil

import torch

from adapters import (
    FAMILIES,
    NO_ADAPTER,
    adapter_layers,
    family_of,
    load_adapter_state_dict,
    merge_adapters,
)
from configurator import ConfigError
from files import atomic_write, file_sha256, lock_folder
from model import GPT, MODELS, GPTConfig, gpt2_config_args, is_gpt2_folder
from prepare import check_vocabulary, read_meta

FORMAT = "lowrank-gpt/1"
AUTO_BASES = ("out-shakespeare-char", "out-demo-base")  # where the pretraining config and `make demo` write
MODEL_SETTINGS = ("dropout",)  # how a base computes, not its shape: a fine-tune inherits them unless set
# adapter-only files a run folder may hold (the .pt names: older runs)
ADAPTER_FILES = ("adapter.safetensors", "adapter_pruned.safetensors", "adapter.pt", "adapter_pruned.pt")
# what a run folder may hold besides them: a folder holding any of these holds a run
RUN_FILES = (
    "ckpt.pt",
    "metrics.jsonl",
    *ADAPTER_FILES,
    "loss.png",
    "loss_comparison.png",
    "effective_rank.png",
    "rank_allocation.png",
    "bounds.json",
    "bound_parts.png",
    "bound_vs_alpha.png",
    "summary.md",
    "peft",
)


class CheckpointError(ValueError):
    """A missing, corrupt or foreign checkpoint; the message names the file and what is wrong."""


def save_checkpoint(ckpt, path):
    """torch.save, atomically (files.atomic_write)."""

    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)

    atomic_write(path, write)


def checkpoint_path(path):
    """A checkpoint file, or an out_dir holding ckpt.pt."""
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


def load_checkpoint(path, map_location="cpu"):
    path = checkpoint_path(path)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"no checkpoint at {path}; train one first (python train.py ...) or fix the path"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path} is not a readable checkpoint (corrupt, truncated or not a torch file): "
            f"{type(e).__name__}: {first_line}"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        keys = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not a checkpoint of this repo or nanoGPT (found {keys}; expected "
            "'model' and 'model_args')"
        )
    if "format" not in ckpt:  # a nanoGPT checkpoint: plain GPT, maybe saved from a compiled model
        ckpt["model"] = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
        ckpt.setdefault("model_type", "gpt")
    elif ckpt["format"] != FORMAT:
        raise CheckpointError(f"{path} has format {ckpt['format']!r}; this code reads {FORMAT!r}")
    ckpt.setdefault("adapter", dict(NO_ADAPTER))
    kind = ckpt["adapter"]["kind"]
    if kind not in FAMILIES:
        plugins = ckpt.get("config", {}).get("plugins") or "YOUR_MODULE"
        raise CheckpointError(
            f"{path} was trained with adapter {kind!r}, which no loaded module registers: pass "
            f"--plugins={plugins} (the module that registers it)"
        )
    bad = [k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # named for what they are: a diverged adapter is not a broken base
        targets = tuple(t + "." for t in ckpt["adapter"].get("targets", []))
        adapter = all(k.startswith(targets) and ".base." not in k for k in bad)
        raise CheckpointError(
            f"{path} holds nan or inf in {'its adapter' if adapter else 'its model'} ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}): the run diverged; use an earlier checkpoint or train again "
            "with a lower learning rate"
        )
    return ckpt


def build_model(ckpt, load_weights=True):
    """The model a checkpoint describes, adapters injected, weights loaded (on the CPU)."""
    model_type = ckpt.get("model_type", "gpt")
    if model_type not in MODELS:
        raise CheckpointError(f"checkpoint model_type {model_type!r} is unknown; known: {sorted(MODELS)}")
    args, state = dict(ckpt["model_args"]), ckpt["model"]
    head = state.get("lm_head.weight", state.get("lm_head.base.weight"))
    if (
        "transformer.wte.weight" in state
        and head is not None
        and not torch.equal(head, state["transformer.wte.weight"])
    ):
        args["tie_word_embeddings"] = (
            False  # a merged head adapter untied them (older checkpoints do not say so)
        )
    model = MODELS[model_type](GPTConfig(**args))
    model = inject_from_info(model, ckpt["adapter"])
    if load_weights:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(
                f"checkpoint weights do not fit the model it describes: {str(e)[:300]}"
            ) from None
    return model


def run_base(ckpt, meta=None):
    """The base a run started from, as train.py loaded it (before the cut to block_size and the
    adapters): rebuilt from the seed, or loaded from what init_from names. Seeds torch as train.py did."""
    c = {
        **ckpt["model_args"],
        "model_type": ckpt.get("model_type", "gpt"),
        "data_dir": "",
        "dataset": "",
        "seed": 1337,
        **ckpt["config"],
    }  # an imported adapter's config names little more than its base
    torch.manual_seed(c["seed"])
    try:
        return load_base(c, meta, base_checkpoint(c), check=False)[0]
    except Exception as e:  # a base moved, deleted or not downloadable here: one line
        raise CheckpointError(
            f"the base this run names ({c.get('init_from')!r}) cannot be rebuilt: "
            f"{type(e).__name__}: {str(e)[:200]}"
        ) from None


def initial_model(ckpt, meta):
    """The model a run started from, before its first step, as train.py built it: its base (run_base)
    cut to the run's block_size, with the adapters its entry describes initialised from the same random
    stream. A bound's receiver holds this before the message arrives (eval_bounds.py checks that the
    two give the scored model)."""
    model = run_base(ckpt, meta)
    if ckpt["model_args"]["block_size"] < model.config.block_size:
        model.crop_block_size(ckpt["model_args"]["block_size"])
    return inject_from_info(model, ckpt["adapter"])


def inject_from_info(model, info):
    """Inject the adapters a checkpoint's `adapter` entry describes (through its family's rebuild).
    Returns the model (SubLoRA wraps it)."""
    return family_of(info["kind"]).rebuild(model, info)


def base_from_seed(blob):
    """The frozen base of a run trained from scratch, rebuilt from its seed (SubLoRA's random base)."""
    if blob.get("base") != "scratch":
        raise CheckpointError(
            f"this adapter's base is {blob.get('base')!r}, not a seeded random init: load that base"
        )
    torch.manual_seed(blob["seed"])
    return MODELS[blob["model_type"]](GPTConfig(**blob["model_args"]))


def save_adapter_file(blob, path):
    """blob: {"format", "adapter", "model_type", "model_args", "base", "seed", "state": {name: tensor}}
    -> one safetensors file, the tensors as they are and everything else as JSON in its header."""
    from safetensors.torch import save

    settings = {k: v for k, v in blob.items() if k != "state"}
    tensors = {k: v.detach().contiguous() for k, v in blob["state"].items()}
    data = save(tensors, metadata={"format": "pt", "lowrank": json.dumps(settings)})
    atomic_write(path, data)


def read_adapter_file(path):
    """An adapter file as a dict with its tensors under "state": adapter.safetensors, or an older
    torch-saved adapter.pt (read with weights_only=True)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                blob = json.loads((f.metadata() or {}).get("lowrank", "{}"))
                blob["state"] = {k: f.get_tensor(k) for k in f.keys()}
        else:
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable adapter file: {type(e).__name__}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or "state" not in blob:
        raise CheckpointError(
            f"{path} is not an adapter file of this repo (no 'format'/'state'); a PEFT adapter "
            "folder is imported with python hf.py --import_from=DIR"
        )
    return blob


def adapter_file_note(out_dir, iter_num):
    """A line when out_dir/adapter.safetensors holds another iteration than the checkpoint (a save
    killed between the two files), else None."""
    path = os.path.join(out_dir, "adapter.safetensors")
    held = read_adapter_file(path).get("iter_num") if os.path.isfile(path) else None
    if held is None or held == iter_num:
        return None
    return (
        f"note: {path} holds iteration {held} but ckpt.pt iteration {iter_num} (a save was interrupted between "
        "the two): the run resumes from ckpt.pt and rewrites the adapter file at its next save"
    )


def load_adapter(model, path):
    """Load an adapter file (adapter.safetensors, adapter_pruned.safetensors, or an older .pt) into its
    base model: the adapters it describes are injected first unless the model has them already.
    Returns the model with adapters (a new SubLoRA wrapper for SubLoRA files)."""
    blob = read_adapter_file(path)
    if not adapter_layers(model):
        model = inject_from_info(model, blob["adapter"])
    load_adapter_state_dict(model, blob["state"])
    return model


def resume_settings(c, ckpt, given, shaping, session):
    """What a resumed run takes from its checkpoint, so that it continues the recipe it was trained
    with: ({key: the checkpoint's value}, notes). Every key but the `session` ones (where and how this
    process runs) comes back from the checkpoint, unless the command line or the environment (`given`)
    sets it: then a note names the change, and a key of `shaping` (the model and its adapter) is refused
    in one line, so the config saved again describes what was trained."""
    saved = dict(ckpt.get("config", {}), **ckpt["model_args"], model_type=ckpt.get("model_type", "gpt"))
    user = {k: where for k, where in given.items() if where == "command line" or where.isupper()}
    differ = [k for k in c if k in saved and k not in session and c[k] != saved[k]]
    refused = [k for k in differ if k in shaping and k in user]
    if refused:
        asked = ", ".join(f"{k}={c[k]!r} ({user[k]})" for k in refused)
        has = ", ".join(f"{k}={saved[k]!r}" for k in refused)
        flags = [f"--{k}" for k in refused if user[k] == "command line"]
        fixes = ([f"drop {', '.join(flags)}"] if flags else []) + [
            f"unset {user[k]}" for k in refused if user[k] != "command line"
        ]
        raise CheckpointError(
            f"{asked} but the checkpoint being resumed has {has}: a resumed run keeps its model; "
            f"{', '.join(fixes)}, or start a new run in another --out_dir"
        )
    changed = [k for k in differ if k in user]
    kept = {k: saved[k] for k in differ if k not in user}
    notes = []
    if changed:
        notes.append(
            "note: this resume changes "
            + ", ".join(f"{k} {saved[k]!r} -> {c[k]!r} ({user[k]})" for k in changed)
            + "; the rest of the recipe is the checkpoint's"
        )
    from_files = [k for k in kept if k in given]
    if from_files:
        notes.append(
            "note: resumed with the checkpoint's "
            + ", ".join(f"{k}={saved[k]!r} (not {c[k]!r} from {given[k]})" for k in from_files)
            + "; set them on the command line to change them"
        )
    return kept, notes


def load_resumed(c):
    """out_dir/ckpt.pt of the run --init_from=resume continues, checked: it holds training state."""
    ckpt = load_checkpoint(os.path.join(c["out_dir"], "ckpt.pt"))
    if "optimizer" not in ckpt:
        raise CheckpointError(
            f"{c['out_dir']}/ckpt.pt holds no training state (an imported adapter): fine-tune on "
            f"top of it with --init_from={c['out_dir']} and another --out_dir"
        )
    return ckpt


def data_provenance(c, data_dir, data_range, base, resumed, digest=True):
    """What a run trains on, as its checkpoints record it: the token file (path and SHA-256; digest=False
    skips reading it, for processes that do not save), the token range [lo, hi) its batches come from,
    and the provenance of the base it started from: 'scratch' for a seeded random init, the base run's
    own record, or 'unrecorded: NAME' (GPT-2, a checkpoint from before runs recorded their data). A
    resume keeps its checkpoint's."""
    if resumed is not None and "provenance" in resumed:
        return resumed["provenance"]
    if resumed is not None:
        prior = f"unrecorded: {c['init_from']} (resumed from a checkpoint that records none)"
    elif c["init_from"] == "scratch":
        prior = "scratch"
    else:
        prior = (base or {}).get("provenance") or f"unrecorded: {c['init_from']}"
    path = os.path.join(data_dir, "train.bin")
    return dict(
        data_dir=os.path.abspath(data_dir),
        train_sha256=file_sha256(path) if digest else None,
        range=list(data_range),
        base=prior,
    )


def base_checkpoint(c):
    """The checkpoint of the run init_from names (its model, adapters merged, becomes the frozen base),
    or None when init_from is a new model ('scratch') or GPT-2 (a hub name or folder)."""
    source = c["init_from"]
    if source == "scratch" or source.startswith("gpt2") or is_gpt2_folder(source):
        return None
    if not os.path.exists(source):
        raise ConfigError(
            f"init_from {source!r} is not 'scratch', 'resume', a gpt2 name, nor an existing path"
        )
    return load_checkpoint(source)


def base_args(c, base):
    """The model arguments (block_size, dropout, ...) of the model init_from names, without building it
    (base: its checkpoint, from base_checkpoint); None for a new model."""
    if base is not None:
        return base["model_args"]
    if c["init_from"] == "scratch":
        return None
    return gpt2_config_args(c["init_from"])


def run_files(out_dir):
    """The RUN_FILES out_dir holds: a folder holding any holds a run."""
    return [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]


def remove_run_files(out_dir, names):
    """An earlier run's files removed (--overwrite=True), under the folder's lock."""
    for f in names:
        path = os.path.join(out_dir, f)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def lock_run_folder(out_dir, what):
    """The run folder (made if new) locked to this process before anything in it is changed, and the
    temp files of saves killed before their rename (files.atomic_write names them FILE.tmp.PID) removed,
    with a note: never valid, and no other process is writing one now. Returns the lock (close it to
    release); the caller checks run_files under it."""
    os.makedirs(out_dir, exist_ok=True)
    lock = lock_folder(out_dir, what)
    stale = [
        os.path.join(out_dir, f)
        for f in os.listdir(out_dir)
        if re.search(r"\.(pt|safetensors)\.tmp\.\d+$", f)
    ]
    if stale:
        size = sum(os.path.getsize(f) for f in stale)
        for f in stale:
            os.remove(f)
        print(
            f"note: removed {len(stale)} temp file(s) ({size / 2**20:.1f} MB) left in {out_dir} by interrupted saves"
        )
    return lock


def load_base(c, meta, base, check=True):
    """The model before any new adapter, from the resolved config: from scratch, GPT-2, or another run's
    checkpoint (`base`, from base_checkpoint), whose own adapters, if any, are merged first: its weights
    become the frozen base, computing with c's MODEL_SETTINGS. check=False skips the vocabulary check (a
    run already checked against its data)."""
    source = c["init_from"]
    if source == "scratch":
        vocab = meta["vocab_size"] if meta else 50304
        args = dict(
            n_layer=c["n_layer"],
            n_head=c["n_head"],
            n_embd=c["n_embd"],
            block_size=c["block_size"],
            bias=c["bias"],
            vocab_size=vocab,
            dropout=c["dropout"],
        )
        return MODELS[c["model_type"]](GPTConfig(**args)), c["model_type"]
    data_dir = c["data_dir"] or os.path.join("data", c["dataset"])
    if base is None:  # a hub name or a local GPT-2 folder
        if check:
            check_vocabulary({"tokenizer": "gpt2"}, meta, source, data_dir)
        return GPT.from_pretrained(source, dict(dropout=c["dropout"])), "gpt"
    cfg = base.get("config", {})
    base_data = cfg.get("data_dir") or os.path.join("data", cfg.get("dataset", ""))
    if check:
        check_vocabulary(base.get("meta") or (read_meta(base_data) if cfg else None), meta, source, data_dir)
    args = dict(base["model_args"], **{k: c[k] for k in MODEL_SETTINGS})
    model = merge_adapters(build_model(dict(base, model_args=args)))
    model.config.tie_word_embeddings = model.head_is_tied()  # what the checkpoints of the new run record
    return model, base["model_type"]


def start_model(c, meta, resumed, base, say):
    """train.py's model from the resolved config: (model, model_type, the checkpoint's adapter entry, the
    family). A resume rebuilds its checkpoint (`resumed`); a new run loads its base (load_base), cuts it
    to block_size and lets the family inject fresh adapters."""
    data_dir = c["data_dir"] or os.path.join("data", c["dataset"])
    family = family_of(c["adapter"])(c, say)
    if resumed is not None:
        check_vocabulary(resumed.get("meta"), meta, c["out_dir"], data_dir)
        return build_model(resumed), resumed["model_type"], resumed["adapter"], family
    model, model_type = load_base(c, meta, base)
    if meta and meta["vocab_size"] > model.config.vocab_size:
        raise ConfigError(
            f"dataset {data_dir!r} has {meta['vocab_size']} tokens but the model only "
            f"{model.config.vocab_size}: use a dataset with this model's tokenizer"
        )
    if c["block_size"] < model.config.block_size:
        model.crop_block_size(c["block_size"])
    model, info = family.inject(model)
    return model, model_type, info, family


def restore_training(ckpt, out_dir, optimizers, family, batches, master, say):
    """A resume's training state put back: the optimizers, the family's own state, the batch generator
    and (process 0) torch's random state. Returns (iter_num, best_val_loss, the eval row it saved)."""
    for (opt, _), state in zip(optimizers, [ckpt["optimizer"], *ckpt.get("extra_optimizers", [])]):
        opt.load_state_dict(state)
    family.load_state_dict(ckpt.get("family", ckpt))  # older checkpoints kept the family's state at the top
    note = adapter_file_note(out_dir, ckpt["iter_num"])
    if note:
        say(note)
    batches.set_state(ckpt["rng"]["batches"])
    if master:
        torch.set_rng_state(ckpt["rng"]["torch"])
    return ckpt["iter_num"], ckpt["best_val_loss"], ckpt.get("eval_row")


def auto_base(c):
    """What init_from='auto' means for this config: a new model ('scratch') for pretraining, for a family
    whose setting is a random base (SubLoRA) and in TEST_MODE; for any other adapter, the first trained
    base of AUTO_BASES, else one line saying what to run first."""
    if FAMILIES[c["adapter"]].scratch_base or c["test_mode"]:
        return "scratch"
    for base in AUTO_BASES:
        if os.path.isfile(os.path.join(base, "ckpt.pt")):
            return base
    raise ConfigError(
        f"adapter={c['adapter']} needs a trained base and none is in {' or '.join(AUTO_BASES)}: run `make demo` "
        "or `python train.py config/train_shakespeare_char.py` first, or pass --init_from=PATH "
        "(--init_from=scratch trains it on a random frozen base)"
    )
