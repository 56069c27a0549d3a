"""
The language models: nanoGPT's GPT (loads OpenAI GPT-2 weights) and a small 'bigram' model
(separate key / query / value Linears). Knows nothing of adapters: those are
injected by module name afterwards (adapters.py).

    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=65))
    model = GPT.from_pretrained('gpt2')              # or a local folder with config.json + model.safetensors
    logits, loss = model(idx, targets)               # idx (B, T) int64
    out = model.generate(idx, max_new_tokens=100, temperature=0.8, top_k=200)
"""

import inspect
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from files import DownloadError, atomic_write, reachable, read_json


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
    gelu: str = "none"  # GELU's approximation: 'none' (exact, nanoGPT's) | 'tanh' (GPT-2's gelu_new, set by from_pretrained)
    tie_word_embeddings: bool = (
        True  # GPT: the LM head is the token embedding (GPT-2's); False once a head adapter merged
    )


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1 style configs)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def causal_attention(q, k, v, n_head, dropout, training, cache=None, layer=0):
    """(B, T, C) q, k, v -> (B, T, C) causal multi-head attention through SDPA (flash on GPUs). With a
    KVCache, this layer's keys and values join the cache and the T new queries attend to every cached
    position up to their own, padding left out."""
    B, T, C = q.shape
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    if cache is None:
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout if training else 0.0, is_causal=True)
    else:
        k, v = cache.update(layer, k, v)  # (B, nh, pos + T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask(T))
    return y.transpose(1, 2).contiguous().view(B, T, C)


