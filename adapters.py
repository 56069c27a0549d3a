"""
Low-rank adapters, injected into any model by module name (the model file is never edited).

         x ──────────────┬──────────────────────────┐
                         │                          │
                 ┌───────┴───────┐          dropout(x)
                 │ W  (out, in)  │          ┌───────┴───────┐
                 │ frozen base   │          │ A  (r, in)    │  Kaiming-uniform
                 └───────┬───────┘          └───────┬───────┘
                         │                  ┌───────┴───────┐
                         │                  │ B  (out, r)   │  zeros: the adapter starts as identity
                         │                  └───────┬───────┘
                         │                          │ × scaling (alpha / r)
                         └──────────── + ───────────┘
                                       y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ

    names = inject_adapters(model, "lora", rank=8, alpha=16.0)   # LoRA on the default targets
    trainable, total = count_params(model)
    torch.save(adapter_state_dict(model), "adapter.pt")             # small: adapter tensors only
    merge_adapters(model)                                           # plain nn.Linear again, W + s·BA

Every adapter layer is an AdapterLinear: it owns its frozen nn.Linear (`base`), defines its update
through factors() (ΔW = s·B A), has `delta_weight()`, explicit idempotent `merge()` / `unmerge()`,
a `merged` flag, and as_lora(), the plain LoRA it computes. Every family (none, lora, dora, sora,
adalora, adadora, pissa, sublora) is one Family subclass registered in FAMILIES: the scripts call
its hooks and never ask which family they hold. The file reads in sections: the shared layer and
the Family hooks; LoRA / DoRA; SoRA; AdaLoRA / AdaDoRA; Rotational PiSSA; SubLoRA; injection;
state and merge; the fused speed path; the registry.
"""

__all__ = [  # the public API (README's "Python API"); everything else is this file's own
    "AdapterError",
    "AdapterLinear",
    "Family",
    "register",
    "family_of",
    "FAMILIES",
    "inject_adapters",
    "find_targets",
    "adapter_layers",
    "count_params",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "merge_adapters",
    "to_lora",
    "lora_model",
    "effective_ranks",
    "LoRALinear",
    "DoRALinear",
    "SoRALinear",
    "SoRAOptimizer",
    "build_sora_optimizers",
    "AdaLoRALinear",
    "VeRALinear",
    "LoRAGALinear",
    "AdaDoRALinear",
    "RankAllocator",
    "orthogonal_regularization",
    "RotationalPiSSALinear",
    "RotationalPiSSAConfig",
    "replace_linear_with_rotational_pissa",
    "rotation_penalty",
    "SubLoRA",
]

import contextlib
import copy
import fnmatch
import functools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import LanguageModel

# Linears adapted when no targets are given: attention q/k/v and output projection, both MLP
# Linears and the LM head, for both model layouts of model.py (GPT: c_attn c_proj c_fc lm_head;
# bigram: query key value proj fc1 fc2 lm_head). A pattern matches a module name exactly, as its
# last dotted components ("attn.c_proj"), or as an fnmatch glob ("transformer.h.*.attn.c_attn").
DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc", "query", "key", "value", "proj", "fc1", "fc2", "lm_head")


class AdapterError(ValueError):
    """Bad adapter settings or targets; the message says which and how to fix it."""


def compute_dtype(t):
    """fp32 for fp32 / bf16 / fp16 tensors, fp64 for fp64 ones: merges and norms never lose precision
    that the model has (peft computes in the promotion as well)."""
    return torch.promote_types(t.dtype, torch.float32)


def autocast_off(kind):
    """A context without autocast on device type `kind` (regularisers and norms in their parameters'
    precision). The meta device has no autocast."""
    on = kind in ("cpu", "cuda", "mps", "xpu") and torch.is_autocast_enabled(kind)
    return torch.autocast(kind, enabled=False) if on else contextlib.nullcontext()


def check_rank(rank, base: nn.Linear, minimum=1):
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < minimum:
        raise AdapterError(f"adapter rank must be a positive int, got {rank!r}")
    if rank > min(base.in_features, base.out_features):
        raise AdapterError(
            f"adapter rank {rank} is larger than the layer ({base.in_features} -> "
            f"{base.out_features}); use a rank <= {min(base.in_features, base.out_features)}"
        )


def layer_dropout(layer):
    return layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0


# -----------------------------------------------------------------------------
# the shared layer


class AdapterLinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank branch ΔW = s · B A, given by factors().
    With use_dora, DoRA's magnitude m rescales each output row of W + ΔW to m / ‖W + ΔW‖_row."""

    def __init__(self, base: nn.Linear, dropout=0.0, use_dora=False):
        super().__init__()
        if type(base) is not nn.Linear:
            raise AdapterError(f"adapters wrap nn.Linear layers, got {type(base).__name__}")
        self.base = base
        self.base.requires_grad_(False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # DoRA (Liu et al. 2024): m starts at the row norms of W, so the layer starts as the base
        w = base.weight.detach()
        self.magnitude = nn.Parameter(w.to(compute_dtype(w)).norm(dim=1).to(w.dtype)) if use_dora else None
        self.merged = False
        self.frozen = set()  # names of the layer's own parameters that stay frozen (besides base.*)

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    @property
    def weight(self):  # code that reads layer.weight (e.g. weight tying, init) still works
        return self.base.weight

    def factors(self):
        """(B (out, r), A (r, in), s) with ΔW = s · B A."""
        raise NotImplementedError

    def frozen_weight(self):
        """The W the forward multiplies x by (PiSSA's NF4 residual replaces it)."""
        return self.base.weight

    def forward(self, x):
        if self.merged:
            return self.base(x)
        B, A, s = self.factors()  # ΔW = s·B A, each family's own
        W, xd = self.frozen_weight(), self.lora_dropout(x)
        b = self.base.bias if self.magnitude is None else None  # DoRA adds the bias after its rescale
        if fused_pays(x):  # CUDA, eager: measured 1.67x -> 1.05x of full fine-tuning's step (docs/bench.md)
            y = fused_lora_linear(x, xd, W, b, A, B, s)
        else:
            y = F.linear(x, W, b) + s * (xd @ A.T) @ B.T  # y = x Wᵀ + b + s (xd Aᵀ) Bᵀ
        if self.magnitude is None:
            return y
        # DoRA (Liu et al. 2024, eq. 5): y = m / ‖W + ΔW‖ ⊙ (x Wᵀ + s (xd Aᵀ) Bᵀ) + b, the norm detached (§4.3)
        y = y * (self.magnitude / self.weight_norm((B, A, s)).to(self.magnitude.dtype)).to(y.dtype)
        return y if self.base.bias is None else y + self.base.bias.to(y.dtype)

    def delta_weight(self):
        """The branch as a dense (out, in) matrix in fp32 (fp64 for fp64 models); only merge and tests
        build it."""
        B, A, s = self.factors()
        dt = compute_dtype(self.base.weight)
        return (B.to(dt) @ A.to(dt)) * s

    @torch.no_grad()
    def weight_norm(self, factors=None):
        """‖W + ΔW‖ per output row without forming W + ΔW (peft PR #3387), in fp32 (fp64 models: fp64):
        ‖W_i + ΔW_i‖² = ‖W_i‖² + (B ⊙ (2s W Aᵀ + s² B A Aᵀ))_i·1. No gradient flows through it."""
        B, A, s = factors or self.factors()
        dt = compute_dtype(self.base.weight)
        with autocast_off(self.base.weight.device.type):
            W, B, A = self.base.weight.to(dt), B.to(dt), A.to(dt)
            cross = torch.addmm(W @ A.T, B, A @ A.T, beta=2.0 * s, alpha=s * s)  # (out, r)
            return (torch.linalg.vector_norm(W, dim=1).square() + (B * cross).sum(1)).clamp_min(0).sqrt()

    def live_ranks(self):
        """A bool mask over the factors' ranks of those in use (SoRA: g != 0, AdaLoRA: E != 0), or None
        when every rank is."""
        return None

    @torch.no_grad()
    def as_lora(self):
        """The plain LoRA (with DoRA's magnitude) this layer computes, on the same base, of its live ranks
        alone: for export, prune and every tool that reads LoRA factors. None when the layer adds
        nothing; a layer with no live rank but a magnitude is a zero rank-1 LoRA that still rescales W."""
        B, A, s = self.factors()
        keep = self.live_ranks()
        if keep is not None:
            B, A = B[:, keep], A[keep]
        if A.shape[0] == 0:
            if self.magnitude is None:
                return None
            B, A = B.new_zeros(B.shape[0], 1), A.new_zeros(1, A.shape[1])
        out_ranges = getattr(self, "out_ranges", None)  # a fused q/k/v layer adapted in part stays so
        lora = LoRALinear(
            self.base,
            rank=A.shape[0],
            scaling=s,
            dropout=layer_dropout(self),
            use_dora=self.magnitude is not None,
            out_ranges=out_ranges,
        )
        lora.lora_A.copy_(A)
        lora.lora_B.copy_(B if lora.out_index is None else B[lora.out_index])
        if self.magnitude is not None:
            lora.magnitude.copy_(self.magnitude)
        lora.merged = self.merged
        return lora

    @torch.no_grad()
    def merge(self):
        """W <- W + ΔW (DoRA: W <- m / ‖W + ΔW‖ ⊙ (W + ΔW)) in fp32 (fp64 models: fp64), cast once.
        Idempotent. The merged weight is a new tensor, so a weight shared with another module (GPT's head
        is tied to the token embedding) is untied, not changed."""
        if self.merged:
            return
        W = self.frozen_weight().to(compute_dtype(self.base.weight)) + self.delta_weight()
        if self.magnitude is not None:
            self._merge_scale = self.magnitude.to(W.dtype) / self.weight_norm()  # kept to unmerge exactly
            W = self._merge_scale[:, None] * W
        if self.frozen_weight() is not self.base.weight:  # W was not the base (NF4): kept to unmerge
            self._unmerged_weight = self.base.weight
        self._set_weight(W)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        if self.frozen_weight() is not self.base.weight:  # the base was not the W merged into (NF4)
            self.base.weight, self.merged = self._unmerged_weight, False
            return
        W = self.base.weight.to(compute_dtype(self.base.weight))
        if self.magnitude is not None:
            W = W / self._merge_scale[:, None]
        self._set_weight(W - self.delta_weight())
        self.merged = False

    def _set_weight(self, w):
        if not torch.isfinite(w).all():  # peft's safe_merge: never write inf/nan into the base
            raise AdapterError("merge produced non-finite weights; the adapter has diverged, not merged")
        self.base.weight = nn.Parameter(w.to(self.base.weight.dtype), requires_grad=False)


# -----------------------------------------------------------------------------
# a family, as the scripts see it


# the config keys every family reads (train.py's); a family adds its own in Family.keys
SHARED_KEYS = {
    "lora_rank": (8, "[1, inf)", "r: rank of every adapter (initial rank for AdaLoRA, directions for PiSSA)"),
    "lora_alpha": (16.0, "(0, inf)", "scaling alpha / r (alpha / sqrt(r) with use_rslora)"),
    "lora_dropout": (0.0, "[0, 1)", "dropout on the adapter's input"),
    "lora_targets": (
        "",
        None,
        "';'-separated module-name patterns ('c_attn:q,v;lm_head'); '' = the adapter's defaults",
    ),
    "lora_rank_pattern": (
        "",
        None,
        "per-layer ranks, 'lm_head=8;c_fc=2' (patterns as in lora_targets; PEFT's "
        "rank_pattern: scaling lora_alpha / that rank)",
    ),
    "use_rslora": (False, None, "scaling alpha / sqrt(r) instead of alpha / r"),
    "loraplus": (False, None, "LoRA+ (Hayou et al. 2024): B's learning rate loraplus_ratio x A's"),
    "loraplus_ratio": (16.0, "[1, inf)", "LoRA+: η_B / η_A (16: the paper's and PEFT's)"),
    "train_embeddings": (False, None, "also train the token / position embeddings"),
}


def config_keys():
    """{key: (default, allowed interval or None, help, section)}: the shared keys, then every registered
    family's own."""
    keys = {k: (*v, "adapter: the keys every family reads") for k, v in SHARED_KEYS.items()}
    for family in FAMILIES.values():
        sentence = " ".join((family.__doc__ or "").split()).split(". ")[0].rstrip(".")  # its first, whole
        section = f"{family.kind}: {sentence}" if sentence else family.kind
        keys.update({k: (*v, section) for k, v in family.keys.items()})
    return keys


class Family:
    """An adapter family as train.py, bench.py, hf.py and checkpoint.py see it: they call these hooks
    and nothing else of a family. The defaults are plain LoRA's; a family overrides what differs.

    keys: the family's own config keys, {key: (default, allowed interval or None, help)}; train.py
    accepts them like its own globals (a config file, --key=value, --help), beside SHARED_KEYS.
    schedule_keys: those of keys counted in iterations, rescaled
    when --max_iters shortens a run. An instance holds one run's flat config `c` and whatever the
    family tracks during training (SoRA's gate optimizer, AdaLoRA's allocator)."""

    kind = "lora"  # the value of train.py's `adapter` key
    layer = None  # the AdapterLinear class inject_adapters wraps each target in
    keys = {}
    schedule_keys = ()
    default_targets = DEFAULT_TARGETS
    rank_pattern = True  # per-layer ranks (lora_rank_pattern) make sense for it
    scratch_base = False  # a random frozen base is its setting (init_from='auto' builds one)
    # {case: train.py keys}: the settings that exercise what the family does, at a tiny size (rank 4,
    # 20 iterations); every per-family test runs each case (conftest.py). '' names the case by its kind.
    examples = {"": {}}
    ranks_from = "lora_rank"  # what sets its ranks where lora_rank_pattern does not apply

    def __init__(self, c, say=print):
        self.c, self.say = c, say

    loraplus = True  # its layers train lora_A / lora_B factors, whose rates LoRA+ sets apart

    def check(self):
        """Value checks beyond each key's interval, before any work: raise AdapterError."""
        if self.c["loraplus"] and not self.loraplus:
            raise AdapterError(
                f"loraplus=True gives B factors their own learning rate, but {self.kind} trains none: drop "
                "--loraplus (it applies to lora, dora, sora, adalora and adadora)"
            )
        if self.c["lora_rank_pattern"] and not self.rank_pattern:
            raise AdapterError(
                f"lora_rank_pattern sets ranks for lora, dora and sora, not {self.kind} (its ranks come "
                f"from {self.ranks_from})"
            )
        parse_rank_pattern(self.c["lora_rank_pattern"])

    def layer_settings(self):
        """The layer class's keyword arguments, from the flat config."""
        c = self.c
        return dict(
            rank=c["lora_rank"], alpha=c["lora_alpha"], dropout=c["lora_dropout"], use_rslora=c["use_rslora"]
        )

    def inject(self, model):
        """Adapt a freshly loaded base in place; returns (the model to train, the checkpoint's adapter
        entry: what rebuild() needs)."""
        c = self.c
        targets = [t.strip() for t in c["lora_targets"].split(";") if t.strip()] or None
        names = find_targets(model, targets, self.default_targets)
        layers = (
            rank_pattern_layers(names, parse_rank_pattern(c["lora_rank_pattern"]))
            if c["lora_rank_pattern"]
            else None
        )
        info = dict(
            kind=self.kind,
            targets=names,
            settings=self.layer_settings(),
            train_embeddings=c["train_embeddings"],
            **({"layers": layers} if layers else {}),
        )
        return self.rebuild(model, info), info

    @classmethod
    def rebuild(cls, model, info):
        """The adapters a checkpoint's or adapter file's entry describes, injected into `model`."""
        inject_adapters(
            model,
            cls.kind,
            targets=info["targets"],
            train_embeddings=info["train_embeddings"],
            layers=info.get("layers"),
            **info["settings"],
        )
        return model

    @classmethod
    def unboundable(cls, config):
        """Why a run with this config cannot be bounded from its message (eval_bounds.py), or None."""
        return None

    peft_import = None  # (peft_type, use_dora) of the PEFT adapters this family reads (hf.py --import_from)
    peft_parts = {"A": "lora_A", "B": "lora_B"}  # a PEFT module's tensors -> this family's layer's
    # adapter_config.json fields that must be finite numbers > 0 (with PEFT's defaults), and whether each
    # module's tensors have the rank r / rank_pattern says (AdaLoRA's are sliced by the mask it holds)
    peft_numbers = {"r": 8, "lora_alpha": 8}
    peft_ranks_as_configured = True

    @classmethod
    def from_peft(cls, config, rank, alpha):
        """An imported PEFT module's layer settings, from its rank and its lora_alpha (or alpha_pattern)."""
        return dict(rank=rank, scaling=alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank)

    @classmethod
    def peft_native(cls, model, info, config):
        """The family in PEFT's own format, where PEFT has one (hf.py --peft_format=native): (the
        adapter_config.json fields, {module name: {PEFT tensor name: tensor}})."""
        raise AdapterError(
            f"PEFT has no format of its own for {cls.kind}: export it as the LoRA it computes "
            "(--peft_format=lora)"
        )

    def optimizers(self, model, lr, betas, weight_decay, device_type):
        """[(optimizer, peak learning rate)]; every one follows train.py's schedule scaled to its peak.
        Called once the model to train exists, new or resumed."""
        if self.c["loraplus"]:
            return loraplus_optimizers(
                model.named_parameters(), lr, self.c["loraplus_ratio"], betas, weight_decay
            )
        return [(model.configure_optimizers(weight_decay, lr, betas, device_type), lr)]

    def extra_loss(self, model):
        """The weighted term the family adds to the loss (a regulariser), or None."""
        return None

    def init_from_data(self, model, batches):
        """A new run's adapters initialised from training data before the first step (batches: an
        iterator of (x, y) training batches); by default none is read."""

    def before_step(self, model, it):
        """Before iteration `it`'s eval and step (and once at the end, it = max_iters)."""

    def after_step(self, model, it):
        """After the optimizers stepped at iteration `it`, before the gradients are cleared."""

    def stats(self, model):
        """The family's own numbers for a log row: {name: number, list or dict}."""
        return {}

    prune_key = None  # a bool config key: at the end, save the adapter of the live ranks alone

    def finish(self, model, info):
        """At the end of a run: (adapter entry, tensors) of a smaller adapter file to write, or None.
        With prune_key set and true, every layer becomes the plain LoRA (or DoRA) of its live ranks, in
        place, outputs unchanged (to_lora): SoRA's zero gates and AdaLoRA's zero E dropped."""
        if not self.prune_key or not self.c[self.prune_key]:
            return None
        before = sum(v.numel() for v in adapter_state_dict(model).values())
        layers = to_lora(model)
        kept = {n: m for n, m in layers.items() if isinstance(m, LoRALinear)}
        state = adapter_state_dict(model)
        ranks = sorted(getattr(m, "rank", 0) for m in layers.values())  # a base nn.Linear: rank 0
        self.say(
            f"pruned {self.kind}: {sum(ranks)} ranks kept in {len(ranks)} layers (per layer {ranks[0]}.."
            f"{ranks[-1]}, median {ranks[len(ranks) // 2]}); adapter parameters {before:,} -> "
            f"{sum(v.numel() for v in state.values()):,}"
        )
        pruned = dict(
            kind="dora" if any(m.magnitude is not None for m in kept.values()) else "lora",
            targets=[t for t in info["targets"] if t.partition(":")[0] in kept],
            settings=dict(dropout=info["settings"]["dropout"]),
            train_embeddings=info["train_embeddings"],
            layers={n: dict(rank=m.rank, scaling=m.scaling) for n, m in kept.items()},
        )
        return pruned, state

    def state_dict(self):
        """What the family tracks besides the model and the optimizers, for the checkpoint."""
        return {}

    def load_state_dict(self, state):
        pass


def loraplus_optimizers(named_params, lr, ratio, betas, weight_decay):
    """LoRA+ (Hayou et al. 2024), with PEFT's grouping (create_loraplus_optimizer): every lora_B and
    every vector (DoRA's magnitude, AdaLoRA's E) at ratio x lr, the rest (the A factors) at lr. As
    [(optimizer, peak learning rate)] for train.py's schedule; matrices decay, vectors do not."""
    named = [(n, p) for n, p in named_params if p.requires_grad]
    fast = [p for n, p in named if "lora_B" in n or p.ndim == 1]
    slow = [p for n, p in named if not ("lora_B" in n or p.ndim == 1)]

    def adamw(params, rate):
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=rate, betas=betas, **fused_on_cuda(params)), rate

    return [adamw(slow, lr), adamw(fast, ratio * lr)]


