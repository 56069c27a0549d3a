"""
Hugging Face interop: any adapter trained here as a PEFT LoRA / DoRA adapter for transformers'
GPT2LMHeadModel (AdaLoRA also in PEFT's own AdaLoRA format), and a PEFT LoRA / DoRA / AdaLoRA adapter
for GPT-2 as a run folder here (sample, evaluate, bound it).

    python hf.py --out_dir=out-shakespeare-lora                          # -> out-shakespeare-lora/peft/ (+ base/)
    python hf.py --out_dir=out-gpt2-lora --export_dir=gpt2-lora-peft     # a GPT-2 fine-tune
    python hf.py --out_dir=out-adalora --peft_format=native              # PEFT's AdaLoraConfig, E and rank_pattern
    python hf.py --import_from=gpt2-lora-peft --out_dir=out-imported     # PEFT -> ckpt.pt + adapter.safetensors
    python sample.py --out_dir=out-imported

An export is PEFT's on-disk format (adapter_config.json + adapter_model.safetensors): lora_A (r, in)
and lora_B (out, r) per module, GPT-2's module names, fan_in_fan_out for its Conv1D layers. Every
family leaves as the LoRA (or DoRA) it computes, ΔW = s B' A: SoRA with its gates baked into B and
its zero-gated ranks dropped, AdaLoRA / AdaDoRA with B' = B diag(E) sliced to the ranks with E != 0,
Rotational PiSSA as its rank-2r LoRA P(θ) - P(θ₀), SubLoRA as the factors θ₀ + P w (q,v-only
factors as c_attn factors with zero rows for k). Ranks and scales that differ between layers go in
PEFT's rank_pattern / alpha_pattern. The base is written beside it as a GPT-2 folder, base/, with its
tokenizer files, when it was trained here (or trained embeddings), or when the adapter adapts the
head: the head is then untied from the embedding, so PEFT's merge_and_unload changes it alone. The
written base keeps every position of the base the run started from and the real vocabulary. A GPT-2
fine-tune otherwise names the hub model. Then, with transformers and peft installed:

    base = GPT2LMHeadModel.from_pretrained("out-shakespeare-lora/peft/base")
    model = PeftModel.from_pretrained(base, "out-shakespeare-lora/peft")
"""

import dataclasses
import json
import math
import os
import re
import sys
from collections import Counter

import torch

from adapters import (
    FAMILIES,
    AdapterError,
    adapter_layers,
    adapter_state_dict,
    family_for_peft,
    family_of,
    inject_adapters,
    load_adapter_state_dict,
    lora_model,
)
from checkpoint import (
    FORMAT,
    build_model,
    load_checkpoint,
    lock_run_folder,
    remove_run_files,
    run_base,
    run_files,
    save_adapter_file,
    save_checkpoint,
)
from configurator import ConfigError, cli, config_defaults, configure
from files import atomic_write, read_json, write_folder
from model import GPT, GPT2_SIZES, is_gpt2_folder
from prepare import check_vocabulary, read_meta, write_hf_tokenizer

out_dir = "out"  # export: the run to export; import: the run folder to write
export_dir = ""  # export: where the PEFT adapter goes ('' = out_dir/peft)
write_base = False  # export: write base/ even for a hub GPT-2 base (always for a base trained here)
peft_format = "lora"  # export: 'lora' (as the LoRA / DoRA it computes) | 'native' (PEFT's AdaLoRA)
import_from = ""  # import: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
base = ""  # import: the base, a gpt2 name or GPT-2 folder ('' = the adapter's); export: where a moved base is now
dataset = "openwebtext"  # import: data/<dataset>/ holds the data to score the imported run on
data_dir = ""  # import: that data folder itself ('' = data/<dataset>)
overwrite = False  # replace an existing export_dir / run folder
plugins = ""  # modules imported first (names or .py paths): the families a run was trained with
DEFAULTS = config_defaults(globals())

PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model
HUB = "openai-community/"  # the GPT-2 checkpoints' organisation on the hub


class InteropError(ValueError):
    """An adapter or folder that cannot cross to or from PEFT; the message says why and what to do."""


# -----------------------------------------------------------------------------
# export: every family as the LoRA / DoRA it computes