class KVCache:
    """Every layer's keys and values for up to `size` positions of a batch of B rows, so that generation
    prefills the prompt once and then runs one token per step. pads (B,): how many positions at the
    start of each row are left padding (a ragged batch): they are never attended to, and each row's
    position embeddings count from its first real token."""

    def __init__(self, config, B, size, pads, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, B, config.n_head, size, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pads, self.pos, self.size = pads, 0, size

    @staticmethod
    def nbytes(config, B, size, dtype):
        """What a cache of B rows and `size` positions holds, in bytes (keys and values)."""
        return 2 * config.n_layer * B * size * config.n_embd * torch.finfo(dtype).bits // 8

    def positions(self, T):
        """(B, T) position ids of the next T tokens of every row (0 at a row's first real token)."""
        new = torch.arange(self.pos, self.pos + T, device=self.pads.device)
        return (new[None, :] - self.pads[:, None]).clamp_min(0)

    def update(self, layer, k, v):
        T = k.shape[2]
        self.k[layer, :, :, self.pos : self.pos + T] = k
        self.v[layer, :, :, self.pos : self.pos + T] = v
        return self.k[layer, :, :, : self.pos + T], self.v[layer, :, :, : self.pos + T]

    def mask(self, T):
        """(B, 1, T, pos + T) bool: query i sees key j when j <= pos + i and j is not padding (a padding
        query sees itself: a finite row, never read), or None when every key may be seen."""
        if T == 1 and not self.pads.any():
            return None
        j = torch.arange(self.pos + T, device=self.pads.device)
        i = torch.arange(self.pos, self.pos + T, device=self.pads.device)[:, None]
        real = j[None, None, :] >= self.pads[:, None, None]  # (B, 1, pos + T)
        return ((j <= i) & real | (j == i))[:, None]

    def advance(self, T):
        self.pos += T


def next_token(logits, temperature, top_k, generator):
    """(B,) the next token of each row from its (B, V) logits: the argmax at temperature 0, else a sample
    of softmax(logits / temperature) over the top_k (generator: one, or a list with one per row)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    probs = F.softmax(logits, dim=-1)
    if isinstance(generator, (list, tuple)):  # each row its own stream of random numbers
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


# -----------------------------------------------------------------------------
# shared by both models: optimizer groups, FLOPs, sampling


class LanguageModel(nn.Module):
    """What train.py and sample.py need of a model: forward(idx, targets) -> (logits, loss) and these."""

    config: GPTConfig

    def get_num_params(self, non_embedding=True):
        """Parameter count; position embeddings are subtracted (token embeddings are tied to the head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.position_embedding().weight.numel()
        return n

    def head_is_tied(self):
        """Whether the LM head shares the token embedding's weight (GPT's tying)."""
        return False

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # only trainable parameters: with adapters injected this is the adapter and nothing else.
        params = [p for p in self.parameters() if p.requires_grad]
        # matrices decay, vectors (biases, norms, gates) do not
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self):
        """Training FLOPs per token at full context: 6N + 12 L H Q T (PaLM appendix B)."""
        cfg = self.config
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12):
        """Model FLOPs utilisation against `peak_flops` (A100 bf16 by default)."""
        return self.flops_per_token() * self.config.block_size * fwdbwd_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(
        self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, kv_cache=True, pads=None
    ):
        """Continue idx (B, T) by max_new_tokens tokens (stream's arguments); returns (B, T + new)."""
        steps = self.stream(idx, max_new_tokens, temperature, top_k, generator, kv_cache, pads)
        return torch.cat([idx, *(token[:, None] for token, _ in steps)], dim=1)

    @torch.no_grad()
    def stream(
        self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, kv_cache=True, pads=None
    ):
        """Yield (the next token of every row (B,), its logits (B, V)) max_new_tokens times after idx (B, T).
        pads (B,): left padding of each row (a ragged batch of prompts; each row then continues as it
        would alone). temperature 0: the most likely token (greedy); else a sample of softmax(logits /
        temperature) over the top_k; generator: one torch.Generator, or one per row. kv_cache: the
        prompt prefilled once, then one token per step; the context is the last block_size tokens,
        so past block_size every step recomputes them, as the uncached path (kv_cache=False, nanoGPT's:
        the whole context recomputed every step) does all along."""
        B, ctx = idx.shape[0], self.config.block_size
        pads = torch.zeros(B, dtype=torch.long, device=idx.device) if pads is None else pads
        dtype, cache = next(self.parameters()).dtype, None
        for _ in range(max_new_tokens):
            window = idx[:, -ctx:]
            in_window = (pads - (idx.shape[1] - window.shape[1])).clamp_min(0)
            if cache is not None and idx.shape[1] <= ctx:  # the cache holds all but the last token
                logits = self(idx[:, -1:], cache=cache)[0]
            elif in_window.any() or kv_cache and idx.shape[1] < ctx:  # padding needs a cache's mask
                cache = KVCache(self.config, B, ctx, in_window, idx.device, dtype)
                logits = self(window, cache=cache)[0]
                cache = cache if kv_cache else None  # kept while the context has room to grow
            else:  # uncached, or past block_size (the window slides: nothing cached stays valid)
                cache = None
                logits = self(window)[0]
            token = next_token(logits[:, -1], temperature, top_k, generator)
            idx = torch.cat([idx, token[:, None]], dim=1)
            yield token, logits[:, -1]

    def crop_block_size(self, block_size):
        """Model surgery to use a smaller context than the one trained with (e.g. GPT-2's 1024)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        wpe = self.position_embedding()
        wpe.weight = nn.Parameter(wpe.weight[:block_size])
        wpe.num_embeddings = block_size

    def positions(self, idx, cache):
        """The position ids of idx's tokens: 0..t-1, or with a cache each row's next ones."""
        t = idx.size(1)
        assert t <= self.config.block_size, f"sequence of length {t} > block_size {self.config.block_size}"
        if cache is None:
            return torch.arange(t, dtype=torch.long, device=idx.device)
        assert cache.pos + t <= cache.size, f"{cache.pos + t} positions > the cache's {cache.size}"
        return cache.positions(t)

    def _lm_output(self, x, targets, cache=None):
        if cache is not None:
            cache.advance(x.size(1))
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            return logits, loss
        # inference: only the last position's logits are needed (list index keeps the time dim)
        return self.lm_head(x[:, [-1], :]), None


# -----------------------------------------------------------------------------
# GPT (nanoGPT layout: names match OpenAI's GPT-2 checkpoints)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v fused
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x, cache=None, layer=0):
        q, k, v = self.c_attn(x).split(x.size(-1), dim=2)
        y = causal_attention(q, k, v, self.n_head, self.dropout, self.training, cache, layer)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(LanguageModel):
    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:  # weight tying (https://paperswithcode.com/method/weight-tying)
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(_init_weights)
        # scaled init of the residual projections, GPT-2 paper
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def position_embedding(self):
        return self.transformer.wpe

    def head_is_tied(self):
        return self.lm_head.weight is self.transformer.wte.weight  # merging a head adapter unties them

    def forward(self, idx, targets=None, cache=None):
        b, t = idx.size()
        pos = self.positions(idx, cache)  # (t,), or (b, t) with a cache
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (b, t, n_embd)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        return self._lm_output(self.transformer.ln_f(x), targets, cache)

    @classmethod
    def from_pretrained(cls, name_or_path, override_args=None):
        """GPT-2 weights from the Hugging Face hub ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl') or a
        local folder in the same format (config.json + model.safetensors)."""
        override_args = override_args or {}
        assert all(k == "dropout" for k in override_args), "only dropout can be overridden"
        args = gpt2_config_args(name_or_path)
        if os.path.isdir(name_or_path):
            tensors = _folder_weights(name_or_path)
        else:
            from safetensors.torch import load_file

            tensors = load_file(_hub_weights(name_or_path))
        args.update(bias=True, **override_args)  # GPT-2's layout always has biases
        model = cls(GPTConfig(**args))
        state = convert_hf_gpt2_state_dict(tensors, keep_head=not model.config.tie_word_embeddings)
        missing = sorted(
            set(model.state_dict()) - set(state) - ({"lm_head.weight"} if model.head_is_tied() else set())
        )
        unexpected = sorted(set(state) - set(model.state_dict()))
        if missing or unexpected:
            raise ValueError(
                f"{name_or_path}: the weights do not fit GPT-2's layout: missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}; load a complete GPT-2 checkpoint"
            )
        model.load_state_dict(state, strict=False)
        return model

    def save_pretrained(self, folder):
        """Write this GPT as a Hugging Face GPT-2 folder (config.json + model.safetensors) that
        transformers' GPT2LMHeadModel.from_pretrained and GPT.from_pretrained both load. A model
        without biases gets zero biases (the same function: GPT-2's layout always has them)."""
        from safetensors.torch import save_file

        with torch.device("meta"):  # this GPT's own tensors, without allocating them
            own = set(GPT(self.config).state_dict())
        foreign = sorted(set(self.state_dict()) - own)
        if foreign:
            raise ValueError(
                f"the model holds tensors that are not GPT-2's ({foreign[:2]}...): adapters still in it? merge "
                "them first (adapters.merge_adapters(model)), then save_pretrained"
            )
        cfg = self.config
        hf = {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_embd": cfg.n_embd,
            "n_positions": cfg.block_size,
            "vocab_size": cfg.vocab_size,
            "activation_function": {v: k for k, v in HF_GELU.items()}[cfg.gelu],
            "layer_norm_epsilon": 1e-5,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "tie_word_embeddings": self.head_is_tied(),
            "bos_token_id": None,
            "eos_token_id": None,
        }
        if cfg.vocab_size > 50256:  # GPT-2's BPE: <|endoftext|> starts and ends a text
            hf.update(bos_token_id=50256, eos_token_id=50256)
        os.makedirs(folder, exist_ok=True)
        atomic_write(
            os.path.join(folder, "model.safetensors"),
            lambda tmp: save_file(to_hf_gpt2_state_dict(self), tmp, metadata={"format": "pt"}),
        )
        atomic_write(os.path.join(folder, "config.json"), json.dumps(hf, indent=2))


def _hub_weights(name):
    """Path of GPT-2 `name`'s model.safetensors: from the Hugging Face cache, else downloaded in one
    try; offline, one DownloadError naming the local alternative instead of the hub's retries."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache  # only needed here

    repo = f"openai-community/{name}"
    cached = try_to_load_from_cache(repo, "model.safetensors")
    if isinstance(cached, str):
        return cached
    fix = (
        "fetch it on a connected machine and pass the folder holding its config.json and model.safetensors instead "
        "(train.py and sample.py: --init_from=PATH; hf.py: --base=PATH)"
    )
    if constants.HF_HUB_OFFLINE or not reachable(constants.ENDPOINT):
        raise DownloadError(
            f"cannot reach {constants.ENDPOINT} to download {name}'s weights (offline?): {fix}"
        )
    try:
        return hf_hub_download(repo_id=repo, filename="model.safetensors")
    except Exception as e:  # the hub's errors are many (HTTP, timeouts, gated repos): one line each
        raise DownloadError(f"downloading {name}'s weights failed ({type(e).__name__}: {e}): {fix}") from None


# (n_layer, n_head, n_embd) of the OpenAI checkpoints: 124M, 350M, 774M, 1558M parameters
GPT2_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}
# OpenAI's checkpoints use a Conv1D module whose weight is (in, out): transpose these once on load
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def convert_hf_gpt2_state_dict(sd, keep_head=False):
    """Hugging Face GPT-2 keys and layout -> this file's GPT. A head tied to wte is not loaded; an
    untied one (keep_head) is."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("transformer.")
        if k == "lm_head.weight" and keep_head:
            out[k] = v
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # causal-mask buffers of old checkpoints; the head
        out["transformer." + k] = v.t().contiguous() if k.endswith(_CONV1D) else v
    return out


def to_hf_gpt2_state_dict(model):
    """This file's GPT -> Hugging Face GPT-2 keys and Conv1D layout (the inverse of the above): zero
    biases where the model has none, a tied head left out (transformers ties it to wte)."""
    sd = {
        k: v.detach()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight" or not model.head_is_tied()
    }
    out = {}
    for k, v in sd.items():
        out[k] = (v.t() if k.endswith(_CONV1D) else v).contiguous().clone()
        bias = k.removesuffix(".weight") + ".bias"
        if k.endswith((".ln_1.weight", ".ln_2.weight", "ln_f.weight")) or k.endswith(_CONV1D):
            if bias not in sd:  # bias=False: GPT-2's layout needs one, zero computes the same
                out[bias] = v.new_zeros(v.shape[0])
    return out


# config.json's activation_function -> GPTConfig.gelu (transformers' names)
HF_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
# GPT-2 config fields that change the function, at the values this GPT computes: any other is refused
HF_FIXED = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "layer_norm_epsilon": 1e-5,
    "n_inner": None,
}


