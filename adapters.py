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
                                       y

    names = inject_adapters(model, "lora", rank=8, alpha=16.0)   # LoRA on the default targets
    trainable, total = count_params(model)
    torch.save(adapter_state_dict(model), "adapter.pt")             # small: adapter tensors only
    merge_adapters(model)                                           # plain nn.Linear again, W + s·BA

Every adapter is an AdapterLinear: it owns its frozen nn.Linear (`base`), has `delta_weight()`,
explicit idempotent `merge()` / `unmerge()` and a `merged` flag. A new adapter family subclasses it,
adds its parameters and `delta_weight()`, and registers itself in ADAPTERS.
"""

import fnmatch
import math

import torch
import torch.nn as nn

# Linears adapted when no targets are given: attention q/k/v and output projection, both MLP
# Linears and the LM head, for both model layouts of model.py (GPT: c_attn c_proj c_fc lm_head;
# bigram: query key value proj fc1 fc2 lm_head). A pattern matches a module name exactly, as its
# last dotted components ("attn.c_proj"), or as an fnmatch glob ("transformer.h.*.attn.c_attn").
DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc", "query", "key", "value", "proj", "fc1", "fc2", "lm_head")


class AdapterError(ValueError):
    """Bad adapter settings or targets; the message says which and how to fix it."""


# -----------------------------------------------------------------------------
# the layers


class AdapterLinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank branch. Subclasses define the branch."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        if type(base) is not nn.Linear:
            raise AdapterError(f"adapters wrap nn.Linear layers, got {type(base).__name__}")
        self.base = base
        self.base.requires_grad_(False)
        self.merged = False

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    @property
    def weight(self):  # code that reads layer.weight (e.g. weight tying, init) still works
        return self.base.weight

    def adapter_forward(self, x):
        raise NotImplementedError

    def delta_weight(self):
        """The branch as a dense (out, in) matrix in fp32; only merge and tests build it."""
        raise NotImplementedError

    def forward(self, x):
        y = self.base(x)
        return y if self.merged else y + self.adapter_forward(x)

    @torch.no_grad()
    def merge(self):
        """W <- W + delta in fp32, cast once. Idempotent. The merged weight is a new tensor, so a weight
        shared with another module (GPT's head is tied to the token embedding) is untied, not changed."""
        if not self.merged:
            self._set_weight(self.base.weight.float() + self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self._set_weight(self.base.weight.float() - self.delta_weight())
            self.merged = False

    def _set_weight(self, w):
        if not torch.isfinite(w).all():  # peft's safe_merge: never write inf/nan into the base
            raise AdapterError("merge produced non-finite weights; the adapter has diverged, not merged")
        self.base.weight = nn.Parameter(w.to(self.base.weight.dtype), requires_grad=False)


def check_rank(rank, base: nn.Linear):
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"adapter rank must be a positive int, got {rank!r}")
    if rank > min(base.in_features, base.out_features):
        raise AdapterError(f"adapter rank {rank} is larger than the layer ({base.in_features} -> "
                           f"{base.out_features}); use a rank <= {min(base.in_features, base.out_features)}")


class LoRALinear(AdapterLinear):
    """LoRA (Hu et al. 2021): y = W x + (dropout(x) Aᵀ) Bᵀ · alpha / r. loralib names and init."""

    def __init__(self, base: nn.Linear, rank=8, alpha=16.0, dropout=0.0, use_rslora=False, scaling=None):
        super().__init__(base)
        check_rank(rank, base)
        self.rank = rank
        # rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r) so that the update's size is rank-free.
        # An explicit `scaling` keeps a trained layer's scale when its rank shrinks (SoRA prune).
        self.scaling = scaling if scaling is not None else alpha / math.sqrt(rank) if use_rslora else alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # loralib / peft: as nn.Linear's default
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def adapter_forward(self, x):
        return (self.lora_dropout(x) @ self.lora_A.T) @ self.lora_B.T * self.scaling

    def delta_weight(self):
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self):
        return f"rank={self.rank}, scaling={self.scaling:g}, merged={self.merged}"


