"""
Generalization bounds from compression (Lotfi et al.: SubLoRA, ICML 2024; tokens as data points,
NeurIPS 2024). Loads a checkpoint, quantises the trained vector (SubLoRA's w and gates, or any
adapter's tensors), arithmetic-codes it, and bounds the model's risk by its training loss plus a
complexity term in the code length.

    python eval_bounds.py --out_dir=out-shakespeare-sublora                 # one run: table, bounds.json, plot
    python eval_bounds.py --sweep_dir=out-sublora-sweep                     # every run of a sweep + Pareto plot
    python eval_bounds.py --out_dir=out-shakespeare-lora --levels=31        # a plain LoRA run (see README)
    python eval_bounds.py --out_dir=... --qat_steps=100 --eval_blocks=4000  # quantisation-aware tuning, more data

What is bounded, at confidence 1 - ε: token level, the average over the N training positions of the
expected smoothed loss of the token at each position given the text before it (Lotfi et al. 2024; not
the loss on unseen text); document level, the expected loss of a new document, the N training
documents assumed independent draws. Two token-level bounds from one pass (docs/bounds.md states and
proves them), the better reported, both paid for:
    R ≤ R̂ + Δ √((K ln 2 + ln(1/ε)) / (2N))                                   Azuma–Hoeffding
    R ≤ R̂ + ψ(λ)/(λΔ) · V̂ + Δ (K ln 2 + ln(1/ε)) / (λN),  ψ(λ) = −ln(1−λ) − λ   empirical Bernstein
V̂ is the mean of (loss − centre)², the centre the model's own expected loss at each position; λ from a
31-value grid. With s sampled blocks (N > exact_max_tokens; r = s / (s + N)) the complexity term takes
rε and a sampling term (1 − r)ε / M over the M hypotheses the samples chose among: Hoeffding's
Δ √(ln(M/((1 − r)ε)) / (2s)) or Maurer & Pontil's empirical Bernstein. K is the message length in bits
(the trainable tensors, quantised with one codebook per group, arithmetic-coded or sent raw, Elias-δ
length prefix) plus the choices: runs, level counts, α and the method (⌈log₂ 32⌉ = 5 bits). Δ is the
loss's range, log₂(1 + (1 − α) V / α) for smoothed bits, 1 for errors. Before any work, the prior (the
base the run names, fresh adapters from its seed) with the message must give the scored model's
logits bit for bit, or no bound is given.
"""

import bisect
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from adapters import adapter_state_dict, family_of
from checkpoint import CheckpointError, build_model, checkpoint_path, initial_model, load_checkpoint
from configurator import ConfigError, check_device, check_ranges, cli, config_defaults, configure
from files import atomic_write, file_sha256, read_json
from prepare import check_vocabulary, documents, load_tokenizer, read_meta, separator

out_dir = "out"  # a run to bound
sweep_dir = ""  # or every run below this folder (a sweep.py output), plus the Pareto plot
levels = 11  # quantisation centroids per tensor group
levels_grid = ""  # e.g. '7,11,21,31': the bound picks the count (paying ⌈log₂ |grid|⌉ bits); '' = levels
quant_init = "kmeans"  # 'bins' (equal-width over ±max|w|) | 'quantile' | 'kmeans' (Lloyd from the quantiles)
qat_steps = 0  # quantisation-aware fine-tuning of w and the centroids (straight-through estimator)
qat_lr = 1e-4  # learning rate of quantisation-aware tuning
alphas = "1e-4,1e-3,5e-3,0.01,0.05,0.1,0.25,0.5"  # prediction-smoothing grid; paid once: ⌈log₂ |grid|⌉ bits
topk = "1,10,100"  # k of the top-k error bounds
confidence = 0.95  # the bound holds with this probability (ε = 1 - confidence)
eval_blocks = 2000  # token level: s blocks of block_size training tokens, sampled with replacement
exact_max_tokens = 2_000_000  # a training set this small is scored whole (no sampling); 0 = always sample
eval_docs = 2000  # document level: s training documents, sampled with replacement
doc_separator = ""  # '' = <|endoftext|> for GPT-2 data, a blank line ('\n\n') for character data
overwrite = False  # replace a run's bounds.json (and its plot) from an earlier evaluation
choices = ""  # hyperparameter choices made by looking at results, 'name=count,...': ⌈log₂ Π count⌉ bits
batch_size = 64  # blocks per forward pass
device = "cuda" if torch.cuda.is_available() else "cpu"  # 'cpu', 'cuda', 'cuda:N' or 'mps'
seed = 1337  # seeds the sampled blocks and documents
plugins = ""  # modules imported first (names or .py paths): the families a run was trained with
DEFAULTS = config_defaults(globals())


# -----------------------------------------------------------------------------
# quantisation


def quantize(w, n_levels, init="kmeans", iters=20):
    """(centroids (n_levels,), symbols (d,)). 'bins': equal-width bins over ±max|w|, each centroid the
    mean of its bin (the bin centre when empty); 'quantile': the (k + ½) / n_levels quantiles of w;
    'kmeans': Lloyd iterations from the quantiles (least squared error). Centroids are rounded to fp16,
    as the codebook transmits them, before the symbols are chosen."""
    if init not in ("bins", "quantile", "kmeans"):
        raise ConfigError(f"quant_init must be 'bins', 'quantile' or 'kmeans', got {init!r}")
    w = w.detach().double()
    if init == "bins":
        m = float(w.abs().max()) or 1.0
        edges = torch.linspace(-m, m, n_levels + 1, dtype=torch.float64, device=w.device)
        centroids = (edges[:-1] + edges[1:]) / 2
        symbols = torch.bucketize(w, edges[1:-1])
        rounds = 1
    else:
        q = (torch.arange(n_levels, dtype=torch.float64, device=w.device) + 0.5) / n_levels
        centroids = (
            torch.quantile(w, q) if w.numel() <= 2**24 else w.sort().values[(q * (w.numel() - 1)).long()]
        )
        symbols = (w[:, None] - centroids[None, :]).abs().argmin(dim=1)
        rounds = iters if init == "kmeans" else 0
    for it in range(rounds):  # centroid <- mean of its members, then members <- nearest centroid
        total = torch.zeros_like(centroids).index_add_(0, symbols, w)
        count = torch.zeros_like(centroids).index_add_(0, symbols, torch.ones_like(w))
        centroids = torch.where(count > 0, total / count.clamp(min=1), centroids)
        symbols = (w[:, None] - centroids[None, :]).abs().argmin(dim=1)
    centroids = centroids.half().double()  # what the codebook transmits: 16 bits per level
    symbols = (w[:, None] - centroids[None, :]).abs().argmin(dim=1)
    return centroids, symbols


# -----------------------------------------------------------------------------
# arithmetic coding (Witten, Neal & Cleary 1987) with a static model: the symbol counts


PRECISION = 64
FULL, HALF, QUARTER = (1 << PRECISION) - 1, 1 << (PRECISION - 1), 1 << (PRECISION - 2)