@torch.no_grad()
def lora_factors(model):
    """{module name: (A (r, in), B (out, r), s, magnitude or None)} with ΔW = s B A, for the adapters
    of `model` (not changed): every family as the plain LoRA it computes (adapters.lora_model), DoRA's
    magnitude kept."""
    if any(layer.merged for layer in adapter_layers(model).values()):
        raise InteropError(
            "the model's adapters are merged into their base weights; export the unmerged model"
        )
    try:
        view = lora_model(model)
    except AdapterError as e:
        raise InteropError(str(e)) from None
    out = {
        n: (
            layer.lora_A.clone(),
            layer.full_B().clone(),
            float(layer.scaling),
            None if layer.magnitude is None else layer.magnitude.clone(),
        )
        for n, layer in adapter_layers(view).items()
    }
    if not out:
        raise InteropError(
            "the run holds no adapter (adapter='none'), or every rank was pruned: export a "
            "fine-tuned run, or save a plain model with GPT.save_pretrained"
        )
    return out


def peft_config(factors, dropout, base_name_or_path):
    """PEFT's LoraConfig as a dict: the commonest rank and alpha = s r, the others as patterns keyed by
    the full module name (PEFT matches a key as a regex ending at a dot: the exact name matches only it)."""
    ranks = {n: A.shape[0] for n, (A, _, _, _) in factors.items()}
    alphas = {n: s * ranks[n] for n, (_, _, s, _) in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(factors),
        "fan_in_fan_out": True,
        "bias": "none",
        "use_rslora": False,
        "use_dora": any(m is not None for *_, m in factors.values()),
        "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha},
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def export_peft(factors, folder, base_name_or_path, dropout=0.0):
    """Write lora_factors(model) to `folder` in PEFT's format; returns the config written."""
    from safetensors.torch import save

    tensors = {}
    for name, (A, B, _, m) in factors.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B.contiguous()
        if m is not None:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = m.contiguous()
    config = peft_config(factors, dropout, base_name_or_path)
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, "adapter_model.safetensors"), save(tensors, metadata={"format": "pt"}))
    atomic_write(os.path.join(folder, "adapter_config.json"), json.dumps(config, indent=2))
    return config


def export_native(model, ckpt, folder, base_name, dropout, vocab):
    """The run in its family's own PEFT format (Family.peft_native); returns the config written."""
    from safetensors.torch import save

    info = ckpt["adapter"]
    try:
        fields, layers = family_of(info["kind"]).peft_native(model, info, ckpt.get("config", {}))
    except AdapterError as e:
        raise InteropError(str(e)) from None
    tensors = {
        f"{PREFIX}{name}.{part}": (t[:vocab] if name == "lm_head" and part == "lora_B" else t).contiguous()
        for name, parts in layers.items()
        for part, t in parts.items()
    }
    config = {
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "lora_dropout": dropout,
        "target_modules": sorted(layers),
        "fan_in_fan_out": True,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        **fields,
    }
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, "adapter_model.safetensors"), save(tensors, metadata={"format": "pt"}))
    atomic_write(os.path.join(folder, "adapter_config.json"), json.dumps(config, indent=2))
    return config


def hub_name(init_from):
    """The hub id of a GPT-2 name ('gpt2-medium' -> 'openai-community/gpt2-medium'), else None."""
    return HUB + init_from if init_from in GPT2_SIZES else None