class SoRALinear(LoRALinear):
    """SoRA (Ding et al. 2023): a gate g in R^r between the LoRA factors,
    y = W x + ((dropout(x) Aᵀ) ⊙ g) Bᵀ · s. A proximal optimizer (SoRAOptimizer) drives gates to
    exactly zero; prune() then drops those ranks for a plain, smaller LoRA with the same outputs."""

    def __init__(self, base: nn.Linear, rank=8, alpha=16.0, dropout=0.0, use_rslora=False, scaling=None,
                 gate_init="randn"):
        super().__init__(base, rank, alpha, dropout, use_rslora, scaling)
        if gate_init not in ("randn", "ones"):
            raise AdapterError(f"gate_init must be 'randn' (the SoRA code's) or 'ones', got {gate_init!r}")
        # TsinghuaC3I/SoRA src/lora.py: gate = randn(1, r); with B = 0 the output is the base either way
        init = torch.randn if gate_init == "randn" else torch.ones
        self.gate = nn.Parameter(init(rank, device=base.weight.device, dtype=base.weight.dtype))

    def adapter_forward(self, x):
        return ((self.lora_dropout(x) @ self.lora_A.T) * self.gate) @ self.lora_B.T * self.scaling

    def delta_weight(self):
        return (self.lora_B.float() * self.gate.float()) @ self.lora_A.float() * self.scaling

    def effective_rank(self):
        return int((self.gate != 0).sum())

    @torch.no_grad()
    def to_lora(self):
        """The LoRA of rank nnz(g) with identical outputs: zero-gated ranks dropped, g baked into B.
        None when every gate is zero (the layer is its base alone)."""
        keep = self.gate != 0
        if not keep.any():
            return None
        dropout = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
        lora = LoRALinear(self.base, rank=int(keep.sum()), dropout=dropout, scaling=self.scaling)
        lora.lora_A.copy_(self.lora_A[keep])
        lora.lora_B.copy_((self.lora_B * self.gate)[:, keep])
        lora.merged = self.merged
        return lora

    def extra_repr(self):
        return super().extra_repr() + f", effective_rank={self.effective_rank()}"


# kind -> layer class; train.py's `adapter` config key picks one ('none' injects nothing)
ADAPTERS = {"lora": LoRALinear, "sora": SoRALinear}


# -----------------------------------------------------------------------------
# injection by module name


def _matches(name, pattern):
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def find_targets(model, targets=None):
    """Names of the nn.Linear modules that the patterns select. Explicit patterns must each match at
    least one Linear; the defaults need only match something in the model."""
    explicit = targets is not None and len(targets) > 0
    patterns = list(targets) if explicit else list(DEFAULT_TARGETS)
    modules = dict(model.named_modules())
    names = []
    for pattern in patterns:
        hits = [n for n, m in modules.items() if n and _matches(n, pattern)]
        linear = [n for n in hits if type(modules[n]) is nn.Linear]
        if explicit and not hits:
            raise AdapterError(f"target {pattern!r} matches no module of {type(model).__name__}; "
                               f"Linear modules are e.g. {_some_linears(modules)}")
        if explicit and not linear:
            raise AdapterError(f"target {pattern!r} matches {hits[:3]}, which are not nn.Linear "
                               f"({type(modules[hits[0]]).__name__}); adapters wrap Linear layers only")
        names += [n for n in linear if n not in names]
    if not names:
        raise AdapterError(f"no nn.Linear of {type(model).__name__} matches targets {patterns}")
    return names


def _some_linears(modules):
    return [n for n, m in modules.items() if type(m) is nn.Linear][:6]


def inject_adapters(model, kind, targets=None, train_embeddings=False, layers=None, **settings):
    """Wrap every target Linear in the adapter `kind`, in place, then freeze all but the adapters (and
    the embeddings if train_embeddings). `settings` go to the layer class (rank, alpha, dropout...);
    `layers` maps a module name to settings of its own (a pruned layer's rank and scaling).
    Returns the adapted module names: store them to rebuild the same model later."""
    if kind not in ADAPTERS:
        raise AdapterError(f"unknown adapter {kind!r}; choose one of {sorted(ADAPTERS)}")
    if any(isinstance(m, AdapterLinear) for m in model.modules()):
        raise AdapterError("the model already has adapters; merge_adapters(model) first to stack another")
    names = find_targets(model, targets)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, ADAPTERS[kind](getattr(owner, child), **{**settings, **(layers or {}).get(name, {})}))
    mark_trainable(model, train_embeddings)
    return names


def mark_trainable(model, train_embeddings=False):
    """Freeze everything but the adapter branches (and the embedding tables if asked)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, AdapterLinear):
            for n, p in m.named_parameters():
                p.requires_grad_(not n.startswith("base."))
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
    other trainable parameter (embeddings trained on request). Small next to the base model."""
    keep = {f"{n}.{k}" for n, m in adapter_layers(model).items() for k in m.state_dict() if not k.startswith("base.")}
    keep |= {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in keep}