def parse_rank_pattern(text):
    """lora_rank_pattern 'lm_head=8;c_fc=2' as {'lm_head': 8, 'c_fc': 2}."""
    pattern = {}
    for item in (t.strip() for t in text.split(";")):
        key, eq, rank = item.partition("=")
        if item and (not eq or not key.strip() or not rank.strip().isdigit() or int(rank) < 1):
            raise AdapterError(
                f"lora_rank_pattern item {item!r} is not 'pattern=rank' with a rank >= 1; write e.g. "
                "'lm_head=8;c_fc=2'"
            )
        if item:
            pattern[key.strip()] = int(rank)
    return pattern


class NoAdapter(Family):
    """adapter='none': pretraining or full fine-tuning, every weight trained."""

    kind = "none"
    rank_pattern, scratch_base, loraplus = False, True, False
    examples = {}

    def inject(self, model):
        return model, dict(NO_ADAPTER)

    @classmethod
    def rebuild(cls, model, info):
        return model


NO_ADAPTER = {"kind": "none", "targets": [], "settings": {}, "train_embeddings": False}


# -----------------------------------------------------------------------------
# LoRA and DoRA


class LoRALinear(AdapterLinear):
    """LoRA (Hu et al. 2021): y = W x + (dropout(x) Aᵀ) Bᵀ · alpha / r. loralib names and init.
    use_dora=True adds DoRA's magnitude (kind 'dora')."""

    def __init__(
        self,
        base: nn.Linear,
        rank=8,
        alpha=16.0,
        dropout=0.0,
        use_rslora=False,
        scaling=None,
        use_dora=False,
        out_ranges=None,
    ):
        super().__init__(base, dropout, use_dora)
        check_rank(rank, base)
        self.rank = rank
        # out_ranges: adapt only these output rows (the q and v thirds of a fused c_attn); B then has
        # rows for them alone, and its full (out, r) form is rebuilt with zeros elsewhere
        self.out_ranges = out_ranges
        dev = base.weight.device
        rows = torch.cat([torch.arange(a, b, device=dev) for a, b in out_ranges]) if out_ranges else None
        self.register_buffer("out_index", rows, persistent=False)
        # rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r) so that the update's size is rank-free.
        # An explicit `scaling` keeps a trained layer's scale when its rank shrinks (SoRA prune).
        self.scaling = (
            scaling if scaling is not None else alpha / math.sqrt(rank) if use_rslora else alpha / rank
        )
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        n_out = base.out_features if rows is None else len(rows)
        self.lora_B = nn.Parameter(torch.zeros(n_out, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # loralib / peft: as nn.Linear's default

    def full_B(self):
        if self.out_index is None:
            return self.lora_B
        return self.lora_B.new_zeros(self.out_features, self.rank).index_copy(0, self.out_index, self.lora_B)

    def factors(self):
        return self.full_B(), self.lora_A, self.scaling

    def extra_repr(self):
        return f"rank={self.rank}, scaling={self.scaling:g}, dora={self.magnitude is not None}, merged={self.merged}"


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024): LoRA with a learnable magnitude per output row."""

    def __init__(self, base: nn.Linear, **settings):
        super().__init__(base, use_dora=True, **settings)


class LoRA(Family):
    kind, layer = "lora", LoRALinear
    examples = {
        "": dict(lora_dropout=0.1, lora_rank_pattern="lm_head=4;c_fc=1"),
        "qv_rslora_loraplus": dict(lora_targets="c_attn:q,v;lm_head", use_rslora=True, loraplus=True),
    }
    peft_import = ("LORA", False)


class DoRA(Family):
    kind, layer = "dora", DoRALinear
    examples = {"": dict(train_embeddings=True)}
    peft_import = ("LORA", True)
    peft_parts = dict(Family.peft_parts, m="magnitude")


# -----------------------------------------------------------------------------
# LoRA-GA: A and B from the SVD of the full fine-tuning gradient, estimated on training batches


class LoRAGALinear(LoRALinear):
    """LoRA-GA (Wang et al. 2024): LoRA whose A and B start from the SVD of the weight's gradient on a
    few training batches (LoRAGA.init_from_data). The base keeps the residual, W - s B₀ A₀: the layer
    adds s (B A - B₀ A₀), B₀ and A₀ the factors at init, kept as buffers (so adapter files apply to the
    original base, as PiSSA's do). Before its init, B = B₀ = 0: the layer is its base."""

    def __init__(self, base: nn.Linear, **settings):
        super().__init__(base, **settings)
        self.register_buffer("lora_A0", torch.zeros_like(self.lora_A))
        self.register_buffer("lora_B0", torch.zeros_like(self.lora_B))

    def factors(self):
        return (
            torch.cat([self.full_B(), -self.lora_B0], 1),
            torch.cat([self.lora_A, self.lora_A0]),
            self.scaling,
        )

    @torch.no_grad()
    def init_from_gradient(self, grad, gamma):
        """PEFT's LoRA-GA init (direction ArB2r, stable scale): G ≈ U S Vᵀ over its top 4r triplets (the
        randomized SVD), A = Vᵀ[:r], B = U[:, r:2r] S[r:2r] · out^¼ / √gamma."""
        r = self.rank
        U, S, V = torch.svd_lowrank(grad.float(), q=min(4 * r, *grad.shape), niter=4)
        A, B = V.T[:r], U[:, r : 2 * r] * S[r : 2 * r] * (self.out_features**0.25 / gamma**0.5)
        for own, init in ((self.lora_A, A), (self.lora_B, B), (self.lora_A0, A), (self.lora_B0, B)):
            own.copy_(init.to(own.dtype))


class LoRAGA(Family):
    """LoRA-GA: LoRA initialised from the gradient of `loraga_batches` training batches; the base keeps
    the residual. The init reads the training data, so no bound can take its model as a prior."""

    kind, layer = "loraga", LoRAGALinear
    rank_pattern, loraplus = False, True
    keys = {
        "loraga_batches": (8, "[1, inf)", "training batches whose mean gradient sets A and B"),
        "loraga_gamma": (16.0, "(0, inf)", "the stable scale's gamma: B times out^(1/4) / sqrt(gamma)"),
    }
    examples = {"": dict(loraga_batches=2)}

    def init_from_data(self, model, batches):
        layers = adapter_layers(model)
        if any(layer.out_ranges for layer in layers.values()):
            raise AdapterError("loraga adapts whole Linears: drop the ':q,v' parts from --lora_targets")
        for layer in layers.values():
            layer.base.weight.requires_grad_(True)
        for _ in range(self.c["loraga_batches"]):  # B = 0: the gradient of the base model's loss
            x, y = next(batches)
            model(x, y)[1].backward()
        for name, layer in layers.items():
            weight = layer.base.weight
            layer.init_from_gradient(weight.grad / self.c["loraga_batches"], self.c["loraga_gamma"])
            weight.grad = None
            weight.requires_grad_(False)
        model.zero_grad(set_to_none=True)
        self.say(
            f"loraga: A and B of {len(layers)} layers from the gradient of {self.c['loraga_batches']} batches"
        )

    @classmethod
    def unboundable(cls, config):
        return (
            "a LoRA-GA init reads training batches (its A, B and the base's residual come from their "
            "gradient), and a prior must be fixed before the data; bound a run with a data-free init"
        )


# -----------------------------------------------------------------------------
# SoRA: gated LoRA, the gates' proximal optimizer, the sparsity schedule, prune


class SoRALinear(LoRALinear):
    """SoRA (Ding et al. 2023): a gate g in R^r between the LoRA factors,
    y = W x + ((dropout(x) Aᵀ) ⊙ g) Bᵀ · s. A proximal optimizer (SoRAOptimizer) drives gates to
    exactly zero; prune() then drops those ranks for a plain, smaller LoRA with the same outputs."""

    def __init__(
        self,
        base: nn.Linear,
        rank=8,
        alpha=16.0,
        dropout=0.0,
        use_rslora=False,
        scaling=None,
        gate_init="randn",
        out_ranges=None,
    ):
        super().__init__(base, rank, alpha, dropout, use_rslora, scaling, out_ranges=out_ranges)
        if gate_init not in ("randn", "ones"):
            raise AdapterError(f"gate_init must be 'randn' (the SoRA code's) or 'ones', got {gate_init!r}")
        # TsinghuaC3I/SoRA src/lora.py: gate = randn(1, r); with B = 0 the output is the base either way
        init = torch.randn if gate_init == "randn" else torch.ones
        self.gate = nn.Parameter(init(rank, device=base.weight.device, dtype=base.weight.dtype))

    def factors(self):
        return self.full_B(), self.gate[:, None] * self.lora_A, self.scaling  # B (diag(g) A)

    @torch.no_grad()
    def rebalance(self):
        """Move each gate's magnitude into its column of B (B diag(g) unchanged, so the outputs are):
        g <- sign(g). After sparsification the L1 pull has left the kept gates small, and a small gate
        slows its rank's learning; with the mask fixed, its size is no longer needed. Idempotent."""
        self.lora_B.mul_(self.gate.abs())
        self.gate.copy_(torch.sign(self.gate))

    def live_ranks(self):
        return self.gate != 0

    def extra_repr(self):
        return super().extra_repr() + f", effective_rank={int(self.live_ranks().sum())}"


def fused_on_cuda(params):
    """AdamW's keyword for its fused CUDA kernel (what model.configure_optimizers uses) when every
    parameter is a CUDA tensor; nothing elsewhere. params: tensors or param-group dicts."""
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    return {"fused": True} if tensors and all(t.is_cuda for t in tensors) else {}


class SoRAOptimizer(torch.optim.AdamW):
    """AdamW for the gates, then the proximal step of an L1 penalty λ‖g‖₁ (soft-threshold):
    g <- sign(g) · max(|g| - λ·lr, 0). The SoRA paper's proximal step scales λ by the learning rate;
    TsinghuaC3I/SoRA src/sparse_optimizer_multiply_lr.py does the same (src/sparse_optimizer.py omits
    lr). Weight decay is forced to 0: the penalty is pure L1, not an elastic net.

    hold_zeros=True (set_lambda) is the tuning phase after sparsification: gates that are exactly zero
    stay zero, the others take plain AdamW steps (no threshold), so the kept ranks recover what the L1
    pull cost them. The mask is read from the gates themselves each step: nothing to save or resume."""

    def __init__(self, params, lr=1e-3, sparse_lambda=0.1, betas=(0.9, 0.999), eps=1e-8):
        if sparse_lambda < 0:
            raise AdapterError(f"sparse_lambda must be >= 0 (the L1 strength), got {sparse_lambda}")
        params = list(params)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0, **fused_on_cuda(params))
        self.sparse_lambda = sparse_lambda
        self.hold_zeros = False

    def add_param_group(self, group):
        super().add_param_group({**group, "weight_decay": 0.0})

    def set_lambda(self, sparse_lambda, hold_zeros=False):
        if sparse_lambda < 0:
            raise AdapterError(f"sparse_lambda must be >= 0, got {sparse_lambda}")
        self.sparse_lambda, self.hold_zeros = sparse_lambda, hold_zeros

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        keep = torch._foreach_abs(torch._foreach_sign(params)) if self.hold_zeros else None  # 1 where g != 0
        loss = super().step(closure)
        if keep is not None:
            torch._foreach_mul_(params, keep)
        for group in self.param_groups:
            threshold = self.sparse_lambda * group["lr"]
            if threshold > 0:
                soft_threshold_(group["params"], threshold)
        return loss


def soft_threshold_(tensors, threshold):
    """x <- sign(x) · max(|x| - threshold, 0) for every tensor in the list, in a few _foreach kernels."""
    shrunk = torch._foreach_abs(tensors)
    torch._foreach_sub_(shrunk, threshold)
    torch._foreach_clamp_min_(shrunk, 0.0)
    torch._foreach_mul_(shrunk, torch._foreach_sign(tensors))
    torch._foreach_copy_(tensors, shrunk)


def split_sora_params(model):
    """(gates, every other trainable parameter): each goes to its own optimizer."""
    gates, others = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (gates if name.rpartition(".")[2] == "gate" else others).append(p)
    return gates, others


def build_sora_optimizers(
    model, lr=1e-3, gate_lr=None, sparse_lambda=0.1, weight_decay=0.0, betas=(0.9, 0.999)
):
    """(gate_optimizer, regular_optimizer) for a custom loop: step both every iteration."""
    gates, others = split_sora_params(model)
    if not gates:
        raise AdapterError("the model has no trainable SoRA gates; inject_adapters(model, 'sora', ...) first")
    gate_opt = SoRAOptimizer(gates, lr=gate_lr or lr, sparse_lambda=sparse_lambda, betas=betas)
    return gate_opt, torch.optim.AdamW(
        others, lr=lr, betas=betas, weight_decay=weight_decay, **fused_on_cuda(others)
    )


def lambda_schedule(start, stop, levels, spacing="linear"):
    """The λ values of the sparsifying schedule, start to stop in `levels` steps. linear and
    log_linear follow TsinghuaC3I/SoRA (log_linear: log(linspace(e^start, e^stop))); exp_linear is
    evenly spaced in log λ (needs start > 0)."""
    if start < 0 or stop < start or levels < 1:
        raise AdapterError(
            f"the λ schedule needs 0 <= start <= stop and levels >= 1, got {start}, {stop}, {levels}"
        )
    t = torch.linspace(0, 1, levels, dtype=torch.float64)
    if spacing == "linear":
        values = start + (stop - start) * t
    elif spacing == "log_linear":
        values = torch.log(math.exp(start) + (math.exp(stop) - math.exp(start)) * t)
    elif spacing == "exp_linear":
        if start <= 0:
            raise AdapterError("exp_linear spacing needs a start λ > 0")
        values = torch.exp(math.log(start) + (math.log(stop) - math.log(start)) * t)
    else:
        raise AdapterError(f"λ spacing must be linear, log_linear or exp_linear, got {spacing!r}")
    return values.tolist()


def effective_ranks(model):
    """{layer name: ranks in use} for every layer with a sparse rank: nnz(gate) for SoRA, nnz(E) for
    AdaLoRA / AdaDoRA."""
    layers = adapter_layers(model).items()
    return {n: int(m.live_ranks().sum()) for n, m in layers if m.live_ranks() is not None}


def rank_report(model):
    """The effective rank per layer and the adapter parameters in use (r · (in + out + 1) per layer,
    plus DoRA magnitudes): what a sparse-rank family logs."""
    ranks, layers = effective_ranks(model), adapter_layers(model)
    remaining = sum(r * (layers[n].in_features + layers[n].out_features + 1) for n, r in ranks.items())
    remaining += sum(m.magnitude.numel() for m in layers.values() if m.magnitude is not None)
    return {"effective_rank": ranks, "adapter_params_remaining": remaining}


class SoRA(Family):
    """λ schedule: sora_lambda, raised to sora_lambda_max in sora_lambda_levels levels of sora_lambda_every
    iterations; the last sora_tune_iters iterations at λ = 0 with the zero gates held (SoRALinear.rebalance
    first). finish: the plain LoRA of the kept ranks, adapter_pruned.safetensors."""

    kind, layer = "sora", SoRALinear
    prune_key = "sora_prune"
    examples = {
        "": dict(
            sora_lambda=0.5, sora_lambda_max=5.0, sora_lambda_levels=3, sora_lambda_every=4, sora_tune_iters=6
        ),
        "loraplus": dict(sora_lambda=0.5, loraplus=True, loraplus_ratio=4.0),
    }
    keys = {
        "sora_lambda": (
            0.1,
            "[0, inf)",
            "L1 strength; the gates are soft-thresholded by sora_lambda * lr every step",
        ),
        "sora_lambda_max": (
            0.0,
            "[0, inf)",
            "> sora_lambda: raise λ to this in sora_lambda_levels steps (the sparsifying schedule)",
        ),
        "sora_lambda_levels": (5, "[1, inf)", "steps of the λ schedule from sora_lambda to sora_lambda_max"),
        "sora_lambda_every": (200, "[1, inf)", "iterations per λ level"),
        "sora_lambda_spacing": ("linear", None, "'linear' | 'log_linear' | 'exp_linear'"),
        "sora_gate_lr": (0.0, "[0, inf)", "peak learning rate of the gates; 0 = learning_rate"),
        "sora_gate_init": ("randn", None, "'randn' (the SoRA code's) | 'ones'"),
        "sora_tune_iters": (
            0,
            "[0, inf)",
            "the last N iterations: λ = 0, zero gates held at zero, kept gates rebalanced into B",
        ),
        "sora_prune": (
            True,
            None,
            "at the end, drop zero-gated ranks and save the smaller adapter_pruned.safetensors",
        ),
    }
    schedule_keys = ("sora_lambda_every", "sora_tune_iters")

    def check(self):
        super().check()
        c = self.c
        if c["sora_tune_iters"] >= max(1, c["max_iters"]):
            raise AdapterError(
                f"sora_tune_iters {c['sora_tune_iters']} leaves no iteration to sparsify in max_iters "
                f"{c['max_iters']}; lower it below max_iters (0 = no tuning phase)"
            )
        lambda_schedule(
            c["sora_lambda"],
            max(c["sora_lambda"], c["sora_lambda_max"]),
            c["sora_lambda_levels"],
            c["sora_lambda_spacing"],
        )

    def layer_settings(self):
        return dict(super().layer_settings(), gate_init=self.c["sora_gate_init"])

    def optimizers(self, model, lr, betas, weight_decay, device_type):
        gate_lr = self.c["sora_gate_lr"] or lr
        self.gates, rest = build_sora_optimizers(
            model, lr, gate_lr, self.c["sora_lambda"], weight_decay, betas
        )
        if self.c["loraplus"]:  # the factors by LoRA+'s two rates, the gates on their own
            factors = [(n, p) for n, p in model.named_parameters() if n.rpartition(".")[2] != "gate"]
            return [
                *loraplus_optimizers(factors, lr, self.c["loraplus_ratio"], betas, weight_decay),
                (self.gates, gate_lr),
            ]
        return [(rest, lr), (self.gates, gate_lr)]

    def tuning(self, it):
        """Whether iteration `it` is in the final tuning phase (λ = 0, zero gates held at zero)."""
        return self.c["sora_tune_iters"] > 0 and it >= self.c["max_iters"] - self.c["sora_tune_iters"]

    def lambda_at(self, it):
        """λ of the sparsifying schedule at iteration `it` (constant sora_lambda without one; 0 while tuning)."""
        c = self.c
        if self.tuning(it):
            return 0.0
        if c["sora_lambda_max"] <= c["sora_lambda"]:
            return c["sora_lambda"]
        levels = lambda_schedule(
            c["sora_lambda"], c["sora_lambda_max"], c["sora_lambda_levels"], c["sora_lambda_spacing"]
        )
        return levels[min(it // c["sora_lambda_every"], len(levels) - 1)]

    def before_step(self, model, it):
        level, tuning = self.lambda_at(it), self.tuning(it)
        if it > 0 and level != self.lambda_at(it - 1):
            report = rank_report(model)
            self.say(
                f"λ level reached {self.lambda_at(it - 1):g}: {report['adapter_params_remaining']:,} adapter "
                f"parameters remain; effective ranks {list(report['effective_rank'].values())}"
                + ("; tuning the kept ranks with λ = 0 from here" if tuning else "")
            )
        self.gates.set_lambda(level, hold_zeros=tuning)
        if tuning and not self.tuning(it - 1):  # idempotent: safe on resume
            for layer in adapter_layers(model).values():
                layer.rebalance()

    def stats(self, model):
        return dict(sora_lambda=self.gates.sparse_lambda, **rank_report(model))


# -----------------------------------------------------------------------------
# AdaLoRA / AdaDoRA: SVD-form adapter, importance-based rank allocation, orthogonality, slicing


class AdaLoRALinear(AdapterLinear):
    """AdaLoRA (Zhang et al. 2023): ΔW = B diag(E) A · alpha / ranknum in SVD form; RankAllocator
    zeroes the least important entries of E. use_dora=True adds DoRA's magnitude (AdaDoRA).
    A, B ~ N(0, 0.02) and E = 0, so the layer starts as its base (peft#1798 once drew E randomly).
    ranknum is the initial rank, fixed: masking ranks does not rescale the others."""

    def __init__(self, base: nn.Linear, rank=8, alpha=16.0, dropout=0.0, use_dora=False, ranknum=None):
        super().__init__(base, dropout, use_dora)
        check_rank(rank, base, minimum=0 if ranknum else 1)  # a sliced layer may keep no rank at all
        self.rank, self.ranknum = rank, ranknum or rank
        self.scaling = alpha / self.ranknum
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, **kw) * 0.02)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, rank, **kw) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(rank, **kw))

    def factors(self):
        return self.lora_B, self.lora_E[:, None] * self.lora_A, self.scaling  # B (diag(E) A), as peft

    def live_ranks(self):
        return self.lora_E != 0

    def extra_repr(self):
        return (
            f"rank={self.rank}, ranknum={self.ranknum}, scaling={self.scaling:g}, "
            f"dora={self.magnitude is not None}, effective_rank={int(self.live_ranks().sum())}"
        )