def _cumulative(counts):
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    return cum


def arithmetic_encode(symbols, counts):
    """The bits (a list of 0/1) of `symbols` under the static model p(k) = counts[k] / Σ counts."""
    cum, total = _cumulative(counts), sum(counts)
    low, high, pending, bits = 0, FULL, 0, []

    def emit(bit):
        nonlocal pending
        bits.append(bit)
        bits.extend([1 - bit] * pending)
        pending = 0

    for s in symbols:
        span = high - low + 1
        high = low + span * cum[s + 1] // total - 1
        low = low + span * cum[s] // total
        while True:
            if high < HALF:
                emit(0)
            elif low >= HALF:
                emit(1)
                low, high = low - HALF, high - HALF
            elif low >= QUARTER and high < HALF + QUARTER:
                pending += 1
                low, high = low - QUARTER, high - QUARTER
            else:
                break
            low, high = 2 * low, 2 * high + 1
    pending += 1  # two more bits pick a point inside the final interval
    emit(0 if low < QUARTER else 1)
    return bits


def arithmetic_decode(bits, counts, n):
    cum, total = _cumulative(counts), sum(counts)
    low, high, value, pos = 0, FULL, 0, 0
    for _ in range(PRECISION):
        value = 2 * value + (bits[pos] if pos < len(bits) else 0)
        pos += 1
    out = []
    for _ in range(n):
        span = high - low + 1
        target = ((value - low + 1) * total - 1) // span
        s = bisect.bisect_right(cum, target) - 1  # the symbol whose interval holds target
        out.append(s)
        high = low + span * cum[s + 1] // total - 1
        low = low + span * cum[s] // total
        while True:
            if high < HALF:
                pass
            elif low >= HALF:
                low, high, value = low - HALF, high - HALF, value - HALF
            elif low >= QUARTER and high < HALF + QUARTER:
                low, high, value = low - QUARTER, high - QUARTER, value - QUARTER
            else:
                break
            low, high = 2 * low, 2 * high + 1
            value = 2 * value + (bits[pos] if pos < len(bits) else 0)
            pos += 1
    return out


def elias_delta_bits(n):
    """Length of the Elias-δ code of the integer n ≥ 1: ⌊log₂ n⌋ + 2⌊log₂(⌊log₂ n⌋ + 1)⌋ + 1. A prefix-free
    code of the integers (Kraft sum ≤ 1), unlike L + 2 log₂ L (whose sum over L is π²/6)."""
    b = int(n).bit_length()  # ⌊log₂ n⌋ + 1
    return b - 1 + 2 * (b.bit_length() - 1) + 1


def message_length(groups, extra_bits=0):
    """groups: [(symbols, n_levels)], one per codebook. Each group is sent the cheaper way, after one bit
    that says which: coded (arithmetic-coded under its own counts, then decoded and checked; + 16-bit
    centroids + the counts but the last, which d_g implies, at ⌈log₂(d_g + 1)⌉ bits each) or raw (its
    d_g values as fp16, no codebook: a handful of gate logits). L = Σ (1 + the cheaper), sent after its
    Elias-δ length so the message is prefix-free; `extra_bits` index the choices made (fixed width, the
    grids being known in advance). sent_raw[g] says which groups went raw: their values are then the fp16
    of the trained ones, not centroids."""
    code = codebook = count_bits = fp16_bits = 0
    entropy, sent_raw = 0.0, []
    for symbols, n_levels in groups:
        symbols = [int(v) for v in symbols]
        counts = [symbols.count(k) for k in range(n_levels)]
        bits = arithmetic_encode(symbols, counts)
        if arithmetic_decode(bits, counts, len(symbols)) != symbols:
            raise RuntimeError("arithmetic coder round trip failed")
        d = len(symbols)
        coded = len(bits) + 16 * n_levels + (n_levels - 1) * math.ceil(math.log2(d + 1))
        sent_raw.append(16 * d < coded)
        if sent_raw[-1]:
            fp16_bits += 16 * d
            continue
        code, codebook = code + len(bits), codebook + 16 * n_levels
        count_bits += (n_levels - 1) * math.ceil(math.log2(d + 1))
        entropy -= sum(c * math.log2(c / d) for c in counts if c)
    L = len(groups) + code + codebook + count_bits + fp16_bits
    length_bits = elias_delta_bits(L)
    return dict(
        code_bits=code,
        entropy_bits=entropy,
        codebook_bits=codebook,
        count_bits=count_bits,
        fp16_bits=fp16_bits,
        mode_bits=len(groups),
        sent_raw=sent_raw,
        L_bits=L,
        length_bits=length_bits,
        prefix_free_bits=L + length_bits,
        extra_bits=extra_bits,
        total_bits=L + length_bits + extra_bits,
    )


# -----------------------------------------------------------------------------
# bounds


def smoothed_range(alpha, vocab):
    """Δ: −log₂((1 − α) p + α / V) lies in [−log₂(1 − α + α/V), log₂(V/α)], a width of log₂(1 + (1 − α) V / α)."""
    return math.log2(1 + (1 - alpha) * vocab / alpha)


@dataclass
class Bound:
    """A bound as the sum of its parts, value = empirical + complexity + sampling: complexity pays for the
    message (K bits) and the confidence; sampling pays for scoring s sampled blocks instead of every
    position (exactly 0 when every position is scored). lam: the empirical-Bernstein λ chosen."""

    empirical: float
    complexity: float
    sampling: float = 0.0
    lam: float | None = None

    @property
    def value(self):
        return self.empirical + self.complexity + self.sampling


def bound(empirical, delta, K_bits, N, s, eps, candidates=1):
    """The Azuma–Hoeffding compression bound. Sampled (s of N points): with r = s / (s + N),
        R̂_s + Δ √((K ln 2 + ln(1/(rε))) / (2N)) + Δ √(ln(M/((1 - r)ε)) / (2s)),
    where M = `candidates` is how many hypotheses the sampled points chose among (α grid × runs × level
    counts): the sampling term holds for each with probability 1 - (1-r)ε/M, so for the chosen one by a
    union bound. Exact (s=None: every point scored, r = 1): R̂ + Δ √((K ln 2 + ln(1/ε)) / (2N)). K already
    pays for the choices, so the total failure probability is ε either way."""
    r = 1.0 if s is None else s / (s + N)
    complexity = delta * math.sqrt((K_bits * math.log(2) + math.log(1 / (r * eps))) / (2 * N))
    sampling = 0.0 if s is None else delta * math.sqrt(math.log(candidates / ((1 - r) * eps)) / (2 * s))
    return Bound(empirical, complexity, sampling)


# the empirical-Bernstein bound's λ grid (31 values; with Azuma–Hoeffding as a 32nd choice, 5 bits in K)
LAMBDAS = tuple(float(v) for v in np.geomspace(1e-3, 0.99, 31))


def psi(lam):
    """ψ(λ) = −ln(1 − λ) − λ (Fan, Grama & Liu 2012): exp(λξ − ψ(λ)ξ²) ≤ 1 + λξ for ξ ≥ −1, λ ∈ [0, 1)."""
    return -np.log1p(-lam) - lam