def gpt2_config_args(name_or_path):
    """GPTConfig's arguments for a GPT-2 hub name or a local GPT-2 folder (its config.json), without the
    weights."""
    if os.path.isdir(name_or_path):
        hf = read_json(os.path.join(name_or_path, "config.json"))
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ValueError(
                f"{name_or_path} holds a {hf['model_type']!r} model (config.json's model_type); this GPT loads "
                "GPT-2 folders only (model_type 'gpt2')"
            )
        return dict(
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            vocab_size=hf["vocab_size"],
            block_size=hf["n_positions"],
            gelu=_gelu(hf, name_or_path),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            dropout=hf.get("resid_pdrop", 0.1),  # GPT-2's three dropouts are one here (save_pretrained)
        )
    if name_or_path in GPT2_SIZES:
        return dict(GPT2_SIZES[name_or_path], vocab_size=50257, block_size=1024, gelu="tanh", dropout=0.1)
    raise ValueError(
        f"unknown pretrained model {name_or_path!r}: use one of {sorted(GPT2_SIZES)} "
        "or a folder holding config.json and model.safetensors"
    )


def is_gpt2_folder(path):
    """Whether `path` is a Hugging Face GPT-2 folder (a config.json beside its weights), not a run here."""
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(
        os.path.join(path, "ckpt.pt")
    )