def load_adapter_state_dict(model, state):
    """Load adapter_state_dict() output into a model with the same adapters injected; every key must
    exist with the same shape, and every adapter tensor of the model must be given."""
    own = adapter_state_dict(model)
    unknown = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    if unknown or missing:
        raise AdapterError(f"adapter weights do not fit this model: unknown keys {unknown[:4]}, missing "
                           f"keys {missing[:4]}; inject the same adapter kind, rank and targets first")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise AdapterError(f"adapter weight {k} has shape {tuple(v.shape)}, the model expects "
                               f"{tuple(own[k].shape)}: the rank or model size differs")
    model.load_state_dict(state, strict=False)


def merge_adapters(model):
    """Fold every adapter into its base weight and put the plain nn.Linear back: no adapter code left
    in the forward, so inference costs what the base model costs. In place; returns the model."""
    for name, layer in adapter_layers(model).items():
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    return model


# -----------------------------------------------------------------------------
# SoRA: the gates' proximal optimizer, the sparsity schedule, prune


class SoRAOptimizer(torch.optim.AdamW):
    """AdamW for the gates, then the proximal step of an L1 penalty λ‖g‖₁ (soft-threshold):
    g <- sign(g) · max(|g| - λ·lr, 0). The SoRA paper's proximal step scales λ by the learning rate;
    TsinghuaC3I/SoRA src/sparse_optimizer_multiply_lr.py does the same (src/sparse_optimizer.py omits
    lr). Weight decay is forced to 0: the penalty is pure L1, not an elastic net."""

    def __init__(self, params, lr=1e-3, sparse_lambda=0.1, betas=(0.9, 0.999), eps=1e-8):
        if sparse_lambda < 0:
            raise AdapterError(f"sparse_lambda must be >= 0 (the L1 strength), got {sparse_lambda}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
        self.sparse_lambda = sparse_lambda

    def add_param_group(self, group):
        super().add_param_group({**group, "weight_decay": 0.0})

    def set_lambda(self, sparse_lambda):
        if sparse_lambda < 0:
            raise AdapterError(f"sparse_lambda must be >= 0, got {sparse_lambda}")
        self.sparse_lambda = sparse_lambda

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            threshold = self.sparse_lambda * group["lr"]
            for p in group["params"]:
                p.copy_(soft_threshold(p, threshold))
        return loss


def soft_threshold(x, threshold):
    return torch.sign(x) * torch.clamp(x.abs() - threshold, min=0.0)


def split_sora_params(model):
    """(gates, every other trainable parameter): each goes to its own optimizer."""
    gates, others = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (gates if name.rpartition(".")[2] == "gate" else others).append(p)
    return gates, others


def build_sora_optimizers(model, lr=1e-3, gate_lr=None, sparse_lambda=0.1, weight_decay=0.0, betas=(0.9, 0.999)):
    """(gate_optimizer, regular_optimizer) for a custom loop: step both every iteration."""
    gates, others = split_sora_params(model)
    if not gates:
        raise AdapterError("the model has no trainable SoRA gates; inject_adapters(model, 'sora', ...) first")
    gate_opt = SoRAOptimizer(gates, lr=gate_lr or lr, sparse_lambda=sparse_lambda, betas=betas)
    return gate_opt, torch.optim.AdamW(others, lr=lr, betas=betas, weight_decay=weight_decay)


def lambda_schedule(start, stop, levels, spacing="linear"):
    """The λ values of the sparsifying schedule, start to stop in `levels` steps. linear and
    log_linear follow TsinghuaC3I/SoRA (log_linear: log(linspace(e^start, e^stop))); exp_linear is
    evenly spaced in log λ (needs start > 0)."""
    if start < 0 or stop < start or levels < 1:
        raise AdapterError(f"the λ schedule needs 0 <= start <= stop and levels >= 1, got {start}, {stop}, {levels}")
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
    """{layer name: number of non-zero gates} for every SoRA layer."""
    return {n: m.effective_rank() for n, m in adapter_layers(model).items() if isinstance(m, SoRALinear)}


def prune_sora_model(model):
    """Replace every SoRA layer by the plain LoRA of its non-zero ranks (outputs unchanged), or by its
    base Linear when all its gates are zero. Returns {name: kept rank}; save with adapter_state_dict."""
    kept = {}
    for name, layer in adapter_layers(model).items():
        if isinstance(layer, SoRALinear):
            lora = layer.to_lora()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lora if lora is not None else layer.base)
            kept[name] = lora.rank if lora is not None else 0
    return kept


def merge_sora_model(model):
    """Fold s · B diag(g) A into every base weight and drop the branches (merge_adapters)."""
    return merge_adapters(model)