def bernstein(mean, second, delta, K_bits, N, eps, lambdas=LAMBDAS):
    """The empirical-Bernstein token bound (docs/bounds.md, theorem 2), every point scored: the least over
    the λ grid of R̂ + ψ(λ)/(λΔ) · V̂ + Δ (K ln 2 + ln(1/ε)) / (λN), where R̂ is the mean loss and V̂ the
    mean of (loss − centre)², the centre being the model's own expected loss at each position. K must
    pay for the λ grid. mean and second may be arrays (one bound per entry: the Bound's fields then are)."""
    lam = np.asarray(lambdas, dtype=np.float64)
    C = K_bits * math.log(2) + math.log(1 / eps)
    complexity = psi(lam) / (lam * delta) * np.asarray(second, np.float64)[..., None] + delta * C / (lam * N)
    best = complexity.argmin(-1)  # the mean does not depend on λ
    pick = lambda v: v[best] if np.ndim(v) == 1 else np.take_along_axis(v, best[..., None], -1)[..., 0]  # noqa: E731
    return Bound(np.asarray(mean, np.float64), pick(complexity), 0.0, lam[best])


def bernstein_sampled(stats, delta, K_bits, N, s, eps, candidates, lambdas=LAMBDAS):
    """The same with s of the N / block positions' blocks sampled with replacement (theorem 3): the
    full-data quantity R̂ + c V̂ (c = ψ(λ)/(λΔ)) is the mean of the block means z = x + c q, bounded
    from the s sampled ones by Maurer & Pontil's empirical Bernstein inequality (i.i.d. z in a range of
    Δ + cΔ²), union over the `candidates` hypotheses the samples chose among; r = s / (s + N) splits ε.
    stats: the sampled blocks' mean_x, mean_q, var_x, var_q, cov_xq (variances unbiased). The complexity
    part is c · mean_q + Δ (K ln 2 + ln(1/(rε))) / (λN), the sampling part Maurer & Pontil's terms."""
    r = s / (s + N)
    C = K_bits * math.log(2) + math.log(1 / (r * eps))
    L = math.log(2 * candidates / ((1 - r) * eps))
    best = None
    for lam in lambdas:
        c = float(psi(lam)) / (lam * delta)
        var = max(stats["var_x"] + 2 * c * stats["cov_xq"] + c * c * stats["var_q"], 0.0)
        complexity = c * stats["mean_q"] + delta * C / (lam * N)
        sampling = math.sqrt(2 * var * L / s) + 7 * (delta + c * delta**2) * L / (3 * (s - 1))
        if best is None or complexity + sampling < best.complexity + best.sampling:
            best = Bound(stats["mean_x"], complexity, sampling, lam)
    return best


def per_token_stats(model, x, y, alphas, ks, vocab):
    """For every target token and α: the smoothed loss −log₂ p̃(y) (p̃ = (1 − α) p + α / V), the model's
    own expectation of it before seeing y, Σ_v p(v) · −log₂ p̃(v) (the empirical-Bernstein centre: a
    function of the text before the token), whether y misses the top k, and the model's own chance of
    that, 1 − (the top k's probability): the error rows' centre."""
    logits, _ = model(x, y)
    logits = logits.float()[..., :vocab]
    if not torch.isfinite(logits).all():  # a nan rank compares false: the top-k errors would read 0
        raise ValueError(
            "the model's logits hold nan or inf: no bound is printed for a diverged model; bound a "
            "checkpoint from before it diverged"
        )
    p = F.softmax(logits, dim=-1)
    p_true = p.gather(-1, y[..., None]).squeeze(-1)
    smooth = torch.stack([-torch.log2((1 - a) * p_true + a / vocab) for a in alphas], dim=-1)  # (B, T, |α|)
    centre = torch.stack(
        [-p.mul(1 - a).add_(a / vocab).log2_().mul_(p).sum(-1) for a in alphas], dim=-1
    )  # one (B, T, V) temp
    rank = (logits >= logits.gather(-1, y[..., None])).sum(
        -1
    ) - 1  # others scored at or above the true one: ties count against it
    errors = torch.stack([(rank >= k).float() for k in ks], dim=-1)
    # the model's own chance, before seeing y, of missing its top k: the top-k rows' Bernstein centre
    top = p.topk(max(ks), dim=-1).values.cumsum(-1) if ks else p[..., :0]
    error_centre = torch.stack([1 - top[..., k - 1] for k in ks], dim=-1) if ks else errors
    return smooth, centre, errors, error_centre


# -----------------------------------------------------------------------------


def message_vector(model):
    """What training changed, and so what the message must carry: the trainable tensors (SubLoRA's w
    and gate logits; an adapter's factors, gates, magnitudes, rotations). Frozen buffers (PiSSA's U, V,
    NF4 codes) are part of the prior: they come from the base and the seed, not from the data."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {k: v for k, v in adapter_state_dict(model).items() if k in trainable}
    if not state:
        raise CheckpointError(
            "this checkpoint has no trained adapter: a bound needs the trained part to be small "
            "(train with --adapter=sublora or another adapter)"
        )
    return state


def message_groups(state):
    """{group: [tensor names]}: the tensors of one role (every lora_A, every lora_B, w, ...) share a
    codebook, since their scales differ by orders of magnitude from one role to the next."""
    groups = {}
    for name in state:
        groups.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return groups


def set_message(model, state):
    own = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def group_vector(state, names, dtype):
    """The group's tensors flattened into one vector, in `names` order."""
    return torch.cat([state[n].reshape(-1).to(dtype) for n in names])


def split_vector(v, state, names):
    """group_vector's inverse: {name: v's slice for it, in that tensor's shape}."""
    parts = v.split([state[n].numel() for n in names])
    return {n: part.view(state[n].shape) for n, part in zip(names, parts)}


def quantize_message(state, groups, n_levels, init):
    """{group: (centroids, symbols)} with `n_levels` centroids per group."""
    return {
        g: quantize(group_vector(state, names, torch.float64), n_levels, init) for g, names in groups.items()
    }


def send_raw(state, groups, coded, sent_raw):
    """coded, with each group message_length sends raw as (its fp16 values, one symbol per value)."""
    out = dict(coded)
    for (g, names), raw in zip(groups.items(), sent_raw):
        if raw:
            v = group_vector(state, names, torch.float64)
            out[g] = (v.half().double(), torch.arange(len(v), device=v.device))
    return out


def dequantize(state, groups, coded):
    """The message as the decoder rebuilds it: every tensor from its group's centroids and symbols."""
    out = {}
    for g, names in groups.items():
        centroids, symbols = coded[g]
        out.update(
            {n: t.to(state[n].dtype) for n, t in split_vector(centroids[symbols], state, names).items()}
        )
    return out