def _gelu(hf, folder):
    """The GELU a GPT-2 config.json names, as GPTConfig.gelu; the fields this GPT does not compute refused."""
    for key, want in HF_FIXED.items():
        have = hf.get(key, want)
        if have != want and not (key == "n_inner" and have == 4 * hf["n_embd"]):
            raise ValueError(
                f"{folder}/config.json sets {key}={have!r}; this GPT computes {key}={want!r} only, so "
                "its outputs would differ: use a checkpoint with the standard GPT-2 settings"
            )
    act = hf.get("activation_function", "gelu_new")
    if act not in HF_GELU:
        raise ValueError(
            f"{folder}/config.json has activation_function {act!r}; this GPT computes {sorted(HF_GELU)}"
        )
    return HF_GELU[act]


def _folder_weights(folder):
    """The tensors of a GPT-2 folder: model.safetensors, or the shards its index names."""
    from safetensors.torch import load_file

    single, index = (
        os.path.join(folder, "model.safetensors"),
        os.path.join(folder, "model.safetensors.index.json"),
    )
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        tensors = {}
        for shard in sorted(set(read_json(index)["weight_map"].values())):
            tensors.update(load_file(os.path.join(folder, shard)))
        return tensors
    bins = [f for f in os.listdir(folder) if f.endswith(".bin")]
    raise ValueError(
        f"{folder} has no model.safetensors"
        + (f" (only {bins[0]}, a pickle this repo does not load)" if bins else "")
        + ": save it with transformers' save_pretrained(folder, safe_serialization=True)"
    )


def _init_weights(module):
    if isinstance(module, nn.Linear):
        torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)


# -----------------------------------------------------------------------------
# a small language model: separate key / query / value Linears, ReLU MLP


class MultiHeadAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.key = nn.Linear(C, C, bias=config.bias)
        self.query = nn.Linear(C, C, bias=config.bias)
        self.value = nn.Linear(C, C, bias=config.bias)
        self.proj = nn.Linear(C, C, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.n_head, self.p = config.n_head, config.dropout

    def forward(self, x, cache=None, layer=0):
        q, k, v = self.query(x), self.key(x), self.value(x)
        y = causal_attention(q, k, v, self.n_head, self.p, self.training, cache, layer)
        return self.dropout(self.proj(y))


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.fc2 = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.fc2(F.relu(self.fc1(x))))


class BigramBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.sa = MultiHeadAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.ffwd = FeedForward(config)

    def forward(self, x, cache=None, layer=0):
        x = x + self.sa(self.ln1(x), cache, layer)
        return x + self.ffwd(self.ln2(x))


class BigramLanguageModel(LanguageModel):
    """Token + position embeddings, blocks, LM head (untied). Same config and interface as GPT."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding_table = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList([BigramBlock(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.apply(_init_weights)

    def position_embedding(self):
        return self.position_embedding_table

    def forward(self, idx, targets=None, cache=None):
        pos = self.positions(idx, cache)
        x = self.token_embedding_table(idx) + self.position_embedding_table(pos)  # (b, t, n_embd)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        return self._lm_output(self.ln_f(x), targets, cache)


MODELS = {"gpt": GPT, "bigram": BigramLanguageModel}