class AdaDoRALinear(AdaLoRALinear):
    """AdaDoRA: AdaLoRA's SVD-form adapter and rank allocation, DoRA's magnitude."""

    def __init__(self, base: nn.Linear, **settings):
        super().__init__(base, use_dora=True, **settings)


def check_schedule(init_r, target_r, total_step, tinit, tfinal):
    """AdaLoRA's budget schedule must fit: 1 <= target_r <= init_r and 0 <= tinit < total_step - tfinal
    (train.py's keys: lora_rank, adalora_target_r, max_iters, adalora_tinit, adalora_tfinal)."""
    if not 0 < target_r <= init_r:
        raise AdapterError(
            f"target_r must be in 1..init rank {init_r} (adalora_target_r <= lora_rank), got {target_r}"
        )
    if not 0 <= tinit < total_step - tfinal:
        raise AdapterError(
            f"AdaLoRA needs 0 <= tinit < total_step - tfinal, got tinit={tinit}, tfinal={tfinal}, "
            f"total_step={total_step}: lower --adalora_tinit / --adalora_tfinal or raise --max_iters"
        )


class RankAllocator:
    """AdaLoRA's budget allocation over every AdaLoRALinear of a model (QingruZhang/AdaLoRA
    loralib/adalora.py, peft tuners/adalora). Call update_and_allocate(step) after optimizer.step()
    and before optimizer.zero_grad(): the importance reads the gradients of that step.

    - importance per element I = |p ⊙ ∇p|; sensitivity Ī <- β1 Ī + (1-β1) I; uncertainty
      Ū <- β2 Ū + (1-β2) |I - Ī|; score Ī ⊙ Ū; a rank's score is score(E_i) + mean_j score(A_ij) +
      mean_j score(B_ji).
    - budget (ranks over all layers): init_r · n until tinit, then cubic decay to target_r · n at
      total_step - tfinal, masking every deltaT steps; after that the final mask every step (a
      masked E still has a gradient and would regrow)."""

    def __init__(self, model, target_r, total_step, tinit=0, tfinal=0, deltaT=1, beta1=0.85, beta2=0.85):
        self.layers = {n: m for n, m in adapter_layers(model).items() if isinstance(m, AdaLoRALinear)}
        if not self.layers:
            raise AdapterError(
                "RankAllocator needs AdaLoRA layers: inject_adapters(model, 'adalora' or 'adadora')"
            )
        self.init_r = next(iter(self.layers.values())).rank
        check_schedule(self.init_r, target_r, total_step, tinit, tfinal)
        self.target_r, self.total_step, self.tinit, self.tfinal, self.deltaT = (
            target_r,
            total_step,
            tinit,
            tfinal,
            deltaT,
        )
        self.beta1, self.beta2 = beta1, beta2
        self.init_budget = self.init_r * len(self.layers)
        self.target_budget = target_r * len(self.layers)
        self.final_mask = None
        # the importance of every A, B and E lives in two flat buffers (one EMA step is then a few
        # kernels for the whole model); sensitivity[key] and uncertainty[key] are views into them.
        # rank_of[k] is the rank element k scores for, weight[k] turns a sum into AdaLoRA's mean:
        # a rank's score = score(E_i) + mean_j score(A_ij) + mean_j score(B_ji)
        tensors, first = self._tensors(), next(iter(self.layers.values())).lora_E
        dt, dev = compute_dtype(first), first.device
        n = sum(p.numel() for _, p in tensors)
        self._sensitivity, self._uncertainty = (
            torch.zeros(n, dtype=dt, device=dev),
            torch.zeros(n, dtype=dt, device=dev),
        )
        self.sensitivity, self.uncertainty, rank_of, weight, offset, rank0 = {}, {}, [], [], 0, 0
        for (key, p), role in zip(tensors, ["lora_A", "lora_B", "lora_E"] * len(self.layers)):
            self.sensitivity[key] = self._sensitivity[offset : offset + p.numel()].view(p.shape)
            self.uncertainty[key] = self._uncertainty[offset : offset + p.numel()].view(p.shape)
            r = p.shape[0] if role != "lora_B" else p.shape[1]
            ranks = torch.arange(rank0, rank0 + r, device=dev)
            if role == "lora_A":  # (r, in): row i scores rank i, 1/in of its mean
                rank_of.append(ranks.repeat_interleave(p.shape[1])), weight.append(1 / p.shape[1])
            elif role == "lora_B":  # (out, r): column i scores rank i
                rank_of.append(ranks.repeat(p.shape[0])), weight.append(1 / p.shape[0])
            else:
                rank_of.append(ranks), weight.append(1.0)
                rank0 += r
            offset += p.numel()
        self._rank_of = torch.cat(rank_of)
        self._weight = torch.cat(
            [torch.full((len(i),), w, dtype=dt, device=dev) for i, w in zip(rank_of, weight)]
        )
        self._total_rank = rank0

    def budget(self, step):
        """(total ranks allowed at `step`, whether to mask at this step)."""
        if step <= self.tinit:
            return self.init_budget, False
        if step >= self.total_step - self.tfinal:
            return self.target_budget, True
        progress = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        return int(
            (self.init_budget - self.target_budget) * progress**3 + self.target_budget
        ), step % self.deltaT == 0

    def _tensors(self):
        """[(key, parameter)] of every A, B and E, in a fixed order."""
        return [
            (f"{n}.{p}", getattr(layer, p))
            for n, layer in self.layers.items()
            for p in ("lora_A", "lora_B", "lora_E")
        ]

    @torch.no_grad()
    def update_importance(self):
        """One EMA step of sensitivity and uncertainty for every A, B, E at once: a few kernels over
        the flat buffers (no per-layer Python loop, no host sync). A tensor the loss did not reach
        (no gradient) keeps its importance, as in peft."""
        named = self._tensors()
        tensors = [p for _, p in named]
        missing = [k for k, p in named if p.grad is None]
        if len(missing) == len(named):
            return
        kept = [(self.sensitivity[k].clone(), self.uncertainty[k].clone()) for k in missing]
        params = torch.cat([p.reshape(-1) for p in tensors]).to(self._sensitivity.dtype)
        grads = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in tensors]
        )
        ipt = (params * grads.to(params.dtype)).abs_()  # I = |p ⊙ ∇p|
        self._sensitivity.mul_(self.beta1).add_(ipt, alpha=1 - self.beta1)  # Ī <- β1 Ī + (1 - β1) I
        self._uncertainty.mul_(self.beta2).add_(
            (ipt - self._sensitivity).abs_(), alpha=1 - self.beta2
        )  # |I - Ī|
        for k, (sens, unc) in zip(missing, kept):
            self.sensitivity[k].copy_(sens), self.uncertainty[k].copy_(unc)

    def flat_rank_scores(self):
        """(total ranks,) the score of every rank of every layer, in layer order: one index_add."""
        scores = torch.zeros(self._total_rank, dtype=self._sensitivity.dtype, device=self._sensitivity.device)
        return scores.index_add_(0, self._rank_of, self._sensitivity * self._uncertainty * self._weight)

    def rank_scores(self):
        """{layer: (r,) score of each rank}."""
        return dict(
            zip(self.layers, self.flat_rank_scores().split([layer.rank for layer in self.layers.values()]))
        )

    @torch.no_grad()
    def mask_to_budget(self, budget):
        """Zero the E entries of the (total - budget) lowest-scoring ranks over all layers. PEFT and
        QingruZhang/AdaLoRA mask score <= kthvalue; taking exactly the k lowest keeps the count exact under ties."""
        flat = self.flat_rank_scores()
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[torch.argsort(flat)[: len(flat) - budget]] = False
        masks = dict(zip(self.layers, keep.split([layer.rank for layer in self.layers.values()])))
        self.apply_mask(masks)
        return masks

    @torch.no_grad()
    def apply_mask(self, masks):
        """E <- E ⊙ mask for every layer in one _foreach op."""
        E = [self.layers[n].lora_E for n in masks]
        keep = torch.cat(list(masks.values())).to(E[0].device, E[0].dtype).split([e.numel() for e in E])
        torch._foreach_mul_(E, list(keep))

    def update_and_allocate(self, step):
        """After optimizer.step(), before zero_grad(). Returns the budget in force. As peft's
        AdaLoraModel.update_and_allocate: the importance is updated only while step < total_step -
        tfinal; at that step the final mask is built from it, and re-applied at every later step."""
        final_step = self.total_step - self.tfinal
        if self.final_mask is not None and step > final_step:
            self.apply_mask(self.final_mask)  # re-applied every step: masked E would regrow
            return self.target_budget
        if step < final_step:
            self.update_importance()
        budget, mask_now = self.budget(step)
        if mask_now:
            masks = self.mask_to_budget(budget)
            if step >= final_step:
                self.final_mask = masks
        return budget

    def finalize(self):
        """Make the final allocation what the model holds, however far the schedule got: a run that
        stops before total_step - tfinal (tfinal = 0 stops one step short of it) gets the final mask
        now, from the importance so far; one past it has its final mask re-applied."""
        if self.final_mask is None:
            self.update_and_allocate(self.total_step - self.tfinal)
        else:
            self.apply_mask(self.final_mask)
        return self.final_mask

    def state_dict(self):
        return {
            "sensitivity": self.sensitivity,
            "uncertainty": self.uncertainty,
            "final_mask": self.final_mask,
        }

    def load_state_dict(self, state):
        """Into the flat buffers the scores come from (the dicts hold views of them)."""
        for mine, saved in (
            (self.sensitivity, state["sensitivity"]),
            (self.uncertainty, state["uncertainty"]),
        ):
            for key, t in saved.items():
                mine[key].copy_(t)
        self.final_mask = state["final_mask"]