MEANING = {
    "token": "the average, over the N training positions scored (the run's part of train.bin), of the expected smoothed loss of the token at that "
    "position given the text before it (Lotfi et al. 2024: tokens as data points); not the loss on unseen "
    "text. No independence is assumed: the positions form a martingale",
    "document": "the expected loss (per-token average within a document) of a new document drawn like the training "
    "documents; assumes the N training documents are independent draws from one distribution",
}


def block_stats(x, q):
    """The sufficient statistics of sampled block means for bernstein_sampled (float64)."""
    cov = np.cov(x, q, ddof=1) if len(x) > 1 else np.zeros((2, 2))
    return dict(
        mean_x=float(x.mean()),
        mean_q=float(q.mean()),
        var_x=float(cov[0, 0]),
        var_q=float(cov[1, 1]),
        cov_xq=float(cov[0, 1]),
    )


def every_tensor(model):
    """{name: tensor} of every parameter and buffer, the buffers a state_dict leaves out included."""
    return {**dict(model.named_buffers()), **model.state_dict()}


@torch.no_grad()
def check_rebuild(prior, scored, message, x, y, what):
    """The receiver's model, the prior (initial_model) with `message` written in, must be the scored model
    tensor for tensor (every parameter and buffer equal) and give its logits bit for bit; otherwise one
    line naming what differs (state the message does not carry)."""
    set_message(prior, message)
    mine, theirs = every_tensor(prior), every_tensor(scored)
    differ = sorted(set(mine) ^ set(theirs))
    differ += [n for n, t in theirs.items() if n in mine and not torch.equal(mine[n].to(t.device), t)]
    if not differ and torch.equal(prior(x, y)[0], scored(x, y)[0]):
        return
    named = ", ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
    raise CheckpointError(
        f"{what}: the prior with the message is not the scored model "
        f"({named + ' differ from the prior: state the message does not carry' if differ else 'every tensor equal, the logits differ'}"
        "); a bound would describe another model, so none is given. Check that the base the run "
        "names is the one it trained on"
    )


@dataclass
class Run:
    """The run to bound, as open_run checked it."""

    dir: str
    kind: str
    train: np.ndarray  # the training tokens (a memmap)
    meta: dict | None
    block: int
    vocab: int
    model: torch.nn.Module  # the scored model
    state: dict  # the message: every trained tensor
    groups: dict  # codebook group -> tensor names
    d: int  # trained numbers
    prior: torch.nn.Module | None  # the receiver's model before the message
    probe: torch.Tensor  # one block: the logits check's input
    caveats: list
    checkpoint: dict  # what was scored: its iteration and the SHA-256 of ckpt.pt
    provenance: dict | None  # the data the run and its bases trained on (checkpoint.data_provenance)


def open_run(c, run_dir):
    """The run to bound, checked before any scoring: its checkpoint and training data, the scored model,
    its message, and the receiver's prior, which with the message must give the model's logits bit for
    bit."""
    ckpt = load_checkpoint(run_dir, map_location="cpu")
    scored = dict(iter_num=ckpt["iter_num"], sha256=file_sha256(checkpoint_path(run_dir)))
    check_earlier_bounds(run_dir, scored, c["overwrite"])
    cfg = ckpt["config"]
    refusal = family_of(ckpt["adapter"]["kind"]).unboundable(cfg)
    if refusal:
        raise ConfigError(f"{run_dir}: no bound: {refusal}")
    data_dir = cfg.get("data_dir") or os.path.join("data", cfg["dataset"])
    train = np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.uint16, mode="r")
    meta = read_meta(data_dir)
    # scored on the vocabulary it trained on, or refused
    check_vocabulary(ckpt.get("meta"), meta, run_dir, data_dir)
    provenance = ckpt.get("provenance")
    notes = prior_data(provenance, file_sha256(os.path.join(data_dir, "train.bin")), run_dir, cfg)
    if provenance:  # the part the run trained on is the part scored (prepare.py --prior_fraction)
        train = train[provenance["range"][0] : provenance["range"][1]]
    block = ckpt["model_args"]["block_size"]
    model = build_model(ckpt).to(c["device"]).eval()
    state = message_vector(model)
    groups = message_groups(state)
    d = sum(v.numel() for v in state.values())
    print(
        f"{run_dir}: {ckpt['adapter']['kind']} message of d = {d:,} trained numbers in {len(groups)} codebook "
        f"group(s): "
        + ", ".join(f"{g} ({sum(state[n].numel() for n in names):,})" for g, names in groups.items())
    )
    # the receiver's side: the prior (seeded base or the base run, fresh adapters from the run's seed), to
    # which the message is written; it must give the scored model's logits bit for bit, now and at the end
    prior = initial_model(ckpt, meta).to(c["device"]).eval()
    probe = torch.from_numpy(train[: block + 1].astype(np.int64))[None].to(
        c["device"]
    )  # one block, one forward
    check_rebuild(prior, model, state, probe[:, :-1], probe[:, 1:], run_dir)
    notes += caveats(meta)
    for caveat in notes:
        print(f"  warning: {caveat}")
    return Run(
        dir=run_dir,
        kind=ckpt["adapter"]["kind"],
        train=train,
        meta=meta,
        block=block,
        vocab=meta["vocab_size"] if meta else 50257,
        model=model,
        state=state,
        groups=groups,
        d=d,
        prior=prior,
        probe=probe,
        caveats=notes,
        checkpoint=scored,
        provenance=provenance,
    )


def check_earlier_bounds(run_dir, scored, overwrite):
    """bounds.json of an earlier evaluation: of this very checkpoint (`scored`: its iteration and
    SHA-256, which bounds.json records), or of an older file that records none, it is replaced only with
    --overwrite=True; of another checkpoint (the run was resumed since), it is stale and replaced, with
    a note naming what it bounded."""
    path = os.path.join(run_dir, "bounds.json")
    if not os.path.exists(path):
        return
    held = read_json(path).get("checkpoint", {})
    if held.get("sha256") not in (None, scored["sha256"]):
        print(
            f"note: {path} bounded iteration {held['iter_num']}, not the checkpoint now in {run_dir} (iteration "
            f"{scored['iter_num']}): it is stale and will be replaced"
        )
    elif not overwrite:
        raise ConfigError(
            f"{run_dir} already holds bounds.json for this checkpoint (iteration {scored['iter_num']}): pass "
            "--overwrite=True to replace it (or copy it away first)"
        )