def base_for_export(model, ckpt, vocab):
    """The run's frozen weights (the adapters' bases) as a plain GPT for base/: its head untied from the
    embedding when an adapter adapts it (PEFT then merges into the head alone), the position table of
    the base it started from in full (a fine-tune cut to block_size keeps the rest), the token rows cut
    to the real vocabulary (a padded nanoGPT vocabulary)."""
    plain = lora_model(model)
    tied = "lm_head" not in adapter_layers(plain) and plain.head_is_tied()
    start = run_base(ckpt) if ckpt.get("config", {}).get("init_from", "scratch") != "scratch" else plain
    positions = max(plain.config.block_size, start.config.block_size)
    config = dataclasses.replace(
        plain.config, tie_word_embeddings=tied, block_size=positions, vocab_size=vocab
    )
    base = GPT(config)
    state = {k.replace(".base.", "."): v for k, v in plain.state_dict().items()}
    state = {k: v for k, v in state.items() if k in base.state_dict()}
    state["lm_head.weight"] = state.get("lm_head.weight", state["transformer.wte.weight"])
    wpe = start.transformer.wpe.weight.detach()
    trained = ckpt["adapter"].get("train_embeddings")
    if not trained and not torch.equal(wpe[: plain.config.block_size], plain.transformer.wpe.weight.detach()):
        raise InteropError(
            f"the base at {ckpt['config']['init_from']!r} is not the one this run started from (its position "
            "table differs): pass --base=WHERE_IT_IS_NOW"
        )
    state["transformer.wpe.weight"] = torch.cat(
        [state["transformer.wpe.weight"], wpe[plain.config.block_size :]]
    )
    for k in ("transformer.wte.weight", "lm_head.weight"):
        state[k] = state[k][:vocab]
    base.load_state_dict(state, strict=True)
    return base


def export_run(c):
    ckpt = load_checkpoint(c["out_dir"])
    info, cfg = ckpt["adapter"], ckpt.get("config", {})
    if ckpt.get("model_type", "gpt") != "gpt":
        raise InteropError(
            f"{c['out_dir']} is a {ckpt['model_type']!r} model; only the GPT has GPT-2's layout"
        )
    folder = c["export_dir"] or os.path.join(c["out_dir"], "peft")
    if os.path.isdir(folder) and os.listdir(folder) and not c["overwrite"]:
        raise ConfigError(f"{folder!r} is not empty: choose another --export_dir or pass --overwrite=True")
    if c["base"]:  # the run's base, moved since training
        ckpt["config"] = cfg = dict(cfg, init_from=c["base"])
    meta = ckpt.get("meta") or read_meta(cfg.get("data_dir") or os.path.join("data", cfg.get("dataset", "")))
    vocab = (
        meta["vocab_size"] if meta else min(ckpt["model_args"]["vocab_size"], 50257)
    )  # nanoGPT pads 50257 to 50304
    model = build_model(ckpt).eval()
    factors = {
        n: (A, B[:vocab] if n == "lm_head" else B, s, m[:vocab] if n == "lm_head" and m is not None else m)
        for n, (A, B, s, m) in lora_factors(model).items()
    }
    hub = hub_name(cfg.get("init_from", ""))
    own_base = not (hub and not info["train_embeddings"] and not c["write_base"] and "lm_head" not in factors)
    if own_base and hub and "lm_head" in factors:
        print(
            f"note: the adapter adapts lm_head, which {hub} ties to the token embedding: base/ is written with "
            "an untied head, so PEFT's merge_and_unload changes the head alone"
        )
    # the base's absolute path: AutoPeftModelForCausalLM opens it from any working directory
    base_name = os.path.abspath(os.path.join(folder, "base")) if own_base else hub

    def fill(tmp):  # the whole export, into a temp folder that then replaces `folder` (files.write_folder)
        if own_base:  # the run's frozen weights, with the tokenizer that reads its data
            base = base_for_export(model, ckpt, vocab)
            base.save_pretrained(os.path.join(tmp, "base"))
            if not write_hf_tokenizer(meta, os.path.join(tmp, "base"), base.config.block_size):
                print(
                    "note: a bytes dataset has no Hugging Face tokenizer: base/ holds none (its ids are the UTF-8 "
                    "bytes)"
                )
        if c["peft_format"] == "native":
            return export_native(model, ckpt, tmp, base_name, info["settings"].get("dropout", 0.0), vocab)
        return export_peft(factors, tmp, base_name, dropout=info["settings"].get("dropout", 0.0))

    config = write_folder(folder, fill)
    if c["peft_format"] == "native":
        print(
            f"exported {info['kind']} in PEFT's {config['peft_type']} format ({len(config['target_modules'])} modules) "
            f"to {folder}/ for base {base_name}"
        )
        return folder
    n = sum(A.numel() + B.numel() for A, B, _, _ in factors.values())
    print(
        f"exported {info['kind']} ({len(config['target_modules'])} modules, rank {config['r']}"
        f"{' with a rank_pattern' if config['rank_pattern'] else ''}, {n:,} LoRA numbers"
        f"{', DoRA magnitudes' if config['use_dora'] else ''}) to {folder}/ for base {base_name}"
    )
    return folder