def _stacked_by_shape(tensors):
    """Same-shaped tensors stacked into one batch per shape (a differentiable copy): the batched ops
    below then cost a few kernels per shape instead of a few per layer."""
    groups = {}
    for t in tensors:
        groups.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)
    return [torch.stack(g) for g in groups.values()]


def orthogonal_regularization(model):
    """Mean over every AdaLoRA A and B of ‖A Aᵀ - I‖_F and ‖Bᵀ B - I‖_F (peft's AdaLoraModel.forward),
    keeping P = B and Q = A near-orthogonal as in the SVD they stand for. Added to the loss × weight.
    Layers of the same shape are stacked: one batched product per shape."""
    layers = [m for m in adapter_layers(model).values() if isinstance(m, AdaLoRALinear) and m.rank > 0]
    if not layers:
        raise AdapterError("orthogonal_regularization needs AdaLoRA layers in the model")
    terms = []
    with autocast_off(layers[0].lora_A.device.type):  # in the factors' precision, not autocast's
        for factors in (
            _stacked_by_shape([m.lora_A for m in layers]),
            _stacked_by_shape([m.lora_B.T for m in layers]),
        ):
            for F_ in factors:  # (n, r, k): ‖F Fᵀ - I‖_F per layer
                eye = torch.eye(F_.shape[1], device=F_.device, dtype=F_.dtype)
                terms.append(torch.linalg.matrix_norm(F_ @ F_.transpose(1, 2) - eye))
        return torch.cat(terms).mean()


class AdaLoRA(Family):
    """lora_rank is the initial rank; RankAllocator lowers the budget to adalora_target_r per layer on
    average (PEFT's schedule), after every optimizer step. finish: only the ranks with E != 0,
    adapter_pruned.safetensors."""

    kind, layer = "adalora", AdaLoRALinear
    prune_key = "adalora_prune"
    examples = {"": dict(adalora_target_r=2, adalora_tinit=2, adalora_tfinal=4, adalora_deltaT=2)}
    rank_pattern, ranks_from = False, "lora_rank and the allocator"
    keys = {
        "adalora_target_r": (4, "[1, inf)", "average rank per layer at the end"),
        "adalora_tinit": (0, "[0, inf)", "iterations at the full budget"),
        "adalora_tfinal": (0, "[0, inf)", "final iterations at the target budget, mask fixed"),
        "adalora_deltaT": (10, "[1, inf)", "iterations between two allocations"),
        "adalora_beta1": (0.85, "[0, 1)", "EMA of the sensitivity"),
        "adalora_beta2": (0.85, "[0, 1)", "EMA of the uncertainty"),
        "adalora_orth_reg_weight": (
            0.5,
            "[0, inf)",
            "weight of the orthogonality regulariser on A and B (peft's default)",
        ),
        "adalora_prune": (
            True,
            None,
            "at the end, save adapter_pruned.safetensors holding only the ranks with E != 0",
        ),
    }
    schedule_keys = ("adalora_tinit", "adalora_tfinal")

    def check(self):
        super().check()
        c = self.c
        check_schedule(
            c["lora_rank"], c["adalora_target_r"], c["max_iters"], c["adalora_tinit"], c["adalora_tfinal"]
        )

    def layer_settings(self):
        c = self.c
        return dict(rank=c["lora_rank"], alpha=c["lora_alpha"], dropout=c["lora_dropout"])

    def optimizers(self, model, lr, betas, weight_decay, device_type):
        c = self.c
        self.allocator = RankAllocator(
            model,
            c["adalora_target_r"],
            c["max_iters"],
            c["adalora_tinit"],
            c["adalora_tfinal"],
            c["adalora_deltaT"],
            c["adalora_beta1"],
            c["adalora_beta2"],
        )
        self.budget = self.allocator.init_budget
        return super().optimizers(model, lr, betas, weight_decay, device_type)

    def extra_loss(self, model):
        weight = self.c["adalora_orth_reg_weight"]
        return weight * orthogonal_regularization(model) if weight > 0 else None

    def before_step(self, model, it):
        self.budget = self.allocator.budget(it)[0]
        if it >= self.c["max_iters"]:
            self.allocator.finalize()  # the final mask is what the last eval sees and every save holds

    def after_step(self, model, it):
        self.budget = self.allocator.update_and_allocate(it)  # PEFT's order: after step(), before zero_grad()

    def stats(self, model):
        return dict(rank_budget=self.budget, **rank_report(model))

    peft_import = ("ADALORA", False)
    peft_parts = dict(Family.peft_parts, E="lora_E")
    peft_numbers = dict(Family.peft_numbers, init_r=12)
    peft_ranks_as_configured = False

    @classmethod
    def from_peft(cls, config, rank, alpha):
        """ΔW = B diag(E) A · alpha / ranknum, ranknum the initial rank (PEFT adds 1e-5 to it)."""
        return dict(rank=rank, ranknum=config.get("init_r", 12), alpha=float(config.get("lora_alpha", 8)))

    @classmethod
    @torch.no_grad()
    def peft_native(cls, model, info, config):
        """PEFT's AdaLoRA: every layer's A, B and E (as (r, 1)) sliced to the ranks with E != 0, its mask
        in rank_pattern (a layer with none keeps one rank at E = 0: PEFT cannot hold rank 0), init_r the
        initial rank. PEFT scales by alpha / (ranknum + 1e-5), this repo by alpha / ranknum."""
        pattern, tensors = {}, {}
        for name, layer in adapter_layers(model).items():
            keep = layer.lora_E != 0
            keep[0] |= not keep.any()
            pattern[f"{name}.lora_E"] = keep.tolist()
            tensors[name] = {
                "lora_A": layer.lora_A[keep],
                "lora_B": layer.lora_B[:, keep],
                "lora_E": layer.lora_E[keep][:, None],
            }
        c = {k: config.get(k, v[0]) for k, v in cls.keys.items()}
        fields = dict(
            peft_type="ADALORA",
            init_r=info["settings"]["rank"],
            lora_alpha=info["settings"]["alpha"],
            target_r=c["adalora_target_r"],
            tinit=c["adalora_tinit"],
            tfinal=c["adalora_tfinal"],
            deltaT=c["adalora_deltaT"],
            beta1=c["adalora_beta1"],
            beta2=c["adalora_beta2"],
            orth_reg_weight=c["adalora_orth_reg_weight"],
            total_step=config.get("max_iters", 1),
            rank_pattern=pattern,
        )
        return fields, tensors

    def state_dict(self):
        return {"allocator": self.allocator.state_dict()}

    def load_state_dict(self, state):
        self.allocator.load_state_dict(state["allocator"])


class AdaDoRA(AdaLoRA):
    kind, layer = "adadora", AdaDoRALinear
    peft_import = None  # PEFT's AdaLoRA has no DoRA

    @classmethod
    def peft_native(cls, model, info, config):
        raise AdapterError(
            "PEFT's AdaLoRA has no DoRA magnitude: adadora leaves as the DoRA it computes "
            "(--peft_format=lora)"
        )


# -----------------------------------------------------------------------------
# Rotational PiSSA: SVD-initialised principal adapter, trained through rotations


# QLoRA's 16 NormalFloat-4 levels (Dettmers et al. 2023, appendix E; bitsandbytes' NF4 table)
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)