def prior_data(provenance, scored_sha, run_dir, cfg):
    """What the bound assumes of the data its prior saw, from the run's provenance (checkpoint.
    data_provenance). The prior is the base (with the run's seed): each base in the chain that trained on
    tokens of this train.bin overlapping the scored ones means no bound (one line naming both ranges); a
    disjoint part is proven unseen; a base trained on another file, or one that recorded nothing (GPT-2,
    an older checkpoint), is a caveat in words. The scored file must be the one the run trained on.
    Returns the caveats."""
    if not provenance:  # a checkpoint from before runs recorded their data, or an import
        base = cfg.get("init_from", "scratch")
        return [] if base == "scratch" else [unrecorded(base)]
    if provenance["train_sha256"] != scored_sha:
        raise ConfigError(
            f"{run_dir}: no bound: {provenance['data_dir']}/train.bin changed since the run trained on it "
            f"(SHA-256 {provenance['train_sha256'][:12]}..., now {scored_sha[:12]}...): bound the data it trained on"
        )
    lo, hi = provenance["range"]
    out, base = [], provenance["base"]
    while isinstance(base, dict):
        if base["train_sha256"] != scored_sha:
            out.append(
                f"a base was trained on another file ({base['data_dir']}/train.bin, SHA-256 "
                f"{base['train_sha256'][:12]}...): the bound holds only if that file holds none of the scored text"
            )
        elif max(lo, base["range"][0]) < min(hi, base["range"][1]):
            raise ConfigError(
                f"{run_dir}: no bound: its prior's base trained on tokens [{base['range'][0]:,}, {base['range'][1]:,}) "
                f"of train.bin, which overlap the scored tokens [{lo:,}, {hi:,}); a prior must never have seen the "
                "data: pretrain on one part and fine-tune on the other (prepare.py --prior_fraction, train.py "
                "--data_part=prior / bound)"
            )
        base = base["base"]
    return out + ([unrecorded(base.removeprefix("unrecorded: "))] if base != "scratch" else [])


def unrecorded(base):
    """The caveat for a base whose training data nothing records."""
    where = (
        "GPT-2's training data (WebText, pages linked from Reddit) overlaps the web, where this text may be"
        if base.startswith("gpt2")
        else f"the base comes from {base!r}, which records no training data"
    )
    return (
        f"{where}: the bound holds only if that base never saw this training data (a prior must be fixed "
        "before the data); a base that saw it makes the bound invalid"
    )


def caveats(meta):
    """What the bound assumes of the vocabulary, in words."""
    if meta and meta.get("tokenizer") == "char":
        return [
            "the character vocabulary was read from the corpus itself: Δ and the random-guess line "
            "assume no character outside it"
        ]
    return []


def batches(c, train, block, starts):
    """(x, y) on the device, batch_size blocks of `block` tokens at a time, from the blocks at `starts`."""
    for i in range(0, len(starts), c["batch_size"]):
        ix = starts[i : i + c["batch_size"]].tolist()
        x = torch.stack([torch.from_numpy(train[j : j + block].astype(np.int64)) for j in ix])
        y = torch.stack([torch.from_numpy(train[j + 1 : j + 1 + block].astype(np.int64)) for j in ix])
        yield x.to(c["device"]), y.to(c["device"])


