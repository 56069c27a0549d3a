"""
Checkpoints: one nanoGPT-style dict, written atomically, read with weights_only=True, and turned
back into a model with its adapters. train.py writes them; sample.py (and every later reader)
calls load_checkpoint + build_model.

    {"format": FORMAT, "model": state_dict, "optimizer": state_dict, "model_type": "gpt",
     "model_args": {...}, "iter_num": int, "best_val_loss": float, "config": {...},
     "adapter": {"kind": "lora", "targets": [...], "settings": {...}, "train_embeddings": False},
     "rng": {"torch": ByteTensor, "batches": ByteTensor}}

The adapter-only file (adapter.safetensors, adapter_pruned.safetensors) is safetensors, no pickle:
its tensors are adapters.adapter_state_dict, and its header's metadata holds, as JSON under
"lowrank", the settings that rebuild the layers: "format", "adapter", "model_type", "model_args",
"base" (where the frozen weights came from) and "seed". Older adapter.pt files (the same dict, with
the tensors under "state", torch-saved) still load.

    blob = read_adapter_file("out-shakespeare-lora/adapter.safetensors")   # {"adapter": ..., "state": ...}
    model = load_adapter(base_model, "out-shakespeare-lora/adapter.safetensors")
"""

import json
import os

import torch

from adapters import SubLoRA, adapter_layers, inject_adapters, load_adapter_state_dict
from model import MODELS, GPTConfig

FORMAT = "lowrank-gpt/1"
# adapter-only files a run folder may hold (the .pt names: older runs)
ADAPTER_FILES = ("adapter.safetensors", "adapter_pruned.safetensors", "adapter.pt", "adapter_pruned.pt")
NO_ADAPTER = {"kind": "none", "targets": [], "settings": {}, "train_embeddings": False}


class CheckpointError(ValueError):
    """A missing, corrupt or foreign checkpoint; the message names the file and what is wrong."""


def save_atomic(obj, path):
    """torch.save(obj) (bytes: written as they are) to a temp file beside `path`, fsync, then rename: a
    crash leaves the old file whole."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if isinstance(obj, bytes):
                f.write(obj)
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk, a quota, a vanished folder (torch wraps some as RuntimeError)
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
        kept = "the previous file is untouched" if os.path.exists(path) else "nothing was written"
        raise CheckpointError(f"could not write {path} ({reason}); {kept}: free space or choose another --out_dir, "
                              "then continue with --init_from=resume") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def checkpoint_path(path):
    """A checkpoint file, or an out_dir holding ckpt.pt."""
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


def load_checkpoint(path, map_location="cpu"):
    path = checkpoint_path(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}; train one first (python train.py ...) or fix the path")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt, truncated or not a torch file): "
                              f"{type(e).__name__}: {first_line}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        keys = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a checkpoint of this repo or nanoGPT (found {keys}; expected "
                              "'model' and 'model_args')")
    if "format" not in ckpt:  # a nanoGPT checkpoint: plain GPT, maybe saved from a compiled model
        ckpt["model"] = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
        ckpt.setdefault("model_type", "gpt")
    elif ckpt["format"] != FORMAT:
        raise CheckpointError(f"{path} has format {ckpt['format']!r}; this code reads {FORMAT!r}")
    ckpt.setdefault("adapter", dict(NO_ADAPTER))
    return ckpt


def build_model(ckpt, load_weights=True):
    """The model a checkpoint describes, adapters injected, weights loaded (on the CPU)."""
    model_type = ckpt.get("model_type", "gpt")
    if model_type not in MODELS:
        raise CheckpointError(f"checkpoint model_type {model_type!r} is unknown; known: {sorted(MODELS)}")
    model = MODELS[model_type](GPTConfig(**ckpt["model_args"]))
    model = inject_from_info(model, ckpt["adapter"])
    if load_weights:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint weights do not fit the model it describes: {str(e)[:300]}") from None
    return model


def inject_from_info(model, info):
    """Inject the adapters a checkpoint's `adapter` entry describes (nothing for kind 'none'). Returns
    the model: SubLoRA wraps it (LoRA inside a random subspace)."""
    if info["kind"] == "none":
        return model
    kind = "lora" if info["kind"] == "sublora" else info["kind"]
    inject_adapters(model, kind, targets=info["targets"], train_embeddings=info["train_embeddings"],
                    layers=info.get("layers"), **info["settings"])
    return SubLoRA(model, **info["sublora"]) if info["kind"] == "sublora" else model


def base_from_seed(blob):
    """The frozen base of a run trained from scratch, rebuilt from its seed (SubLoRA's random base)."""
    if blob.get("base") != "scratch":
        raise CheckpointError(f"this adapter's base is {blob.get('base')!r}, not a seeded random init: load that base")
    torch.manual_seed(blob["seed"])
    return MODELS[blob["model_type"]](GPTConfig(**blob["model_args"]))


def save_adapter_file(blob, path):
    """blob: {"format", "adapter", "model_type", "model_args", "base", "seed", "state": {name: tensor}}
    -> one safetensors file, the tensors as they are and everything else as JSON in its header."""
    from safetensors.torch import save

    settings = {k: v for k, v in blob.items() if k != "state"}
    tensors = {k: v.detach().contiguous() for k, v in blob["state"].items()}
    data = save(tensors, metadata={"format": "pt", "lowrank": json.dumps(settings)})
    save_atomic(data, path)


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
        raise CheckpointError(f"{path} is not an adapter file of this repo (no 'format'/'state'); a PEFT adapter "
                              "folder is imported with python hf.py --import_from=DIR")
    return blob


def load_adapter(model, path):
    """Load an adapter file (adapter.safetensors, adapter_pruned.safetensors, or an older .pt) into its
    base model: the adapters it describes are injected first unless the model has them already.
    Returns the model with adapters (a new SubLoRA wrapper for SubLoRA files)."""
    blob = read_adapter_file(path)
    if not adapter_layers(model):
        model = inject_from_info(model, blob["adapter"])
    load_adapter_state_dict(model, blob["state"])
    return model