def nf4_quantize(w, block_size=64):
    """Block-wise absmax NF4: each block of `block_size` values is divided by its absmax and rounded to
    the nearest NF4 level. Returns (codes uint8 (numel,), absmax fp32 (blocks,)); plain torch, any device."""
    flat = w.detach().float().reshape(-1)
    pad = (-flat.numel()) % block_size
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1).clamp_min(1e-12)
    levels = NF4_LEVELS.to(flat.device)
    codes = ((blocks / absmax[:, None])[..., None] - levels).abs().argmin(dim=-1)
    return codes.reshape(-1)[: flat.numel()].to(torch.uint8), absmax


def nf4_dequantize(codes, absmax, shape, block_size=64):
    pad = (-codes.numel()) % block_size
    values = NF4_LEVELS.to(absmax.device)[torch.cat([codes.long(), codes.new_zeros(pad).long()])]
    return (values.view(-1, block_size) * absmax[:, None]).reshape(-1)[: codes.numel()].view(shape)


def round_robin_pairs(r):
    """r - 1 rounds (r even; r rounds of an r+1 circle when odd) of disjoint index pairs covering every
    pair once: the circle method. Returns a (rounds, pairs, 2) long tensor."""
    n = r + r % 2
    players = list(range(n))
    rounds = []
    for _ in range(n - 1):
        pairs = [(players[i], players[n - 1 - i]) for i in range(n // 2)]
        rounds.append([p for p in pairs if max(p) < r])  # drop the odd r's dummy player
        players = [players[0], players[-1], *players[1:-1]]
    return torch.tensor(rounds, dtype=torch.long)


class Rotation(nn.Module):
    """An r x r rotation from trainable parameters, one of PiSSA's four ways:
    way0 free matrix (init I; orthogonal only through a penalty), way1 product of Givens rotations,
    way2 Cayley map of a low-rank skew-symmetric K = B Cᵀ - C Bᵀ, way3 matrix exponential of T - Tᵀ.
    Ways 1-3 are exactly orthogonal for any parameter value."""

    def __init__(self, r, method="way0", skew_rank=4, init_identity=True, device=None):
        super().__init__()
        self.r, self.method = r, method
        noise = 0.0 if init_identity else 0.1
        kw = dict(device=device)
        if method == "way0":
            self.matrix = nn.Parameter(torch.eye(r, **kw) + noise * torch.randn(r, r, **kw))
        elif method == "way1":  # angles of r - 1 rounds of disjoint Givens pairs: r (r - 1) / 2 = dim SO(r)
            table = round_robin_pairs(r)
            self.register_buffer("pairs", table.to(device), persistent=False)
            # each round's Givens matrix as elementwise ops on fixed tables (no scatter: torch.compile
            # fuses it): row i of round k holds cos θ on the diagonal and ∓sin θ at its partner's column
            rounds, pairs = table.shape[:2]
            angle_of_row = torch.full((rounds, r), pairs, dtype=torch.long)  # index `pairs`: a zero angle
            sign = torch.zeros(rounds, r)
            partner = torch.zeros(rounds, r, r)
            for k, round_pairs in enumerate(table.tolist()):
                for p, (i, j) in enumerate(round_pairs):
                    angle_of_row[k, i] = angle_of_row[k, j] = p
                    sign[k, i], sign[k, j] = -1.0, 1.0
                    partner[k, i, j] = partner[k, j, i] = 1.0
            self.register_buffer("angle_of_row", angle_of_row.to(device), persistent=False)
            self.register_buffer("givens_sign", sign.to(device), persistent=False)
            self.register_buffer("givens_partner", partner.to(device), persistent=False)
            self.angles = nn.Parameter(noise * torch.randn(self.pairs.shape[:2], **kw))
        elif method == "way2":  # C = 0: K = 0 at init; B random so that C gets a gradient
            k = min(skew_rank, r)
            self.skew_B = nn.Parameter(torch.randn(r, k, **kw) / math.sqrt(r))
            self.skew_C = nn.Parameter(noise * torch.randn(r, k, **kw))
        elif method == "way3":
            self.generator = nn.Parameter(noise * torch.randn(r, r, **kw))
        else:
            raise AdapterError(f"pissa method must be way0, way1, way2 or way3, got {method!r}")

    def forward(self):
        """R (r, r)."""
        if self.method == "way0":
            return self.matrix
        if self.method == "way1":  # each round as an r x r matrix, then their product as a balanced tree
            theta = F.pad(self.angles, (0, 1)).gather(1, self.angle_of_row)  # (rounds, r): each row's angle
            eye = torch.eye(self.r, device=theta.device, dtype=theta.dtype)
            G = (
                torch.cos(theta)[..., None] * eye
                + (self.givens_sign * torch.sin(theta))[..., None] * self.givens_partner
            )
            while G.shape[0] > 1:  # R = G_{n-1} ... G_1 G_0: round 0 acts first
                even = G.shape[0] // 2 * 2
                G = torch.cat([G[1:even:2] @ G[0:even:2], G[even:]])
            return G[0]
        if self.method == "way2":  # Cayley: (I - K)^-1 (I + K), exactly orthogonal (I + K alone is not)
            B, C = self.skew_B.double(), self.skew_C.double()
            K = B @ C.T - C @ B.T
            eye = torch.eye(self.r, dtype=K.dtype, device=K.device)
            return torch.linalg.solve(eye - K, eye + K).to(self.skew_B.dtype)
        T = self.generator.double()  # way3: exp of T - Tᵀ in fp64, cast once
        return torch.linalg.matrix_exp(T - T.T).to(self.generator.dtype)

    def orthogonality_error(self):
        R = self().double()
        return torch.linalg.matrix_norm(R.T @ R - torch.eye(self.r, dtype=R.dtype, device=R.device))


PISSA_COMPONENTS = ("major", "minor", "olora")


def principal_part(W, rank, components="major", svd="full", niter=4):
    """The rank-r part of W (out, in) the adapter starts from, as (U (out, r), S (r,), V (in, r)) with
    orthonormal U, V: 'major' the top r singular triplets (PiSSA; svd='lowrank' finds them by the
    randomized SVD), 'minor' the r smallest (MiLoRA, Wang et al. 2024), 'olora' the first r columns of
    W's QR, Q_r R_r (OLoRA, Büyükakyüz 2024), written through the SVD of R_r. Each reads W alone."""
    if components == "olora":
        Q, R = torch.linalg.qr(W)
        Ur, S, Vh = torch.linalg.svd(R[:rank], full_matrices=False)
        return Q[:, :rank] @ Ur, S, Vh.T
    if svd == "lowrank":  # randomized (Halko et al.), q = r as in peft's pissa_niter_N
        return torch.svd_lowrank(W, q=rank, niter=niter)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    keep = slice(0, rank) if components == "major" else slice(S.shape[0] - rank, S.shape[0])
    return U[:, keep], S[keep], Vh[keep].T


class RotationalPiSSALinear(AdapterLinear):
    """Rotational PiSSA: W = U S Vᵀ (SVD), principal part P(θ) = s · U_r R_U diag(S_r) R_Vᵀ V_rᵀ with
    U_r, V_r frozen and R_U, R_V (and S_r) trained; W' = W_res + P(θ), W_res = W - P(θ₀) frozen.
    The base keeps W and the layer adds P(θ) - P(θ₀) through its factors (rank <= 2r): the same W',
    with no separate W_res tensor, so adapter files apply to the original base and a head tied to the
    embedding stays tied. quantize_residual stores W_res in NF4 instead and computes
    deq(W_res) x + P(θ) x. The principal factors never form a dense matrix in the forward."""

    def __init__(
        self,
        base: nn.Linear,
        rank=8,
        alpha=8.0,
        dropout=0.0,
        method="way0",
        init_identity=True,
        freeze_singular_values=False,
        quantize_residual=False,
        quantize_base_components=False,
        svd="full",
        svd_niter=4,
        skew_rank=4,
        components="major",
    ):
        super().__init__(base, dropout)
        check_rank(rank, base)
        if svd not in ("full", "lowrank"):
            raise AdapterError(f"pissa svd must be 'full' or 'lowrank', got {svd!r}")
        self.rank, self.scaling, self.method = rank, alpha / rank, method
        t0 = time.perf_counter()
        W = base.weight.detach().to(compute_dtype(base.weight))  # fp64 models: an fp64 decomposition
        U, S, V = principal_part(W, rank, components, svd, svd_niter)
        self.init_seconds = time.perf_counter() - t0
        if quantize_base_components:  # U and V as their NF4 round trip; W_res absorbs the difference
            U, V = (nf4_dequantize(*nf4_quantize(M), M.shape) for M in (U, V))
        dtype = base.weight.dtype
        self.register_buffer("U", U.to(dtype).contiguous())  # (out, r)
        self.register_buffer("V", V.to(dtype).contiguous())  # (in, r)
        self.rotation_U = Rotation(rank, method, skew_rank, init_identity, device=base.weight.device)
        self.rotation_V = Rotation(rank, method, skew_rank, init_identity, device=base.weight.device)
        # trainable S holds S_r / s so that s · S is the principal part's singular values at init
        self.singular_values = nn.Parameter((S / self.scaling).to(dtype))
        if freeze_singular_values:
            self.frozen.add("singular_values")
        with torch.no_grad():  # P(θ₀) as frozen factors, kept to subtract (and to export the delta)
            B0, A0 = self.principal_factors()
        self.register_buffer("B0", B0.detach().clone())
        self.register_buffer("A0", A0.detach().clone())
        self.quantized = quantize_residual
        if quantize_residual:
            codes, absmax = nf4_quantize(W.float() - (B0.float() @ A0.float()))
            self.register_buffer("residual_codes", codes)
            self.register_buffer("residual_absmax", absmax)
            # deq(codes) as a plain (non-saved) buffer: it moves with .to(), torch.compile sees a tensor
            # and no cache key, and a load of new codes refreshes it (the hook below)
            self.register_buffer("residual_weight", self._dequantized_residual(), persistent=False)
            self.register_load_state_dict_post_hook(lambda module, keys: module.refresh_residual())

    def principal_factors(self):
        """(B_θ (out, r), A_θ (r, in)) with P(θ) = B_θ A_θ = s · U R_U diag(S) R_Vᵀ Vᵀ."""
        B = (self.U @ self.rotation_U()) * (self.singular_values * self.scaling)
        A = (self.V @ self.rotation_V()).T
        return B, A

    def factors(self):
        with autocast_off(self.U.device.type):  # in the buffers' precision: P(θ₀) cancels exactly at init
            B, A = self.principal_factors()
        if self.quantized:
            return B, A, 1.0  # the forward adds deq(W_res) x itself
        return torch.cat([B, -self.B0], dim=1), torch.cat([A, self.A0], dim=0), 1.0  # P(θ) - P(θ₀), rank 2r

    def _dequantized_residual(self):
        deq = nf4_dequantize(self.residual_codes, self.residual_absmax, self.base.weight.shape)
        return deq.to(self.base.weight.dtype)

    @torch.no_grad()
    def refresh_residual(self):
        """Rebuild deq(NF4(W_res)) after the codes changed (load_state_dict calls it)."""
        self.residual_weight = self._dequantized_residual()

    def frozen_weight(self):
        return self.residual_weight if self.quantized else self.base.weight

    def orthogonality_errors(self):
        return [self.rotation_U.orthogonality_error(), self.rotation_V.orthogonality_error()]

    @torch.no_grad()
    def fold_rotations(self):
        """U <- U R_U, V <- V R_V and the rotations back to identity: the same layer, re-centred (for
        way1, a new set of Givens angles to train on top of the old ones)."""
        self.U.copy_(self.U @ self.rotation_U())
        self.V.copy_(self.V @ self.rotation_V())
        for rot in (self.rotation_U, self.rotation_V):
            for name, p in rot.named_parameters():
                if name == "matrix":
                    p.copy_(torch.eye(self.rank, device=p.device, dtype=p.dtype))
                elif name != "skew_B":
                    p.zero_()

    @torch.no_grad()
    def as_lora(self):
        """ΔW = P(θ) - P(θ₀) as a plain LoRA of rank 2r on the original base weight."""
        if self.quantized:
            raise AdapterError(
                "a PiSSA layer with an NF4 residual computes deq(W_res) x, which no LoRA on the original "
                "weights reproduces; export a run trained with pissa_quantize_residual=False"
            )
        return super().as_lora()

    def extra_repr(self):
        return f"rank={self.rank}, method={self.method}, scaling={self.scaling:g}, quantized={self.quantized}"


def rotation_penalty(model):
    """way0's penalty: the mean over every rotation of ‖RᵀR - I‖²_F (added to the loss × weight), all
    rotations of one size in one batched product."""
    rotations = [
        rot()
        for layer in adapter_layers(model).values()
        if isinstance(layer, RotationalPiSSALinear)
        for rot in (layer.rotation_U, layer.rotation_V)
    ]
    if not rotations:
        raise AdapterError("rotation_penalty needs Rotational PiSSA layers in the model")
    terms = []
    with autocast_off(rotations[0].device.type):  # in the rotations' precision, not autocast's
        for R in _stacked_by_shape(rotations):  # (n, r, r)
            eye = torch.eye(R.shape[1], device=R.device, dtype=R.dtype)
            terms.append((R.transpose(1, 2) @ R - eye).pow(2).sum((1, 2)))
        return torch.cat(terms).mean()


def max_orthogonality_error(model):
    """The largest ‖RᵀR - I‖_F over every rotation of every PiSSA layer."""
    with torch.no_grad():
        return max(
            float(e)
            for layer in adapter_layers(model).values()
            if isinstance(layer, RotationalPiSSALinear)
            for e in layer.orthogonality_errors()
        )


@dataclass
class RotationalPiSSAConfig:
    r: int = 8
    lora_alpha: float = 8.0  # scaling s = lora_alpha / r
    method: str = "way0"  # way0 | way1 | way2 | way3
    orthogonality_reg_weight: float = 1e-2  # way0's penalty weight (rotation_penalty)
    init_identity: bool = True
    freeze_singular_values: bool = False
    quantize_residual: bool = False
    quantize_base_components: bool = False
    svd: str = "full"  # 'full' | 'lowrank' (torch.svd_lowrank)
    svd_niter: int = 4
    skew_rank: int = 4  # way2's rank of K
    lora_dropout: float = 0.0

    def layer_settings(self):
        return dict(
            rank=self.r,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            method=self.method,
            init_identity=self.init_identity,
            freeze_singular_values=self.freeze_singular_values,
            quantize_residual=self.quantize_residual,
            quantize_base_components=self.quantize_base_components,
            svd=self.svd,
            svd_niter=self.svd_niter,
            skew_rank=self.skew_rank,
        )


def replace_linear_with_rotational_pissa(
    model, pissa_config, target_modules=None, adapter_name="default", freeze_base_model=True
):
    """PEFT-style entry point (RotationalPiSSAConfig as a PEFT config): inject Rotational PiSSA into `target_modules` and return the new
    layers by name. One adapter per layer, so adapter_name must stay 'default'. freeze_base_model=False
    leaves trainable what was trainable before."""
    if adapter_name != "default":
        raise AdapterError("one adapter per layer: adapter_name must be 'default'")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    names = inject_adapters(model, "pissa", targets=target_modules, **pissa_config.layer_settings())
    if not freeze_base_model:
        for p in model.parameters():
            if id(p) in trainable:
                p.requires_grad_(True)
    layers = adapter_layers(model)
    return {n: layers[n] for n in names}


class PiSSA(Family):
    """lora_rank principal directions, scaling lora_alpha / lora_rank; rotations trained in one of four
    ways. way0 adds its orthogonality penalty to the loss; pissa_fold_every folds the rotations into
    U and V."""

    kind, layer = "pissa", RotationalPiSSALinear
    rank_pattern, loraplus = False, False
    examples = {
        "way0": dict(pissa_method="way0", pissa_init_identity=False),
        "way1_fold": dict(pissa_method="way1", pissa_init_identity=False, pissa_fold_every=3),
        "way2_nf4": dict(
            pissa_method="way2", pissa_quantize_residual=True, pissa_quantize_base_components=True
        ),
        "way3_lowrank": dict(pissa_method="way3", pissa_svd="lowrank"),
        "milora": dict(pissa_method="way3", pissa_components="minor"),
        "olora": dict(pissa_method="way1", pissa_components="olora"),
    }
    keys = {
        "pissa_method": (
            "way0",
            None,
            "'way0' free R + penalty | 'way1' Givens | 'way2' Cayley low-rank skew | 'way3' exp",
        ),
        "pissa_ortho_weight": (1e-2, "[0, inf)", "way0: weight of the penalty mean ‖RᵀR - I‖²_F"),
        "pissa_init_identity": (
            True,
            None,
            "rotations start at the identity (the adapted model equals the base)",
        ),
        "pissa_freeze_singular_values": (
            False,
            None,
            "keep the r singular values fixed (train only the rotations)",
        ),
        "pissa_quantize_residual": (False, None, "W_res in 4-bit NormalFloat (QPiSSA)"),
        "pissa_quantize_base_components": (False, None, "U_r and V_r in NF4 too"),
        "pissa_svd": ("full", None, "'full' | 'lowrank' (randomized, torch.svd_lowrank)"),
        "pissa_svd_niter": (4, "[0, inf)", "power iterations of the randomized SVD"),
        "pissa_skew_rank": (4, "[1, inf)", "way2: rank of the skew-symmetric generator"),
        "pissa_fold_every": (
            0,
            "[0, inf)",
            "> 0: fold the rotations into U, V every N iterations (fresh way1 angles)",
        ),
        "pissa_components": (
            "major",
            None,
            "'major' (PiSSA) | 'minor' (MiLoRA: the smallest r) | 'olora' (QR)",
        ),
    }

    def check(self):
        super().check()
        c = self.c
        if c["pissa_components"] not in PISSA_COMPONENTS:
            raise AdapterError(
                f"pissa_components must be one of {', '.join(map(repr, PISSA_COMPONENTS))}, got {c['pissa_components']!r}"
            )
        if c["pissa_components"] != "major" and c["pissa_svd"] == "lowrank":
            raise AdapterError(
                f"pissa_svd='lowrank' finds the major components only; pissa_components={c['pissa_components']!r} "
                "needs --pissa_svd=full"
            )

    def layer_settings(self):
        c = self.c
        return dict(
            rank=c["lora_rank"],
            alpha=c["lora_alpha"],
            dropout=c["lora_dropout"],
            method=c["pissa_method"],
            init_identity=c["pissa_init_identity"],
            freeze_singular_values=c["pissa_freeze_singular_values"],
            quantize_residual=c["pissa_quantize_residual"],
            quantize_base_components=c["pissa_quantize_base_components"],
            svd=c["pissa_svd"],
            svd_niter=c["pissa_svd_niter"],
            skew_rank=c["pissa_skew_rank"],
            components=c["pissa_components"],
        )

    def inject(self, model):
        model, info = super().inject(model)
        times = {n: m.init_seconds for n, m in adapter_layers(model).items()}
        slowest = max(times, key=times.get)
        self.say(
            f"pissa: {self.c['pissa_components']} components ({self.c['pissa_svd']} SVD) of {len(times)} layers in {sum(times.values()):.3f}s "
            f"(slowest {slowest}, {1000 * times[slowest]:.1f}ms)"
        )
        return model, info

    def extra_loss(self, model):
        weight = self.c["pissa_ortho_weight"] if self.c["pissa_method"] == "way0" else 0.0
        return weight * rotation_penalty(model) if weight > 0 else None

    def after_step(self, model, it):
        if self.c["pissa_fold_every"] and (it + 1) % self.c["pissa_fold_every"] == 0:
            for layer in adapter_layers(model).values():
                layer.fold_rotations()

    def stats(self, model):
        return {"max_orthogonality_error": max_orthogonality_error(model)}

    @classmethod
    def unboundable(cls, config):
        if config.get("pissa_fold_every"):
            return (
                "pissa_fold_every > 0 folded the learned rotations into the frozen U and V, which the message "
                "does not carry (the receiver's model would differ); bound a run trained with pissa_fold_every=0"
            )
        return None


# -----------------------------------------------------------------------------
# SubLoRA: LoRA inside a random subspace (Lotfi et al. 2024), for compression bounds


class _DenseProject(torch.autograd.Function):
    """z (d,) -> P z (D,) with P Gaussian / sqrt(D), regenerated chunk by chunk in both passes."""

    @staticmethod
    def forward(ctx, z, projector):
        ctx.projector = projector
        return torch.cat([block @ z for block in projector.blocks(z)])

    @staticmethod
    def backward(ctx, grad):
        blocks = ctx.projector.blocks(grad)
        out, start = torch.zeros(ctx.projector.d, device=grad.device, dtype=grad.dtype), 0
        for block in blocks:
            out += grad[start : start + block.shape[0]] @ block
            start += block.shape[0]
        return out, None


class DenseProjector(nn.Module):
    """P in R^{D x d}, i.i.d. N(0, 1/D): E‖P z‖² = ‖z‖². Every block of rows is drawn from seed +
    block index by the CPU generator, so P is the same on every device. When D·d floats fit in
    cache_bytes, P is drawn once and kept as a (non-saved) buffer on the model's device: one
    matrix-vector product per pass, the speed a GPU needs. Otherwise it is never stored: each block is
    drawn again whenever it is used (D·d floats would not fit for large models)."""

    def __init__(self, D, d, seed, rows_per_block=4096, cache_bytes=4 << 30):
        super().__init__()
        self.D, self.d, self.seed, self.rows = D, d, seed, rows_per_block
        cached = D * d * 4 <= cache_bytes
        self.register_buffer(
            "matrix", torch.cat(list(self.blocks(torch.empty(0)))) if cached else None, persistent=False
        )

    def blocks(self, like):
        for k, start in enumerate(range(0, self.D, self.rows)):
            gen = torch.Generator().manual_seed(self.seed * 100003 + k)
            rows = min(self.rows, self.D - start)
            yield (torch.randn(rows, self.d, generator=gen) / math.sqrt(self.D)).to(like.device, like.dtype)

    def forward(self, z):
        if self.matrix is not None:
            return self.matrix.to(z.dtype) @ z
        return _DenseProject.apply(z, self)


class SparseProjector(nn.Module):
    """Each column has ⌈√D⌉ non-zeros of ±D^(-1/4) at random rows (Li et al. 2018's sparse
    projection): about √D·d non-zeros, columns of norm ≈ 1."""

    def __init__(self, D, d, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        per_col = math.ceil(math.sqrt(D))
        self.D, self.d = D, d
        self.register_buffer("rows", torch.randint(D, (d * per_col,), generator=gen), persistent=False)
        self.register_buffer("cols", torch.arange(d).repeat_interleave(per_col), persistent=False)
        signs = torch.randint(2, (d * per_col,), generator=gen).float() * 2 - 1
        self.register_buffer("values", signs * D**-0.25, persistent=False)

    def forward(self, z):
        return z.new_zeros(self.D).index_add(0, self.rows, self.values.to(z.dtype) * z[self.cols])


class RdKronQRProjector(nn.Module):
    """The SubLoRA code's default: a row permutation of blockdiag(Q1 ⊗ Q2, E) with Q1, Q2 in
    R^{D1 x d1} (D1 ≈ √D, d1 = ⌊√d⌋) and E for the remaining rows and columns, every block
    QR-orthonormalised, so P has orthonormal columns: ‖P z‖ = ‖z‖. (Q1 ⊗ Q2) z costs two small
    matmuls on z reshaped to d1 x d1: Q1 Z Q2ᵀ, O(√D·d + D·√d)."""

    def __init__(self, D, d, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        d1 = math.isqrt(d)
        D1 = math.isqrt(D)
        while D1 > d1 and D - D1 * D1 < d - d1 * d1:  # leave enough rows for the remainder block
            D1 -= 1
        if D1 < d1 or D - D1 * D1 < d - d1 * d1:
            raise AdapterError(f"intrinsic dimension {d} is too large for {D} LoRA parameters")
        self.D, self.d, self.d1 = D, d, d1
        orthonormal = lambda rows, cols: torch.linalg.qr(torch.randn(rows, cols, generator=gen))[0]  # noqa: E731
        self.register_buffer("Q1", orthonormal(D1, d1), persistent=False)
        self.register_buffer("Q2", orthonormal(D1, d1), persistent=False)
        rest_rows, rest_cols = D - D1 * D1, d - d1 * d1
        E = orthonormal(rest_rows, rest_cols) if rest_cols else torch.zeros(rest_rows, 0)
        self.register_buffer("E", E, persistent=False)
        self.register_buffer("perm", torch.randperm(D, generator=gen), persistent=False)

    def forward(self, z):
        Z = z[: self.d1 * self.d1].view(self.d1, self.d1)
        kron = (self.Q1.to(z.dtype) @ Z @ self.Q2.to(z.dtype).T).reshape(-1)  # (Q1 ⊗ Q2) vec(Z)
        rest = self.E.to(z.dtype) @ z[self.d1 * self.d1 :]
        return torch.cat([kron, rest])[self.perm]


PROJECTORS = {"dense": DenseProjector, "sparse": SparseProjector, "rdkronqr": RdKronQRProjector}


def _block_of(name):
    """'transformer.h.3.attn.c_attn.lora_A' -> 'transformer.h.3'; layers outside blocks -> 'head'."""
    parts = name.split(".")
    index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return ".".join(parts[: index + 1]) if index is not None else "head"


def spread_dims(d, caps):
    """d coordinates over blocks in proportion to their sizes `caps` (at least 2 each, the last takes
    the remainder); where that leaves a block outside 2..its size, 2 each and the rest filled in
    proportion, what a full block cannot take going to the blocks with room."""
    n = len(caps)
    if not 2 * n <= d <= sum(caps):
        raise AdapterError(
            f"intrinsic_dim {d} does not fit {n} blocks in learned mode: it must be in {2 * n}..{sum(caps)}"
        )
    dims = [max(2, d * c // sum(caps)) for c in caps]
    dims[-1] = d - sum(dims[:-1])
    if all(2 <= k <= c for k, c in zip(dims, caps)):
        return dims
    dims = [min(c, 2 + (d - 2 * n) * c // sum(caps)) for c in caps]
    while sum(dims) < d:  # at most n passes: each one fills a block or places everything
        room = [c - k for k, c in zip(dims, caps)]
        left = d - sum(dims)
        k = max(range(n), key=lambda i: room[i])
        dims[k] += min(room[k], left)
    return dims


class SubLoRA(nn.Module):
    """Trains only w in R^d: the LoRA factors of `model` are θ = θ₀ + P w, written into the network
    with torch.func.functional_call. θ₀ (the LoRA init, A Kaiming-uniform, B = 0) and P come from
    `seed`, so only w (and the learned mode's gates) need to be stored or encoded.

    allocation_mode: 'uniform' one projector over [A; B]; 'fixed' the first d_A = d - d_B coordinates
    feed all A factors, the last d_B = round(allocation_ratio · d) all B factors; 'learned' splits w
    over blocks (d_ℓ ∝ the block's LoRA size; the head is its own block) and routes coordinate i of
    block ℓ to B by the soft mask m_i = sigmoid(C (γ_ℓ d_ℓ - i)), γ_ℓ = sigmoid(gate logit ℓ), and to A
    by 1 - m_i, so the A/B split of each block is learned with w."""

    def __init__(
        self,
        model,
        intrinsic_dim,
        projector="rdkronqr",
        allocation_mode="uniform",
        allocation_ratio=0.5,
        seed=0,
        gate_sharpness=10.0,
        gate_grad_width=0.1,
    ):
        super().__init__()
        lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not lora or not all(n.endswith((".lora_A", ".lora_B")) for n, _ in lora):
            raise AdapterError(
                "SubLoRA wraps a model whose only trainable parameters are LoRA factors: "
                "inject_adapters(model, 'lora', ...) first, embeddings frozen"
            )
        if projector not in PROJECTORS:
            raise AdapterError(f"projector must be one of {sorted(PROJECTORS)}, got {projector!r}")
        if allocation_mode not in ("uniform", "fixed", "learned"):
            raise AdapterError(f"allocation_mode must be uniform, fixed or learned, got {allocation_mode!r}")
        if not 0 <= gate_grad_width <= 1:
            raise AdapterError(
                f"gate_grad_width is a share of a block's coordinates, in [0, 1]; got {gate_grad_width}"
            )
        self.model = model
        self.mode = allocation_mode
        self.sharpness = gate_sharpness
        self.gate_grad_width = gate_grad_width
        device = lora[0][1].device  # everything below is built on the device of the factors it drives
        gen = torch.Generator().manual_seed(seed)
        for name, p in lora:  # θ₀ from the seed alone: A Kaiming-uniform (bound 1/√fan_in), B = 0
            p.requires_grad_(False)
            with torch.no_grad():
                if name.endswith("lora_A"):
                    p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) / math.sqrt(p.shape[1]))
                else:
                    p.zero_()
        self.a_names = [n for n, _ in lora if n.endswith("lora_A")]
        self.b_names = [n for n, _ in lora if n.endswith("lora_B")]
        self.shapes = {n: p.shape for n, p in lora}
        self.D = self._size(self.a_names) + self._size(self.b_names)
        d = intrinsic_dim
        if not 2 <= d <= self.D:
            raise AdapterError(f"intrinsic_dim must be in 2..{self.D} (the LoRA parameter count), got {d}")
        make = lambda D, k, i: PROJECTORS[projector](D, k, seed * 1000 + i)  # noqa: E731
        self.projectors = self._projectors(d, make, allocation_ratio)
        if allocation_mode == "learned":
            self.gate_logits = nn.Parameter(torch.zeros(len(self.blocks), device=device))
        self.projectors.to(device)
        self.w = nn.Parameter(torch.zeros(d, device=device))
        # the gradients reaching the A and B factors are kept on every eager training pass (two
        # D-sized vectors); not under torch.compile, where a hook with a side effect breaks the graph
        self._grad_parts = None

    def _size(self, names):
        """How many LoRA numbers the factors `names` hold."""
        return sum(self.shapes[n].numel() for n in names)

    def _projectors(self, d, make, allocation_ratio):
        """The projectors of the allocation mode (make(D, d, index) builds one from the seed)."""
        size = self._size
        if self.mode == "uniform":
            return nn.ModuleList([make(self.D, d, 0)])
        if self.mode == "fixed":
            d_b = round(allocation_ratio * d)
            if not 0 < d_b < d:
                raise AdapterError(
                    f"allocation_ratio = d_B / d = {allocation_ratio} leaves no coordinate to A or "
                    f"to B (d = {d}); choose it inside (0, 1)"
                )
            self.split = (d - d_b, d_b)
            return nn.ModuleList([make(size(self.a_names), d - d_b, 0), make(size(self.b_names), d_b, 1)])
        self.blocks = list(dict.fromkeys(_block_of(n) for n in self.a_names))
        part_sizes = [
            (
                size([n for n in self.a_names if _block_of(n) == b]),
                size([n for n in self.b_names if _block_of(n) == b]),
            )
            for b in self.blocks
        ]
        self.block_dims = spread_dims(d, [a + b for a, b in part_sizes])
        # block ℓ's coordinate i goes to B with weight m_i (high for the first ones) and to A with
        # 1 - m_i (high for the last ones); a part smaller than d_ℓ reads only its end of the block
        self.part_dims = [(min(dl, a), min(dl, b)) for dl, (a, b) in zip(self.block_dims, part_sizes)]
        projectors = nn.ModuleList()
        for k, ((a, b), (k_a, k_b)) in enumerate(zip(part_sizes, self.part_dims)):
            projectors.extend([make(a, k_a, 2 * k), make(b, k_b, 2 * k + 1)])
        return projectors

    def __getattr__(self, name):  # whatever else the wrapped model provides (get_num_params, config...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    generate = LanguageModel.generate  # the models' own sampling loop, run through this forward
    stream = LanguageModel.stream

    def gammas(self):
        """{block: γ_ℓ} in learned mode: the share of the block's coordinates routed to B."""
        return (
            dict(zip(self.blocks, torch.sigmoid(self.gate_logits).tolist())) if self.mode == "learned" else {}
        )

    def mask_args(self, logits=None):
        """C (γ_ℓ d_ℓ - i) for every block ℓ: the learned mode's masks are their sigmoids."""
        gamma = torch.sigmoid(self.gate_logits if logits is None else logits)
        return [
            self.sharpness * (g * dl - torch.arange(dl, device=g.device, dtype=g.dtype))
            for g, dl in zip(gamma, self.block_dims)
        ]

    def masks(self, logits=None):
        """Learned mode's soft masks m (one (d_ℓ,) vector per block), in (0, 1), falling with the index.
        The values are the SubLoRA code's (sublora-bounds-for-llms) m_i = sigmoid(C (γ d_ℓ - i)); that mask moves only the ~1/C
        coordinates at its edge, so its gradient in γ is the noise of one or two coordinates. With
        gate_grad_width > 0 the gradient is the one of a wider mask, sigmoid((γ - i/d_ℓ) · 4 / width),
        gathered over that share of the block (straight-through: the forward is unchanged)."""
        sharp = [torch.sigmoid(a) for a in self.mask_args(logits)]
        if not self.gate_grad_width or not torch.is_grad_enabled():
            return sharp
        gamma = torch.sigmoid(self.gate_logits if logits is None else logits)
        soft = [
            torch.sigmoid(
                (g - torch.arange(dl, device=g.device, dtype=g.dtype) / dl) * (4 / self.gate_grad_width)
            )
            for g, dl in zip(gamma, self.block_dims)
        ]
        return [m.detach() + (s - s.detach()) for m, s in zip(sharp, soft)]  # value m exactly, gradient of s

    def deltas(self, w, logits=None):
        """(P_A-part of w, P_B-part of w): the changes of all A factors and of all B factors, flattened
        in the order of a_names and b_names."""
        if self.mode == "uniform":
            delta = self.projectors[0](w)
            n_a = sum(self.shapes[n].numel() for n in self.a_names)
            return delta[:n_a], delta[n_a:]
        if self.mode == "fixed":
            w_a, w_b = w.split(self.split)
            return self.projectors[0](w_a), self.projectors[1](w_b)
        parts = {b: [] for b in self.blocks}
        for k, (w_l, m, (k_a, k_b)) in enumerate(
            zip(w.split(self.block_dims), self.masks(logits), self.part_dims)
        ):
            parts[self.blocks[k]] = (
                self.projectors[2 * k]((w_l * (1 - m))[len(m) - k_a :]),
                self.projectors[2 * k + 1]((w_l * m)[:k_b]),
            )
        # blocks appear in a_names / b_names in the same order, each block's factors contiguous
        return torch.cat([parts[b][0] for b in self.blocks]), torch.cat([parts[b][1] for b in self.blocks])

    def lora_params(self):
        """{name: θ₀ + (P w) for that factor}."""
        delta_a, delta_b = self.deltas(self.w, getattr(self, "gate_logits", None))
        if torch.is_grad_enabled() and self.w.requires_grad and not torch.compiler.is_compiling():
            self._grad_parts = [None, None]
            for i, t in enumerate((delta_a, delta_b)):
                t.register_hook(lambda g, i=i: self._keep_grad(i, g))
        params, theta0 = {}, dict(self.model.named_parameters())
        for names, delta in ((self.a_names, delta_a), (self.b_names, delta_b)):
            for n, chunk in zip(names, delta.split([self.shapes[n].numel() for n in names])):
                params[n] = theta0[n] + chunk.view(self.shapes[n])
        return params

    def _keep_grad(self, i, g):
        self._grad_parts[i] = g.detach().clone() if self._grad_parts[i] is None else self._grad_parts[i] + g

    def grad_part_norms(self):
        """(‖∂L/∂w through the A factors‖, ‖… through the B factors‖) of the last eager training step;
        None when compiled."""
        if not self._grad_parts or self._grad_parts[0] is None:
            return None
        with torch.enable_grad():
            w = self.w.detach().requires_grad_(True)
            logits = self.gate_logits.detach() if self.mode == "learned" else None
            delta_a, delta_b = self.deltas(w, logits)
            g_a = torch.autograd.grad(delta_a, w, self._grad_parts[0], retain_graph=True)[0]
            g_b = torch.autograd.grad(delta_b, w, self._grad_parts[1])[0]
        return g_a.norm().item(), g_b.norm().item()

    def forward(self, idx, targets=None, cache=None):
        return torch.func.functional_call(self.model, self.lora_params(), (idx, targets), {"cache": cache})

    @torch.no_grad()
    def materialize(self):
        """Write θ₀ + P w into the LoRA factors and return the inner model: a plain LoRA model with the
        same outputs (then merge_adapters gives a plain model)."""
        params = self.lora_params()
        for name, p in self.model.named_parameters():
            if name in params:
                p.copy_(params[name])
        return self.model


class SubLoRAFamily(Family):
    """LoRA (default targets: q and v of every block, the LM head) inside a random subspace: only w in
    R^intrinsic_dim (and the learned mode's gate logits) train; θ₀ and P come from sublora_seed. A
    random base is its setting (init_from='auto' trains one from scratch)."""

    kind = "sublora"
    loraplus = False  # w alone trains
    default_targets = ("c_attn:q,v", "query", "value", "lm_head")  # Sanaelotfi/sublora-bounds-for-llms'
    rank_pattern = False
    scratch_base = True
    examples = {
        "rdkronqr_learned": dict(intrinsic_dim=200, allocation_mode="learned"),
        "dense_uniform": dict(intrinsic_dim=64, sublora_projector="dense"),
        "sparse_fixed": dict(
            intrinsic_dim=64, sublora_projector="sparse", allocation_mode="fixed", allocation_ratio=0.3
        ),
    }
    keys = {
        "intrinsic_dim": (1000, "[1, inf)", "d: the size of the trained vector w"),
        "allocation_mode": ("uniform", None, "'uniform' | 'fixed' | 'learned'"),
        "allocation_ratio": (0.5, "[0, 1]", "fixed mode: d_B / d, the share of w that feeds the B factors"),
        "sublora_seed": (0, None, "θ₀ and P come from it"),
        "sublora_projector": ("rdkronqr", None, "'rdkronqr' | 'dense' | 'sparse'"),
        "sublora_gate_lr": (
            0.0,
            "[0, inf)",
            "learned mode: peak learning rate of the gate logits; 0 = learning_rate",
        ),
        "sublora_gate_grad_width": (
            0.1,
            None,
            "learned mode: share of a block over which a gate's gradient is gathered (0 = the SubLoRA code's)",
        ),
    }

    def inject(self, model):
        c = self.c
        if c["train_embeddings"]:
            raise AdapterError("SubLoRA trains w alone: train_embeddings must be False")
        targets = [t.strip() for t in c["lora_targets"].split(";") if t.strip()] or None
        sub = dict(
            intrinsic_dim=c["intrinsic_dim"],
            projector=c["sublora_projector"],
            allocation_mode=c["allocation_mode"],
            allocation_ratio=c["allocation_ratio"],
            seed=c["sublora_seed"],
            gate_grad_width=c["sublora_gate_grad_width"],
        )
        info = dict(
            kind=self.kind,
            targets=find_targets(model, targets, self.default_targets),
            settings=self.layer_settings(),
            train_embeddings=False,
            sublora=sub,
        )
        model = self.rebuild(model, info)
        self.say(
            f"sublora: w in R^{c['intrinsic_dim']} drives D = {model.D:,} LoRA parameters through a "
            f"{c['sublora_projector']} projector, {c['allocation_mode']} allocation"
        )
        return model, info

    @classmethod
    def rebuild(cls, model, info):
        inject_adapters(model, "lora", targets=info["targets"], **info["settings"])
        return SubLoRA(model, **info["sublora"])

    def optimizers(self, model, lr, betas, weight_decay, device_type):
        # w (a vector: no weight decay), and the learned mode's gates on their own rate
        opts = [
            (
                torch.optim.AdamW(
                    [model.w], lr=lr, betas=betas, weight_decay=0.0, **fused_on_cuda([model.w])
                ),
                lr,
            )
        ]
        if model.mode == "learned":
            gate_lr = self.c["sublora_gate_lr"] or lr
            opts.append(
                (
                    torch.optim.AdamW(
                        [model.gate_logits],
                        lr=gate_lr,
                        betas=betas,
                        weight_decay=0.0,
                        **fused_on_cuda([model.gate_logits]),
                    ),
                    gate_lr,
                )
            )
        return opts

    def stats(self, model):
        stats = {}
        norms = model.grad_part_norms()  # None when compiled (the hooks that keep them would break the graph)
        if norms:
            stats["grad_norm_A"], stats["grad_norm_B"] = norms
        if model.mode == "learned":
            stats["gamma"] = model.gammas()
        return stats


# -----------------------------------------------------------------------------
# VeRA: one pair of frozen random matrices for every layer, two trained scaling vectors per layer


@functools.lru_cache(maxsize=4)
def vera_projections(rank, n_in, n_out, seed):
    """VeRA's shared frozen matrices as PEFT draws them (VeraModel, projection_prng_key = seed): A (rank,
    n_in) then B (n_out, rank), Kaiming-uniform (bound √6 / √fan_in) from one CPU generator; n_in and
    n_out are the largest among the adapted layers, each of which slices its own. Regenerated from the
    seed, never stored."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    A = torch.empty(rank, n_in, device="cpu")
    A.uniform_(-math.sqrt(6 / n_in), math.sqrt(6 / n_in), generator=gen)
    B = torch.empty(n_out, rank, device="cpu")
    return A, B.uniform_(-math.sqrt(6 / rank), math.sqrt(6 / rank), generator=gen)


class VeRALinear(AdapterLinear):
    """VeRA (Kopiczko et al. 2024): ΔW = Λ_b B Λ_d A, A and B frozen and shared by every adapted layer
    (vera_projections, sliced to this layer), the vectors d (rank) and b (out) trained. d starts at
    d_initial, b at 0, so the layer starts as its base."""

    def __init__(self, base: nn.Linear, rank=64, d_initial=0.1, seed=0, n_in=None, n_out=None, dropout=0.0):
        super().__init__(base, dropout)
        A, B = vera_projections(rank, n_in or base.in_features, n_out or base.out_features, seed)
        w = base.weight
        own = dict(device=w.device, dtype=w.dtype, copy=True)  # apart from the cache's tensors
        self.register_buffer("vera_A", A[:, : base.in_features].to(**own), persistent=False)
        self.register_buffer("vera_B", B[: base.out_features].to(**own), persistent=False)
        self.vera_d = nn.Parameter(torch.full((rank,), float(d_initial), device=w.device, dtype=w.dtype))
        self.vera_b = nn.Parameter(torch.zeros(base.out_features, device=w.device, dtype=w.dtype))
        self.rank = rank

    def factors(self):
        return self.vera_b[:, None] * self.vera_B * self.vera_d, self.vera_A, 1.0


class VeRA(Family):
    """VeRA: frozen random A and B shared by every adapted layer (seeded, regenerated, never stored), a
    trained scale per rank (d) and per output (b) in each layer: ΔW = Λ_b B Λ_d A. Its message is only
    the vectors, so it compresses as SubLoRA does."""

    kind, layer = "vera", VeRALinear
    keys = {
        "vera_rank": (
            64,
            "[1, inf)",
            "r: rows of the shared random A (columns of B); at most every layer's size",
        ),
        "vera_d_initial": (0.1, "(-inf, inf)", "d's value at the start (b starts at 0)"),
        "vera_seed": (0, "[0, inf)", "seeds the shared A and B (PEFT's projection_prng_key)"),
    }
    default_targets = tuple(t for t in DEFAULT_TARGETS if t != "lm_head")  # PEFT's: no head of 50k rows
    loraplus, rank_pattern, ranks_from = False, False, "vera_rank"
    examples = {"": dict(vera_rank=4)}

    def layer_settings(self):
        c = self.c
        return dict(
            rank=c["vera_rank"], d_initial=c["vera_d_initial"], seed=c["vera_seed"], dropout=c["lora_dropout"]
        )

    def inject(self, model):
        c = self.c
        names = find_targets(
            model, [t for t in c["lora_targets"].split(";") if t.strip()] or None, self.default_targets
        )
        if any(":" in n for n in names):
            raise AdapterError("vera adapts whole Linears: drop the ':q,v' parts from --lora_targets")
        shapes = {n: model.get_submodule(n) for n in names}
        small = [n for n, m in shapes.items() if c["vera_rank"] > min(m.in_features, m.out_features)]
        if small:
            m = shapes[small[0]]
            raise AdapterError(
                f"vera_rank {c['vera_rank']} is larger than {small[0]} ({m.out_features} x {m.in_features}): "
                f"lower --vera_rank to {min(min(m.in_features, m.out_features) for m in shapes.values())} or less"
            )
        n_in, n_out = (
            max(m.in_features for m in shapes.values()),
            max(m.out_features for m in shapes.values()),
        )
        info = dict(
            kind=self.kind,
            targets=names,
            settings=dict(self.layer_settings(), n_in=n_in, n_out=n_out),
            train_embeddings=c["train_embeddings"],
        )
        return self.rebuild(model, info), info


# -----------------------------------------------------------------------------
# injection by module name


def _matches(name, pattern):
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def find_targets(model, targets=None, defaults=DEFAULT_TARGETS):
    """The adapted module names the patterns select, each with the output part it adapts: a pattern
    may end in ':q,v' (any of q, k, v) to adapt only those thirds of a fused q/k/v Linear (GPT's
    c_attn), as SubLoRA adapts q and v. Returns ['name' or 'name:q,v', ...]. Explicit patterns must
    each match at least one Linear; the defaults need only match something in the model."""
    explicit = targets is not None and len(targets) > 0
    patterns = list(targets) if explicit else list(defaults)
    modules = dict(model.named_modules())
    found = {}
    for target in patterns:
        pattern, _, parts = target.partition(":")
        if parts and not set(parts.split(",")) <= {"q", "k", "v"}:
            raise AdapterError(
                f"target {target!r}: after ':' name the fused thirds to adapt, e.g. 'c_attn:q,v'"
            )
        hits = [n for n, m in modules.items() if n and _matches(n, pattern)]
        linear = [n for n in hits if type(modules[n]) is nn.Linear]
        if explicit and not hits:
            raise AdapterError(
                f"target {pattern!r} matches no module of {type(model).__name__}; "
                f"Linear modules are e.g. {_some_linears(modules)}"
            )
        if explicit and not linear:
            raise AdapterError(
                f"target {pattern!r} matches {hits[:3]}, which are not nn.Linear "
                f"({type(modules[hits[0]]).__name__}); adapters wrap Linear layers only"
            )
        for n in linear:
            found.setdefault(n, f"{n}:{parts}" if parts else n)
    if not found:
        raise AdapterError(f"no nn.Linear of {type(model).__name__} matches targets {patterns}")
    return list(found.values())


def rank_pattern_layers(names, pattern):
    """Per-layer settings for `inject_adapters(layers=...)` from a rank pattern {module pattern: rank}
    (PEFT's rank_pattern; patterns match as targets do, the first that matches a layer wins). `names`
    are find_targets' output. Each pattern must match an adapted layer."""
    layers = {}
    for key, rank in pattern.items():
        if not isinstance(rank, int) or rank < 1:
            raise AdapterError(f"rank pattern {key!r}: the rank must be an integer >= 1, got {rank!r}")
        hits = [n.partition(":")[0] for n in names if _matches(n.partition(":")[0], key)]
        if not hits:
            raise AdapterError(
                f"rank pattern {key!r} matches no adapted layer; they are e.g. "
                f"{[n.partition(':')[0] for n in names][:6]}"
            )
        for n in hits:
            layers.setdefault(n, dict(rank=rank))
    return layers


def fused_thirds(parts, out_features):
    """Output row ranges of the q / k / v thirds named in 'q,v' of a fused Linear."""
    if out_features % 3:
        raise AdapterError(f"a ':q,k,v' target needs a fused Linear with 3·C outputs, got {out_features}")
    third = out_features // 3
    return [[i * third, (i + 1) * third] for i, p in enumerate("qkv") if p in parts.split(",")]


def _some_linears(modules):
    return [n for n, m in modules.items() if type(m) is nn.Linear][:6]


def inject_adapters(
    model, kind, targets=None, train_embeddings=False, layers=None, defaults=DEFAULT_TARGETS, **settings
):
    """Wrap every target Linear in the layer of adapter `kind`, in place, then freeze all but the
    adapters (and the embeddings if train_embeddings). `settings` go to the layer class (rank, alpha,
    dropout...); `layers` maps a module name to settings of its own (a pruned layer's rank and
    scaling); `defaults` are the patterns used when no targets are given.
    Returns the adapted module names: store them to rebuild the same model later."""
    layer = FAMILIES[kind].layer if kind in FAMILIES else None
    if layer is None:
        choices = sorted(k for k, f in FAMILIES.items() if f.layer is not None)
        raise AdapterError(f"unknown adapter {kind!r}; choose one of {choices}")
    if any(isinstance(m, AdapterLinear) for m in model.modules()):
        raise AdapterError("the model already has adapters; merge_adapters(model) first to stack another")
    names = find_targets(model, targets, defaults)
    for target in names:
        name, _, parts = target.partition(":")
        base = model.get_submodule(name)
        own = dict(settings, **(layers or {}).get(name, {}))
        if parts:
            own["out_ranges"] = fused_thirds(parts, base.out_features)
        set_module(model, name, layer(base, **own))
    mark_trainable(model, train_embeddings)
    return names


def set_module(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def replace_layers(model, make):
    """Put make(name, layer) in place of every adapter layer of `model` (None puts its base nn.Linear
    back). Returns {name: what now stands there}."""
    out = {}
    for name, layer in adapter_layers(model).items():
        new = make(name, layer)
        new = layer.base if new is None else new
        if new is not layer:
            set_module(model, name, new)
        out[name] = new
    return out


def mark_trainable(model, train_embeddings=False):
    """Freeze everything but the adapter branches (and the embedding tables if asked)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, AdapterLinear):
            for n, p in m.named_parameters():
                p.requires_grad_(not n.startswith("base.") and n not in m.frozen)
    for m in model.modules():  # after the adapters: a head tied to the embedding trains with it
        if train_embeddings and isinstance(m, nn.Embedding):
            m.weight.requires_grad_(True)


def adapter_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}


def count_params(model):
    """(trainable, total) parameter counts; a tied weight counts once."""
    params = list(model.parameters())  # parameters() yields each tensor once, even when tied
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# -----------------------------------------------------------------------------
# adapter-only state, merge


def adapter_state_dict(model):
    """What fine-tuning changed: every tensor of the adapter branches (not their frozen base) and any
    other trainable parameter (embeddings trained on request). Small next to the base model. For
    SubLoRA only w (and the gate logits): θ₀ and P come from the seed."""
    if isinstance(model, SubLoRA):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    keep = {
        f"{n}.{k}"
        for n, m in adapter_layers(model).items()
        for k in m.state_dict()
        if not k.startswith("base.")
    }
    keep |= {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in keep}


def load_adapter_state_dict(model, state):
    """Load adapter_state_dict() output into a model with the same adapters injected; every key must
    exist with the same shape, and every adapter tensor of the model must be given."""
    own = adapter_state_dict(model)
    unknown = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    if unknown or missing:
        raise AdapterError(
            f"adapter weights do not fit this model: unknown keys {unknown[:4]}, missing "
            f"keys {missing[:4]}; inject the same adapter kind, rank and targets first"
        )
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise AdapterError(
                f"adapter weight {k} has shape {tuple(v.shape)}, the model expects "
                f"{tuple(own[k].shape)}: the rank or model size differs"
            )
    model.load_state_dict(state, strict=False)


def lora_model(model):
    """A copy of `model` in which every adapter layer is the plain LoRA (with DoRA's magnitude) it
    computes (each layer's as_lora; SubLoRA's θ₀ + P w written in first): what export and every reader
    of LoRA factors take. A layer that adds nothing leaves its base nn.Linear."""
    model = copy.deepcopy(model)
    if isinstance(model, SubLoRA):
        model = model.materialize()
    to_lora(model)
    return model


def to_lora(model):
    """Replace every adapter layer by the plain LoRA (with DoRA's magnitude) of its live ranks, in place
    (as_lora; a layer that adds nothing by its base nn.Linear): the outputs stay. SoRA's prune, AdaLoRA's
    slice to the allocated ranks, PiSSA's export as rank-2r LoRA. Returns {name: what stands there}."""
    return replace_layers(model, lambda name, layer: layer.as_lora())


def merge_adapters(model):
    """Fold every adapter into its base weight and put the plain nn.Linear back: no adapter code left
    in the forward, so inference costs what the base model costs. In place; returns the model (for
    SubLoRA, the inner model, with θ₀ + P w written in first)."""
    if isinstance(model, SubLoRA):
        model = model.materialize()

    def merged(name, layer):
        layer.merge()
        return layer.base

    replace_layers(model, merged)
    return model


# -----------------------------------------------------------------------------
# speed: LoRA's forward and backward as three and five GEMMs, no pass over the output. Measured on
# an H100 (bf16, eager, GPT-2 small, 8 x 1024 tokens): LoRA's step from 1.67x to 1.05x full
# fine-tuning's; compiled, the plain line was as fast, and on a CPU it is not slower (docs/bench.md).
# So it runs on CUDA in eager mode only. FUSED_LORA: 'cuda' (that), 'always' (any device, eager: its
# tests and bench.py's --fused rows), 'never' (the plain line everywhere, its test oracle).

FUSED_LORA = "cuda"


def fused_pays(x):
    """Whether AdapterLinear.forward takes the fused path for input x (see FUSED_LORA)."""
    device_ok = FUSED_LORA == "always" or (FUSED_LORA == "cuda" and x.is_cuda)
    return device_ok and not torch.compiler.is_compiling()


def fused_lora_linear(x, xd, W, b, A, B, s):
    """y = x Wᵀ + b + s (xd Aᵀ) Bᵀ (xd: the dropped-out x) as _LoRALinear, in the dtype a Linear would
    compute in (autocast's, or x's)."""
    autocasting = x.device.type in ("cpu", "cuda", "mps", "xpu") and torch.is_autocast_enabled(x.device.type)
    dt = torch.get_autocast_dtype(x.device.type) if autocasting else x.dtype
    cast = lambda t: None if t is None else t.to(dt)  # noqa: E731
    return _LoRALinear.apply(cast(x), None if xd is x else cast(xd), cast(W), cast(b), cast(A), cast(B), s)


class _LoRALinear(torch.autograd.Function):
    """y = x Wᵀ + b + s · (xd Aᵀ) Bᵀ in 3 GEMMs, the adapter's product accumulated into the base output
    (addmm_, alpha = s). Backward in 5 GEMMs: dx = dy W + s (dy B) A (accumulated), dA = s (dy B)ᵀ xd,
    dB = s dyᵀ h. A frozen W gets no gradient and its weight-gradient GEMM is never run; a trained one
    (the embedding a head is tied to, with train_embeddings) gets dyᵀ x, a trained bias Σ dy."""

    @staticmethod
    def forward(ctx, x, xd, W, b, A, B, s):  # xd None: no dropout, the adapter reads x
        x2 = x.reshape(-1, x.shape[-1])
        xd2 = x2 if xd is None else xd.reshape(-1, xd.shape[-1])
        h = xd2 @ A.T  # (N, r)
        y = x2 @ W.T if b is None else torch.addmm(b, x2, W.T)
        y.addmm_(h, B.T, alpha=s)
        # a trained W (an embedding tied to the head, train_embeddings=True) also needs x for dW
        ctx.save_for_backward(W, A, B, h, xd2, x2 if ctx.needs_input_grad[2] else None)
        ctx.s, ctx.shape, ctx.same = s, x.shape, xd is None
        return y.view(*x.shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, dy):
        W, A, B, h, xd2, x2 = ctx.saved_tensors
        s, dy = ctx.s, dy.reshape(-1, dy.shape[-1])
        need_x, need_xd, need_W, need_b, need_A, need_B, _ = ctx.needs_input_grad
        dx = dxd = dW = db = dA = dB = None
        if need_W:
            dW = dy.T @ x2
        if need_b:
            db = dy.sum(0)
        # s folded into the GEMMs (alpha; beta = 0 ignores the uninitialised input): no extra pass
        dh = None
        if need_x or need_xd or need_A:
            dh = torch.addmm(dy.new_empty(dy.shape[0], B.shape[1]), dy, B, beta=0, alpha=s)  # (N, r)
        if need_x:
            dx = dy @ W
            if ctx.same:
                dx.addmm_(dh, A)
            dx = dx.view(ctx.shape)
        if need_xd and not ctx.same:
            dxd = (dh @ A).view(ctx.shape)
        if need_A:
            dA = dh.T @ xd2
        if need_B:
            dB = torch.addmm(B.new_empty(B.shape), dy.T, h, beta=0, alpha=s)
        return dx, dxd, dW, db, dA, dB, None


# -----------------------------------------------------------------------------
# the registry: train.py's `adapter` key -> its family. A new family registers itself here (or with
# register() from its own file) and every script takes it.

FAMILIES = {}


def register(family):
    """Make `family` (a Family subclass) known to inject_adapters and every script by its kind."""
    FAMILIES[family.kind] = family
    return family


for _family in (NoAdapter, LoRA, DoRA, LoRAGA, SoRA, AdaLoRA, AdaDoRA, PiSSA, SubLoRAFamily, VeRA):
    register(_family)


def family_for_peft(config):
    """The family that reads a PEFT adapter with this adapter_config.json (hf.py), or None."""
    want = (config.get("peft_type"), bool(config.get("use_dora")))
    return next((f for f in FAMILIES.values() if f.peft_import == want), None)


def family_of(kind):
    """The Family class of adapter kind `kind` (a checkpoint's adapter["kind"])."""
    if kind not in FAMILIES:
        raise AdapterError(
            f"unknown adapter {kind!r}; choose one of {', '.join(FAMILIES)} (or register your family: "
            "adapters.register)"
        )
    return FAMILIES[kind]