@torch.no_grad()
def score_blocks(c, r, blocks, alpha_grid, ks, desc):
    """Per scored block: for each α the block's mean loss x and mean (loss − centre)² q, and the same for
    each top-k error (the error rate and its centre's)."""
    mine = {}  # batch index -> its blocks' stats; under torchrun each process scores every world-th batch
    t, steps, tty = time.time(), -(-len(blocks) // c["batch_size"]), sys.stdout.isatty()
    rank, world = processes()
    for k in range(rank, steps, world):
        x, y = next(batches(c, r.train, r.block, blocks[k * c["batch_size"] : (k + 1) * c["batch_size"]]))
        s, m, e, me = per_token_stats(r.model, x, y, alpha_grid, ks, r.vocab)
        mine[k] = [
            v.mean(1).cpu()
            for v in (
                s.double(),
                (s.double() - m.double()).square(),
                e.double(),
                (e.double() - me.double()).square(),
            )
        ]
        done = (k + 1) / steps
        rate = (k + 1) * c["batch_size"] * r.block / (time.time() - t)
        line = (
            f"  {desc}: {100 * done:5.1f}% of {len(blocks)} blocks, {rate:,.0f} positions/s, "
            f"eta {(time.time() - t) * (1 / done - 1):.0f}s"
        )
        if tty:  # one line redrawn in a terminal; in a log file, a plain line every tenth
            print("\r" + line, end="\n" if k + 1 == steps else "", flush=True)
        elif (k + 1) * 10 // steps > k * 10 // steps:
            print(line, flush=True)
    every = gathered(mine)  # every batch's, in the order one process scores them: the same numbers
    return tuple(torch.cat([every[k][i] for k in range(steps)]).numpy() for i in range(4))


def processes():
    """(rank, world size): torchrun's, else (0, 1)."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gathered(mine):
    """The union of every process's {batch index: values} (this process's own when alone)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return mine
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def once(make):
    """make() computed by process 0 alone and sent to the others (the message is coded once)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return make()
    box = [make() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def one_bound(x, q, delta, K_bits, N, s, eps, M):
    """(Azuma–Hoeffding, empirical Bernstein, the latter's inputs) from the scored blocks' means x of a
    loss in [0, Δ] and q of its squared distance to the centre (s None: every block scored)."""
    if s is None:
        inputs = dict(mean_x=float(x.mean()), mean_q=float(q.mean()))
        be = bernstein(inputs["mean_x"], inputs["mean_q"], delta, K_bits, N, eps)
        be = Bound(float(be.empirical), float(be.complexity), 0.0, float(be.lam))
    else:
        inputs = block_stats(x, q)
        be = bernstein_sampled(inputs, delta, K_bits, N, s, eps, M)
    return bound(float(x.mean()), delta, K_bits, N, s, eps, M), be, inputs


def token_bounds(xb, qb, K_bits, alpha_grid, vocab, N, s, eps, M):
    """Per α: one_bound of the smoothed bits, from the scored blocks' x and q."""
    return [
        one_bound(xb[:, j], qb[:, j], smoothed_range(a, vocab), K_bits, N, s, eps, M)
        for j, a in enumerate(alpha_grid)
    ]


@dataclass
class Payment:
    """K, term by term: the bits each bound pays for what was chosen before or by looking at the data."""

    message: int  # the coded message and its Elias-δ length prefix
    choices: int  # the runs of a sweep and the level count: ⌈log₂ count⌉
    alpha: int  # the bits bounds' α: ⌈log₂ |grid|⌉
    method: int  # the token bits bound's method: Azuma–Hoeffding or empirical Bernstein at one λ

    def bits(self, *terms):
        """message + choices + the named terms."""
        return self.message + self.choices + sum(getattr(self, t) for t in terms)


@dataclass
class TokenLevel:
    """What token_level found: the scored positions, what K paid, and the chosen level count's bounds."""

    N: int  # training positions the blocks cover
    eps: float
    exact: bool  # every position scored (no sampling part)
    s: int | None  # sampled blocks (None when exact)
    before: float  # the unquantised model's loss at the grid's first α
    grid: dict  # the sweep's choices, name -> count
    choice_count: int
    M: int  # hypotheses the sampled blocks chose among (α × method × choices)
    K: Payment = None
    levels: int = 0
    error_blocks: tuple = ()  # (per block and k: the error rate, its mean squared distance to the centre)
    msg: dict = field(default_factory=dict)
    per_alpha: list = field(default_factory=list)
    smooth: list = field(default_factory=list)


def token_level(c, r, gen, alpha_grid, ks, level_grid):
    """Score the training blocks (all, or a sample drawn from `gen`), quantise the message at every level
    count of the grid, and keep the count with the best token bound; the model then holds that message,
    checked against the prior once more. Every choice made by looking at the data is paid once: runs of
    a sweep and the level count (in K and every union), α (K of the bits bounds), and the bits bound's
    method, Azuma–Hoeffding or empirical Bernstein at one of the λ grid's values (K and the sampling
    union)."""
    # blocks of block_size tokens at multiples of block_size (each token scored with its prefix in the
    # block); N counts the positions those blocks cover
    n_blocks = (len(r.train) - 1) // r.block
    N = n_blocks * r.block
    exact = N <= c["exact_max_tokens"]
    if exact:  # every training position scored once: no sampling term
        blocks = torch.arange(n_blocks, device="cpu") * r.block
    else:
        blocks = torch.randint(n_blocks, (c["eval_blocks"],), generator=gen, device="cpu") * r.block
    print(
        f"  token level: {'all' if exact else 'a sample of'} {len(blocks):,} of the {n_blocks:,} blocks of {r.block} "
        f"(N = {N:,} positions){'' if exact else ', sampled with replacement'}"
    )
    unquantised = score_blocks(c, r, blocks, alpha_grid, ks, "unquantised")[0]
    grid = dict(kv.split("=") for kv in c["choices"].split(",") if kv)
    choice_count = (math.prod(int(v) for v in grid.values()) if grid else 1) * len(level_grid)
    t = TokenLevel(
        N=N,
        eps=1 - c["confidence"],
        exact=exact,
        s=None if exact else len(blocks),
        before=float(unquantised[:, 0].mean()),  # at the grid's first α
        grid=grid,
        choice_count=choice_count,
        M=len(alpha_grid) * (len(LAMBDAS) + 1) * choice_count,
    )
    choice_bits = math.ceil(math.log2(choice_count)) if choice_count > 1 else 0
    alpha_bits = math.ceil(math.log2(len(alpha_grid)))
    method_bits = math.ceil(math.log2(len(LAMBDAS) + 1))

    tried = []
    qat_gen = torch.Generator().manual_seed(c["seed"] + 1)  # apart from the sampled blocks' draws
    for n_levels in level_grid:  # each group quantised (and optionally tuned) at every level count
        coded = quantize_message(r.state, r.groups, n_levels, c["quant_init"])
        if c["qat_steps"]:
            coded = once(
                lambda coded=coded: quantization_aware_tuning(
                    c,
                    r.model,
                    r.state,
                    r.groups,
                    coded,
                    functools.partial(batches, c, r.train, r.block),
                    qat_gen,
                    n_blocks,
                    r.block,
                )
            )
        msg = once(
            lambda: message_length(
                [(symbols.tolist(), n_levels) for _, symbols in coded.values()], extra_bits=choice_bits
            )
        )
        K = Payment(msg["total_bits"] - choice_bits, choice_bits, alpha_bits, method_bits)
        coded = send_raw(r.state, r.groups, coded, msg["sent_raw"])
        set_message(r.model, dequantize(r.state, r.groups, coded))
        xb, qb, *errors = score_blocks(c, r, blocks, alpha_grid, ks, f"quantised, {n_levels} levels")
        bits = K.bits("alpha", "method")
        per_alpha = token_bounds(xb, qb, bits, alpha_grid, r.vocab, t.N, t.s, t.eps, t.M)
        best = min(min(ah.value, be.value) for ah, be, _ in per_alpha)
        print(
            f"  {n_levels} levels: {xb[:, 0].mean():.4f} bits per token unsmoothed, K = {msg['total_bits']:,} bits, "
            f"best token bound {best:.4f}"
        )
        tried.append((best, n_levels, coded, xb, errors, msg, per_alpha, K))
    _, t.levels, coded, xb, t.error_blocks, t.msg, t.per_alpha, t.K = min(tried, key=lambda row: row[0])
    t.smooth = xb.mean(0).tolist()
    message = dequantize(r.state, r.groups, coded)
    set_message(r.model, message)
    check_rebuild(r.prior, r.model, message, r.probe[:, :-1], r.probe[:, 1:], f"{r.dir}, quantised message")
    m = t.msg
    print(
        f"  message: {len(r.groups)} mode bits + {m['code_bits']:,} code bits (entropy bound {m['entropy_bits']:.0f}) + "
        f"{m['codebook_bits']} codebook + {m['count_bits']} counts + {m['fp16_bits']} fp16 (groups sent raw: "
        f"{sum(m['sent_raw'])}) = L = {m['L_bits']:,}; + Elias-δ(L) = {m['length_bits']} bits; + ⌈log₂ "
        f"{t.choice_count}⌉ = {t.K.choices} bits for the choices {dict(t.grid, levels=len(level_grid))} = K = "
        f"{t.K.bits():,} bits; bits bounds also pay ⌈log₂ {len(alpha_grid)}⌉ = {t.K.alpha} for α and "
        f"{t.K.method} for the method"
    )
    return t


def document_separator(c, meta):
    """The token ids between two training documents."""
    if c["doc_separator"]:
        return load_tokenizer(meta)[0](c["doc_separator"].encode().decode("unicode_escape"))
    return separator(meta)


def top_k_rows(level, errors, ks, vocab, K_bits, N, s, eps, candidates):
    """The top-k error rows of one level: the rate the true token falls outside the k most likely, bounded
    with Δ = 1 (capped at 1)."""
    return {
        f"{level}_top{k}_error": dict(
            empirical=e,
            bound=min(1.0, bound(e, 1.0, K_bits, N, s, eps, candidates).value),
            delta=1.0,
            random_guess=1 - k / vocab,
        )
        for k, e in zip(ks, errors)
    }


def token_error_rows(t, ks, vocab, eps):
    """The token-level top-k error rows (Δ = 1): Azuma–Hoeffding or empirical Bernstein, whose centre is
    the model's own chance of missing its top k, the smaller; the method is paid for in K and in the
    sampling union, as for the bits rows (the error rows choose no α)."""
    K_bits, M = t.K.bits("method"), (len(LAMBDAS) + 1) * t.choice_count
    rows = {}
    for j, k in enumerate(ks):
        x, q = t.error_blocks[0][:, j], t.error_blocks[1][:, j]
        ah, be, inputs = one_bound(x, q, 1.0, K_bits, t.N, t.s, eps, M)
        best = min(ah, be, key=lambda b: b.value)
        rows[f"token_top{k}_error"] = dict(
            empirical=float(x.mean()),
            bound=min(1.0, best.value),
            delta=1.0,
            random_guess=1 - k / vocab,
            method="empirical Bernstein" if best is be else "Azuma-Hoeffding",
            bound_hoeffding=ah.value,
            bound_bernstein=be.value,
            lam=be.lam,
            inputs=inputs,
        )
    return rows


def evaluate(c, run_dir):
    t0 = time.time()
    alpha_grid = [float(a) for a in c["alphas"].split(",")]
    level_grid = [int(v) for v in c["levels_grid"].split(",")] if c["levels_grid"] else [c["levels"]]
    if min(level_grid) < 2:
        raise ConfigError(f"quantisation needs at least 2 levels, got {level_grid}")
    r = open_run(c, run_dir)
    vocab, eps = r.vocab, 1 - c["confidence"]
    ks = [k for k in (int(k) for k in c["topk"].split(",")) if k < vocab]
    gen = torch.Generator().manual_seed(c["seed"])
    t = token_level(c, r, gen, alpha_grid, ks, level_grid)
    del r.prior
    # document level: per-document average losses of s sampled documents
    starts, ends = documents(np.asarray(r.train), document_separator(c, r.meta))
    doc_ix = torch.randint(len(starts), (c["eval_docs"],), generator=gen, device="cpu").numpy()
    doc_smooth, doc_err = doc_level(
        r.model, r.train, starts[doc_ix], ends[doc_ix], r.block, alpha_grid, ks, vocab, c
    )
    N_doc, s_doc = len(starts), len(doc_ix)

    results = {
        "run": run_dir,
        "kind": r.kind,
        "d": r.d,
        "levels": t.levels,
        "levels_grid": level_grid,
        "groups": {g: len(names) for g, names in r.groups.items()},
        "vocab": vocab,
        "N_tokens": t.N,
        "N_documents": N_doc,
        "s_blocks": t.s,
        "exact": t.exact,
        "s_documents": s_doc,
        "confidence": c["confidence"],
        "meaning": MEANING,
        "caveats": r.caveats,
        "checkpoint": r.checkpoint,
        "provenance": r.provenance,
        "loss_before_quantization_bits": t.before,
        "loss_after_quantization_bits": t.smooth[0],
        "message": t.msg,
        "alphas": alpha_grid,
        "lambdas": list(LAMBDAS),
        "K_terms": asdict(t.K),
        "K_bits": {
            "bpd": t.K.bits("alpha", "method"),
            "token_error": t.K.bits("method"),
            "document_error": t.K.bits(),
        },
        "candidates": {
            "bpd": t.M,
            "token_error": (len(LAMBDAS) + 1) * t.choice_count,
            "document_error": t.choice_count,
        },
        "token_bpd_inputs": [inputs for _, _, inputs in t.per_alpha],
        "metrics": {},
        "token_bpd_parts": {},
    }
    metrics = results["metrics"]
    common = dict(empirical_per_alpha=t.smooth, random_guess=math.log2(vocab))
    for name, which in (("hoeffding", 0), ("bernstein", 1)):
        per_alpha = [row[which] for row in t.per_alpha]
        j = int(np.argmin([b.value for b in per_alpha]))
        best = per_alpha[j]
        metrics[f"token_bpd_{name}"] = dict(
            empirical=t.smooth[j],
            bound=best.value,
            alpha=alpha_grid[j],
            delta=smoothed_range(alpha_grid[j], vocab),
            per_alpha=[b.value for b in per_alpha],
            **({"lam": best.lam} if best.lam is not None else {}),
            **common,
        )
        # where the bound comes from, part by part: each term as the bound function computed it
        results["token_bpd_parts"][name] = {  # the first two at the grid's first α, named so
            f"unquantised (α = {alpha_grid[0]:g})": t.before,
            "quantisation": t.smooth[0] - t.before,
            f"smoothing (α = {alpha_grid[0]:g} -> {alpha_grid[j]:g})": best.empirical - t.smooth[0],
            "complexity": best.complexity,
            "sampling": best.sampling,
        }
    ah, be = metrics["token_bpd_hoeffding"], metrics["token_bpd_bernstein"]
    better = dict(
        be if be["bound"] < ah["bound"] else ah,
        method="empirical Bernstein" if be["bound"] < ah["bound"] else "Azuma-Hoeffding",
    )
    metrics = results["metrics"] = {"token_bpd": better, **metrics}
    metrics.update(token_error_rows(t, ks, vocab, eps))
    results["token_error_inputs"] = {k: metrics[f"token_top{k}_error"].pop("inputs") for k in ks}
    per_doc = [
        bound(
            v,
            smoothed_range(a, vocab),
            t.K.bits("alpha"),
            N_doc,
            s_doc,
            eps,
            len(alpha_grid) * t.choice_count,
        )
        for v, a in zip(doc_smooth, alpha_grid)
    ]
    j = int(np.argmin([b.value for b in per_doc]))
    metrics["document_bpd"] = dict(
        empirical=doc_smooth[j],
        bound=per_doc[j].value,
        alpha=alpha_grid[j],
        delta=smoothed_range(alpha_grid[j], vocab),
        per_alpha=[b.value for b in per_doc],
        empirical_per_alpha=doc_smooth,
        random_guess=math.log2(vocab),
    )
    metrics.update(top_k_rows("document", doc_err, ks, vocab, t.K.bits(), N_doc, s_doc, eps, t.choice_count))
    results["seconds"] = time.time() - t0
    print_table(results)
    if processes()[0] != 0:  # under torchrun, process 0 writes
        return results
    atomic_write(os.path.join(run_dir, "bounds.json"), json.dumps(results, indent=1))
    import plots

    print(
        f"  wrote {run_dir}/bounds.json, {plots.plot_bound_vs_alpha(run_dir, results)} and "
        f"{plots.plot_bound_parts(run_dir, results)}"
    )
    return results


@torch.no_grad()
def doc_level(model, train, starts, ends, block, alpha_grid, ks, vocab, c):
    """Mean over the sampled documents of each document's mean smoothed loss / error. Every token of a
    document is scored, its first from the separator's last token (the corpus' first document, with
    nothing before it, from its second token); a long document in block_size chunks, each token with
    its prefix in the chunk."""
    chunks = []  # (document index, input start, length)
    for i, (a, b) in enumerate(zip(starts, ends)):
        for j in range(max(a - 1, 0), b - 1, block):
            chunks.append((i, j, min(block, b - 1 - j)))
    sums = torch.zeros(len(starts), len(alpha_grid), device="cpu")  # host-side sums of the batches' stats
    errs = torch.zeros(len(starts), len(ks), device="cpu")
    count = torch.zeros(len(starts), device="cpu")
    mine, (rank, world) = {}, processes()
    for k in range(rank * c["batch_size"], len(chunks), world * c["batch_size"]):  # this process's batches
        part = chunks[k : k + c["batch_size"]]
        x = torch.zeros(
            len(part), block, dtype=torch.long, device="cpu"
        )  # filled from the memmap, then moved
        y = torch.zeros(len(part), block, dtype=torch.long, device="cpu")
        mask = torch.zeros(len(part), block, device="cpu")
        for r, (i, j, n) in enumerate(part):
            x[r, :n] = torch.from_numpy(train[j : j + n].astype(np.int64))
            y[r, :n] = torch.from_numpy(train[j + 1 : j + 1 + n].astype(np.int64))
            mask[r, :n] = 1
        s, _, e, _ = per_token_stats(model, x.to(c["device"]), y.to(c["device"]), alpha_grid, ks, vocab)
        s, e = s.cpu() * mask[..., None], e.cpu() * mask[..., None]
        mine[k] = (torch.tensor([i for i, _, _ in part], device="cpu"), s.sum(1), e.sum(1), mask.sum(1))
    for _, (idx, s, e, n) in sorted(gathered(mine).items()):  # added in one order: the same sums everywhere
        sums.index_add_(0, idx, s)
        errs.index_add_(0, idx, e)
        count.index_add_(0, idx, n)
    doc_smooth = (sums / count[:, None]).mean(0).tolist()
    doc_err = (errs / count[:, None]).mean(0).tolist()
    return doc_smooth, doc_err


def quantization_aware_tuning(c, model, state, groups, coded, batches, gen, n_blocks, block):
    """Fine-tune the message and every group's centroids on training batches through the quantiser:
    the forward uses each coordinate's nearest centroid, the gradient passes to the coordinate unchanged
    (straight-through) and to the centroid it picked. Returns {group: (centroids, symbols)}."""
    flats = {g: group_vector(state, names, torch.float32).requires_grad_(True) for g, names in groups.items()}
    cents = {g: coded[g][0].float().clone().requires_grad_(True) for g in groups}
    opt = torch.optim.Adam([*flats.values(), *cents.values()], lr=c["qat_lr"])
    params = dict(model.named_parameters())
    for step in range(c["qat_steps"]):
        override = {}
        for g, names in groups.items():
            w, cg = flats[g], cents[g]
            idx = (w.detach()[:, None] - cg.detach()[None, :]).abs().argmin(dim=1)
            wq = cg[idx] + (w - w.detach())  # straight-through to w, exact gradient to the centroids
            override.update(split_vector(wq, state, names))
        starts = torch.randint(n_blocks, (c["batch_size"],), generator=gen, device="cpu") * block
        x, y = next(batches(starts))
        loss = torch.func.functional_call(
            model, {**{k: p for k, p in params.items() if k not in override}, **override}, (x, y)
        )[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, c["qat_steps"] // 5) == 0:
            print(f"  qat step {step}/{c['qat_steps']}: loss {loss.item():.4f}")
    out = {}
    for g in groups:
        cg = cents[g].detach().double().half().double()
        out[g] = (cg, (flats[g].detach().double()[:, None] - cg[None, :]).abs().argmin(dim=1))
    return out


def print_table(r):
    print(
        f"  bits per token at α = {r['alphas'][0]:g} before / after quantisation: "
        f"{r['loss_before_quantization_bits']:.4f} / "
        f"{r['loss_after_quantization_bits']:.4f}; K = {r['message']['total_bits']:.0f} bits, "
        f"N = {r['N_tokens']:,} tokens / {r['N_documents']:,} documents"
    )
    for name, parts in r["token_bpd_parts"].items():
        print(
            f"  token bits bound ({name}), part by part: "
            + " + ".join(f"{k} {v:.4f}" for k, v in parts.items())
            + f" = {r['metrics']['token_bpd_' + name]['bound']:.4f}"
        )
    print(f"  {'metric':<22} {'empirical':>10} {'bound':>8} {'random guess':>13} {'α':>7}")
    for name, m in r["metrics"].items():
        alpha = f"{m['alpha']:g}" if "alpha" in m else ""
        print(
            f"  {name:<22} {m['empirical']:>10.4f} {m['bound']:>8.4f} {m['random_guess']:>13.4f} {alpha:>7}"
        )
    b = r["metrics"]["token_bpd"]
    print(
        f"  with {100 * r['confidence']:g}% confidence, {b['bound']:.4f} bits per token ({b['method']}) bounds {MEANING['token']}."
        f"\n  The document rows bound {MEANING['document']}. Every top-k row bounds the same average for the error "
        "(the true token outside the model's k most likely)."
    )


def main(argv):
    """The bounds of one run or of a sweep's runs; under torchrun (RANK set) the scoring is shared by the
    processes, process 0 alone printing and writing."""
    if int(os.environ.get("RANK", -1)) == -1:
        return bound_runs(argv)
    import contextlib
    import io

    import torch.distributed as dist

    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    quiet = contextlib.redirect_stdout(io.StringIO()) if dist.get_rank() else contextlib.nullcontext()
    try:
        with quiet:
            return bound_runs(argv)
    finally:
        dist.destroy_process_group()


def bound_runs(argv):
    c = configure(DEFAULTS, argv, {})
    check_ranges(
        c,
        {
            "levels": "[2, 65536]",
            "confidence": "(0, 1)",
            "eval_blocks": "[2, inf)",  # Maurer & Pontil's term divides by s - 1
            "eval_docs": "[1, inf)",
            "batch_size": "[1, inf)",
            "qat_steps": "[0, inf)",
            "qat_lr": "(0, inf)",
            "exact_max_tokens": "[0, inf)",
        },
    )
    for a in c["alphas"].split(","):
        if not 0 < float(a) < 1:
            raise ConfigError(f"every α in --alphas must be in (0, 1), got {a}")
    for k in c["topk"].split(","):
        if not k.strip().isdigit() or int(k) < 1:
            raise ConfigError(f"every k in --topk must be an integer >= 1, got {k!r} (e.g. --topk=1,10,100)")
    for item in (kv for kv in c["choices"].split(",") if kv):
        name, eq, count = item.partition("=")
        if not eq or not name or not count.isdigit() or int(count) < 1:
            raise ConfigError(
                f"--choices item {item!r} is not name=count with a count >= 1 (e.g. "
                "--choices=intrinsic_dim=2,allocation=5,seed=3)"
            )
    if c["device"] == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per process
        c["device"] = f"cuda:{os.environ['LOCAL_RANK']}"
    check_device(c["device"])
    torch.manual_seed(c["seed"])
    if not c["sweep_dir"]:
        return [evaluate(c, c["out_dir"])]
    runs = sorted(
        os.path.join(c["sweep_dir"], d)
        for d in os.listdir(c["sweep_dir"])
        if os.path.isfile(os.path.join(c["sweep_dir"], d, "ckpt.pt"))
    )
    if not runs:
        raise ConfigError(f"no run with a ckpt.pt under {c['sweep_dir']!r}")
    grid = math.prod(int(kv.partition("=")[2]) for kv in c["choices"].split(",") if kv)
    if grid < len(runs):  # the best of the sweep is a choice made by looking: paid for, asked or not
        print(
            f"note: the sweep holds {len(runs)} runs and --choices covers {grid}: every bound pays for choosing "
            f"among {len(runs)} (⌈log₂ {len(runs)}⌉ bits in K and the union)"
        )
        c["choices"] = f"runs={len(runs)}"
    results = [evaluate(c, r) for r in runs]
    import plots

    if processes()[0] == 0:
        print(f"wrote {plots.plot_pareto(c['sweep_dir'], results)}")
    return results


if __name__ == "__main__":
    cli(main, sys.argv[1:])