# -----------------------------------------------------------------------------
# import: a PEFT LoRA / DoRA adapter for GPT-2 into this repo's GPT


TENSORS = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_magnitude_vector": "m",
    "base_layer.weight": "W",
    "lora_A": "A",
    "lora_B": "B",
    "lora_E": "E",
}  # the last three: AdaLoRA's
# the LoraConfig fields the importer understands: what it reads (ranks, scales, DoRA; which modules the
# tensors say), and what describes the file rather than the function
UNDERSTOOD = {
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "fan_in_fan_out",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "base_model_name_or_path",
    "peft_type",
    "task_type",
    "auto_mapping",
    "peft_version",
    "revision",
    "inference_mode",
    "runtime_config",
    "megatron_core",
    "qalora_group_size",
    # AdaLoRA's: its initial rank and mask (read), its training schedule (no effect on the function)
    "init_r",
    "target_r",
    "tinit",
    "tfinal",
    "deltaT",
    "beta1",
    "beta2",
    "orth_reg_weight",
    "total_step",
}
INITS = (
    True,
    False,
    "gaussian",
)  # initialisations that leave the base weights as they are (not pissa, olora, ...)
# every other field must hold PEFT's default (LoraConfig, peft 0.21); a field not listed, an empty value
DEFAULTS_ONLY = {
    "bias": "none",
    "modules_to_save": None,
    "init_lora_weights": True,
    "megatron_config": None,
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "monteclora_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}


def unsupported_options(config):
    """The adapter_config.json fields that would change the function in a way this importer does not
    implement, as 'key=value' strings."""
    bad = []
    for key, value in config.items():
        if key in UNDERSTOOD:
            continue
        if key == "init_lora_weights":
            ok = any(value is init or (isinstance(init, str) and value == init) for init in INITS)
        else:
            ok = value == DEFAULTS_ONLY[key] if key in DEFAULTS_ONLY else value in (None, False, {}, [])
        if not ok:
            bad.append(f"{key}={value!r}")
    return bad


def pattern_key(patterns, name):
    """PEFT's rule (utils.other.get_pattern_key): the first pattern that matches the end of the module
    name at a dot boundary."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", name)), None)


def read_peft(folder):
    """(config dict, {module name: {"A", "B", "m", maybe "W"}}) of a PEFT adapter folder. "W": the base
    weight PEFT saves beside the factors of an adapted embedding or a head tied to one."""
    from safetensors.torch import load_file

    paths = [os.path.join(folder, f) for f in ("adapter_config.json", "adapter_model.safetensors")]
    if not all(os.path.isfile(p) for p in paths):
        raise InteropError(
            f"{folder!r} is not a PEFT adapter folder: it needs adapter_config.json and "
            "adapter_model.safetensors (PeftModel.save_pretrained writes both)"
        )
    config = read_json(paths[0])
    family = family_for_peft(config)
    if family is None:
        readable = [
            f"{t}{' with use_dora' if d else ''}"
            for t, d in (f.peft_import for f in FAMILIES.values() if f.peft_import)
        ]
        raise InteropError(
            f"{folder}: peft_type {config.get('peft_type')!r} with use_dora={bool(config.get('use_dora'))} "
            f"does not import; these do: {', '.join(readable)}"
        )
    bad = unsupported_options(config)
    if bad:
        raise InteropError(
            f"{folder}: adapter_config.json sets {', '.join(bad)}, which this importer does not implement "
            f"(it reads LoRA, DoRA and AdaLoRA with every other LoraConfig field at its default, init_lora_weights "
            f"one of {INITS}); merge or convert the adapter in PEFT first"
        )
    config.setdefault("lora_alpha", family.peft_numbers["lora_alpha"])  # PEFT's default
    for key, value in (
        *((k, config.get(k, default)) for k, default in family.peft_numbers.items()),
        *((f"alpha_pattern[{k!r}]", v) for k, v in (config.get("alpha_pattern") or {}).items()),
        *(
            (f"rank_pattern[{k!r}]", v)
            for k, v in (config.get("rank_pattern") or {}).items()
            if family.peft_ranks_as_configured
        ),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise InteropError(f"{paths[0]}: {key} must be a finite number > 0, got {value!r}")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise InteropError(f"{paths[0]}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    try:
        tensors = load_file(paths[1])
    except Exception as e:  # a truncated or foreign file: safetensors' errors are several
        raise InteropError(
            f"{paths[1]} is not a readable safetensors file ({type(e).__name__}): export it again"
        ) from None
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise InteropError(
            f"{paths[1]}: {bad[:3]} hold nan or inf values: the adapter diverged; export a good one"
        )
    layers = {}
    for key, t in tensors.items():
        name, part = next(
            (
                (key[len(PREFIX) : -len(p) - 1], p)
                for p in TENSORS
                if key.startswith(PREFIX) and key.endswith("." + p)
            ),
            (None, None),
        )
        if name is None:
            raise InteropError(f"{folder}: tensor {key!r} is not a LoRA factor or DoRA magnitude of a module")
        layers.setdefault(name, {})[TENSORS[part]] = t
    return config, layers


def import_peft(folder, base=""):
    """(model with the adapters, the checkpoint's adapter entry, the base's name) for a PEFT LoRA, DoRA
    or AdaLoRA adapter: the base loaded as GPT.from_pretrained, the layers injected with PEFT's ranks
    and scales, the tensors copied."""
    config, layers = read_peft(folder)
    base_given = bool(base)
    base = base or config.get("base_model_name_or_path") or ""
    base = base.removeprefix(HUB)
    if (
        base
        and not base_given
        and not (base in GPT2_SIZES or os.path.isdir(base))
        and is_gpt2_folder(os.path.join(folder, "base"))
    ):
        base = os.path.join(folder, "base")  # an export's relative base, read from another working directory
    if not base:
        raise ConfigError(
            f"{folder}: adapter_config.json names no base model; pass --base=gpt2 (or a GPT-2 folder)"
        )
    if not (base in GPT2_SIZES or os.path.isdir(base)):
        raise ConfigError(
            f"the adapter's base {base!r} is neither a GPT-2 name ({', '.join(GPT2_SIZES)}) nor a "
            "folder here; pass --base=NAME_OR_FOLDER"
        )
    model = GPT.from_pretrained(base)
    modules = dict(model.named_modules())
    family, settings = family_for_peft(config), {}
    for name, t in sorted(layers.items()):
        if name not in modules or type(modules[name]) is not torch.nn.Linear:
            raise InteropError(
                f"the adapter adapts {name!r}, which is not a Linear of GPT-2 here (linears are e.g. "
                "transformer.h.0.attn.c_attn, lm_head)"
            )
        W = t.pop("W", None)
        if W is not None and not torch.equal(W.to(modules[name].weight.dtype), modules[name].weight.detach()):
            raise InteropError(
                f"the adapter carries its own {name}.weight, not the base's (a resized or trained "
                f"embedding): it needs that base, which {base!r} is not"
            )
        if set(t) != set(family.peft_parts):
            raise InteropError(
                f"{name}: the adapter file holds {sorted(t)}; a {config['peft_type']} adapter with "
                f"use_dora={bool(config.get('use_dora'))} needs {sorted(family.peft_parts)}"
            )
        rank_key = pattern_key(config.get("rank_pattern") or {}, name)
        said = config["rank_pattern"][rank_key] if rank_key else config.get("r", family.peft_numbers["r"])
        if family.peft_ranks_as_configured and t["A"].shape[0] != said:
            raise InteropError(
                f"{folder}: adapter_config.json gives {name} rank {said} but its tensors have rank "
                f"{t['A'].shape[0]} (PeftModel refuses it too, and the scale alpha / r is ambiguous): correct r "
                "or rank_pattern"
            )
        key = pattern_key(config.get("alpha_pattern") or {}, name)
        settings[name] = family.from_peft(
            config, t["A"].shape[0], config["alpha_pattern"][key] if key else config["lora_alpha"]
        )
    info = dict(
        kind=family.kind,
        targets=sorted(layers),
        settings=dict(dropout=float(config.get("lora_dropout", 0.0))),
        train_embeddings=False,
        layers=settings,
    )
    inject_adapters(model, family.kind, targets=info["targets"], layers=settings, **info["settings"])
    own = dict(model.named_parameters())
    state = {}
    for name, t in layers.items():
        for part, ours in family.peft_parts.items():
            key = f"{name}.{ours}"  # PEFT keeps 1-D tensors of ours as (r, 1) (AdaLoRA's E): flattened
            state[key] = (t[part].reshape(-1) if own[key].dim() == 1 else t[part]).to(own[key].dtype)
    load_adapter_state_dict(
        model, state
    )  # every tensor present, each of the layer's shape (else: another GPT-2 size)
    return model, info, base


def base_vocabulary(base, vocab_size):
    """What the token ids of a GPT-2 base mean, as a meta.json would say (prepare.vocabulary reads it):
    GPT-2's tokens for a 50,257-token (or padded) vocabulary, the characters of the tokenizer.json an
    export here wrote beside a smaller one, else None (unknown: import_run checks the size alone)."""
    if vocab_size >= 50257:
        return {"tokenizer": "gpt2"}
    path = os.path.join(base, "tokenizer.json")
    if os.path.isfile(path) and read_json(path).get("model", {}).get("type") == "WordLevel":
        stoi = read_json(path)["model"]["vocab"]
        return {"tokenizer": "char", "vocab_size": len(stoi), "itos": {i: ch for ch, i in stoi.items()}}
    return None


def check_out_dir(out, overwrite):
    """The earlier run's files in out (to replace, with --overwrite=True); refused otherwise."""
    held = run_files(out) if os.path.isdir(out) else []
    if held and not overwrite:
        raise ConfigError(
            f"{out!r} already holds a run ({', '.join(held)}): choose another --out_dir or pass "
            "--overwrite=True"
        )
    return held


def import_run(c):
    folder, out = c["import_from"], c["out_dir"]
    check_out_dir(out, c["overwrite"])  # before any work
    model, info, base = import_peft(folder, c["base"])
    data_dir = c["data_dir"] or os.path.join("data", c["dataset"])
    meta = read_meta(data_dir)
    check_vocabulary(base_vocabulary(base, model.config.vocab_size), meta, base, data_dir)
    if meta and meta["vocab_size"] > model.config.vocab_size:
        raise InteropError(
            f"{data_dir!r} holds {meta['vocab_size']:,} token ids but the base {base!r} reads "
            f"{model.config.vocab_size:,}: pass the --dataset (or --data_dir) prepared with the base's tokenizer"
        )
    lock = lock_run_folder(out, "python hf.py --import_from=" + folder)  # a training run there: refused
    remove_run_files(out, check_out_dir(out, c["overwrite"]))  # nothing of an earlier run stays beside it
    model_args = {k: getattr(model.config, k) for k in model.config.__dataclass_fields__}
    config = {
        "init_from": base,
        "dataset": c["dataset"],
        "data_dir": c["data_dir"],
        "imported_from": os.path.abspath(folder),
    }
    save_checkpoint(
        {
            "format": FORMAT,
            "model": model.state_dict(),
            "model_type": "gpt",
            "model_args": model_args,
            "iter_num": 0,
            "best_val_loss": float("inf"),
            "config": config,
            "adapter": info,
            "meta": meta,
        },
        os.path.join(out, "ckpt.pt"),
    )
    save_adapter_file(
        {
            "format": FORMAT,
            "adapter": info,
            "model_type": "gpt",
            "model_args": model_args,
            "base": base,
            "seed": 0,
            "state": adapter_state_dict(model),
        },
        os.path.join(out, "adapter.safetensors"),
    )
    lock.close()
    ranks = sorted({s["rank"] for s in info["layers"].values()})
    print(
        f"imported a PEFT {info['kind']} adapter ({len(info['targets'])} modules, rank {'/'.join(map(str, ranks))}) "
        f"on {base} into {out}/ (ckpt.pt, adapter.safetensors)"
    )
    return out


def main(argv=(), environ=None):
    c = configure(DEFAULTS, list(argv), environ)
    if c["import_from"]:
        return import_run(c)
    return export_run(c)


if __name__ == "__main__":
    cli(main, sys.argv[1:])
