"""
Generalization bounds from compression (Lotfi et al.: SubLoRA, ICML 2024; tokens as data points,
NeurIPS 2024). Loads a checkpoint, quantises the trained vector (SubLoRA's w and gates, or any
adapter's tensors), arithmetic-codes it, and bounds the expected loss on unseen data by the training
loss plus a complexity term in the code length.

    python eval_bounds.py --out_dir=out-shakespeare-sublora                 # one run: table, bounds.json, plot
    python eval_bounds.py --sweep_dir=out-sublora-sweep                     # every run of a sweep + Pareto plot
    python eval_bounds.py --out_dir=out-shakespeare-lora --levels=31        # a plain LoRA run (see README)
    python eval_bounds.py --out_dir=... --qat_steps=100 --eval_blocks=4000  # quantisation-aware tuning, more data

The bound (ε = 1 - confidence, r = s / (s + N)):
    R ≤ R̂_s + Δ √((K ln 2 + ln(1/(r ε))) / (2N)) + Δ √(ln(1/((1 - r) ε)) / (2s))
token level: N training tokens, s sampled blocks of block_size tokens (each scored with its prefix in
the block); document level: N training documents, s sampled documents. K is the message length in
bits; Δ the range of the loss: log₂(1 + (1 - α) V / α) for the smoothed bits per token, 1 for errors.
"""

import bisect
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from adapters import adapter_state_dict
from checkpoint import CheckpointError, build_model, load_checkpoint
from configurator import ConfigError, config_defaults, configure
from prepare import EOT, DownloadError, load_tokenizer, read_meta

out_dir = "out"  # a run to bound
sweep_dir = ""  # or every run below this folder (a sweep.py output), plus the Pareto plot
levels = 11  # quantisation centroids (odd: 0 is representable)
quant_init = "bins"  # 'bins' (equal-width bins over ±max|w|, each centroid its bin's mean) | 'kmeans'
qat_steps = 0  # quantisation-aware fine-tuning of w and the centroids (straight-through estimator)
qat_lr = 1e-4
alphas = "1e-4,1e-3,5e-3,0.01,0.05,0.1,0.25,0.5"  # prediction-smoothing grid; paid once: ⌈log₂ |grid|⌉ bits
topk = "1,10,100"
confidence = 0.95  # the bound holds with this probability (ε = 1 - confidence)
eval_blocks = 2000  # token level: s blocks of block_size training tokens, sampled with replacement
eval_docs = 2000  # document level: s training documents, sampled with replacement
doc_separator = ""  # '' = <|endoftext|> for GPT-2 data, a blank line ('\n\n') for character data
choices = ""  # hyperparameter choices made by looking at results, 'name=count,...': ⌈log₂ Π count⌉ bits
batch_size = 64
device = "cuda" if torch.cuda.is_available() else "cpu"
seed = 1337
DEFAULTS = config_defaults(globals())


# -----------------------------------------------------------------------------
# quantisation


def quantize(w, n_levels, init="bins", iters=20):
    """(centroids (n_levels,), symbols (d,)): equal-width bins over ±max|w|, each centroid the mean of
    its bin (the bin centre when empty), then optionally Lloyd (k-means) iterations."""
    w = w.detach().double()
    m = float(w.abs().max()) or 1.0
    edges = torch.linspace(-m, m, n_levels + 1, dtype=torch.float64, device=w.device)
    centroids = (edges[:-1] + edges[1:]) / 2
    for it in range(iters if init == "kmeans" else 1):
        symbols = (w[:, None] - centroids[None, :]).abs().argmin(dim=1) if it else \
            torch.bucketize(w, edges[1:-1])
        for k in range(n_levels):
            members = w[symbols == k]
            if len(members):
                centroids[k] = members.mean()
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


def message_length(symbols, n_levels, extra_bits=0):
    """Encode, decode and check, and return the parts of the message length in bits."""
    symbols = [int(s) for s in symbols]
    counts = [symbols.count(k) for k in range(n_levels)]
    bits = arithmetic_encode(symbols, counts)
    if arithmetic_decode(bits, counts, len(symbols)) != symbols:
        raise RuntimeError("arithmetic coder round trip failed")
    d = len(symbols)
    code, codebook, count_bits = len(bits), 16 * n_levels, n_levels * math.ceil(math.log2(d + 1))
    L = code + codebook + count_bits
    prefix_free = L + 2 * math.log2(L)  # a prefix-free code for the integers (Lotfi et al.)
    entropy = -sum(c * math.log2(c / d) for c in counts if c)
    return dict(code_bits=code, entropy_bits=entropy, codebook_bits=codebook, count_bits=count_bits,
                raw_bits=L, prefix_free_bits=prefix_free, extra_bits=extra_bits, total_bits=prefix_free + extra_bits)


# -----------------------------------------------------------------------------
# bounds


def smoothed_range(alpha, vocab):
    """Δ: −log₂((1 − α) p + α / V) lies in [−log₂(1 − α + α/V), log₂(V/α)], a width of log₂(1 + (1 − α) V / α)."""
    return math.log2(1 + (1 - alpha) * vocab / alpha)


def bound(empirical, delta, K_bits, N, s, eps):
    """The compression bound with subsampling: R̂_s + Δ √((K ln2 + ln(1/(rε)))/(2N)) + Δ √(ln(1/((1-r)ε))/(2s))."""
    r = s / (s + N)
    return (empirical + delta * math.sqrt((K_bits * math.log(2) + math.log(1 / (r * eps))) / (2 * N))
            + delta * math.sqrt(math.log(1 / ((1 - r) * eps)) / (2 * s)))


def per_token_stats(model, x, y, alphas, ks, vocab):
    """For every target token: −log₂ p̃ for each α and whether the true token misses the top k."""
    logits, _ = model(x, y)
    logits = logits.float()[..., :vocab]
    logp = F.log_softmax(logits, dim=-1)
    p_true = logp.gather(-1, y[..., None]).squeeze(-1).exp()
    smooth = torch.stack([-torch.log2((1 - a) * p_true + a / vocab) for a in alphas], dim=-1)  # (B, T, |α|)
    rank = (logits > logits.gather(-1, y[..., None])).sum(-1)  # tokens scored above the true one
    errors = torch.stack([(rank >= k).float() for k in ks], dim=-1)
    return smooth, errors


def documents(train, separator):
    """(start, end) of every training document: the spans between separator token sequences."""
    sep = np.asarray(separator, dtype=train.dtype)
    hits = np.flatnonzero(np.all([train[i : len(train) - len(sep) + 1 + i] == t for i, t in enumerate(sep)], axis=0))
    starts = np.concatenate([[0], hits + len(sep)])
    ends = np.concatenate([hits, [len(train)]])
    keep = ends - starts >= 2  # a document needs a token and a next token
    return starts[keep], ends[keep]


# -----------------------------------------------------------------------------


def message_vector(model):
    """The trained numbers the message must carry: SubLoRA's w (and gate logits), else every adapter
    tensor (the base model is the known prior)."""
    state = adapter_state_dict(model)
    if not state:
        raise CheckpointError("this checkpoint has no adapter: a bound needs the trained part to be small "
                              "(train with --adapter=sublora or another adapter)")
    return state


def set_message(model, state):
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def evaluate(c, run_dir):
    t0 = time.time()
    eps = 1 - c["confidence"]
    alpha_grid = [float(a) for a in c["alphas"].split(",")]
    ckpt = load_checkpoint(run_dir, map_location="cpu")
    cfg = ckpt["config"]
    data_dir = cfg.get("data_dir") or os.path.join("data", cfg["dataset"])
    train = np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.uint16, mode="r")
    meta = read_meta(data_dir)
    vocab = meta["vocab_size"] if meta else 50257
    ks = [k for k in (int(k) for k in c["topk"].split(",")) if k < vocab]
    block = ckpt["model_args"]["block_size"]
    model = build_model(ckpt).to(c["device"]).eval()
    state = message_vector(model)
    names = list(state)
    flat = torch.cat([state[n].reshape(-1).double() for n in names])
    d = flat.numel()
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more tensors" if len(names) > 3 else "")
    print(f"{run_dir}: {ckpt['adapter']['kind']} message of d = {d:,} numbers ({shown})")
    base = cfg.get("init_from", "scratch")
    caveat = None
    if base not in ("scratch",) and not base.startswith("gpt2"):
        caveat = (f"the base model comes from {base!r}: the bound holds only if that base never saw this training "
                  "data (a prior must be fixed before the data); a base pretrained on it makes the bound invalid")
        print(f"  warning: {caveat}")

    gen = torch.Generator().manual_seed(c["seed"])
    blocks = torch.randint(len(train) // block - 1, (c["eval_blocks"],), generator=gen, device="cpu") * block

    def batches(starts):
        for i in range(0, len(starts), c["batch_size"]):
            ix = starts[i : i + c["batch_size"]].tolist()
            x = torch.stack([torch.from_numpy(train[j : j + block].astype(np.int64)) for j in ix])
            y = torch.stack([torch.from_numpy(train[j + 1 : j + 1 + block].astype(np.int64)) for j in ix])
            yield x.to(c["device"]), y.to(c["device"])

    @torch.no_grad()
    def token_level(desc):
        smooth, errors, n = 0, 0, 0
        t, steps, tty = time.time(), -(-len(blocks) // c["batch_size"]), sys.stdout.isatty()
        for k, (x, y) in enumerate(batches(blocks)):
            s, e = per_token_stats(model, x, y, alpha_grid, ks, vocab)
            smooth, errors, n = smooth + s.sum((0, 1)), errors + e.sum((0, 1)), n + y.numel()
            done = (k + 1) / steps
            line = f"  {desc}: {100 * done:5.1f}% of {len(blocks)} blocks, eta {(time.time() - t) * (1 / done - 1):.0f}s"
            if tty:  # one line redrawn in a terminal; in a log file, a plain line every tenth
                print("\r" + line, end="\n" if k + 1 == steps else "", flush=True)
            elif (k + 1) * 10 // steps > k * 10 // steps:
                print(line, flush=True)
        return (smooth / n).tolist(), (errors / n).tolist()

    before = token_level("unquantised")[0][0]  # bits per token at the smallest α: next to no smoothing

    # quantise w (and the gates), optionally tune w and the centroids with the straight-through estimator
    centroids, symbols = quantize(flat, c["levels"], c["quant_init"])
    if c["qat_steps"]:
        centroids, symbols = quantization_aware_tuning(c, model, names, state, flat, centroids, batches, gen, len(train), block)
    quantized = centroids[symbols]
    offsets = np.cumsum([0] + [state[n].numel() for n in names])
    set_message(model, {n: quantized[offsets[i] : offsets[i + 1]].view(state[n].shape).float() for i, n in enumerate(names)})
    smooth, errors = token_level("quantised")

    grid = dict(kv.split("=") for kv in c["choices"].split(",") if kv)
    choice_count = math.prod(int(v) for v in grid.values()) if grid else 1
    choice_bits = math.ceil(math.log2(choice_count)) if choice_count > 1 else 0
    alpha_bits = math.ceil(math.log2(len(alpha_grid)))
    msg = message_length(symbols.tolist(), c["levels"], extra_bits=choice_bits)
    K = msg["total_bits"]
    print(f"  message: {msg['code_bits']:,} code bits (entropy bound {msg['entropy_bits']:.0f}) + "
          f"{msg['codebook_bits']} codebook + {msg['count_bits']} counts = {msg['raw_bits']:,}; prefix-free "
          f"L + 2 log₂ L = {msg['prefix_free_bits']:.0f}; + ⌈log₂ {choice_count}⌉ = {choice_bits} bits for the "
          f"choices {grid or '{}'} = K = {K:.0f} bits; BPD also pays ⌈log₂ {len(alpha_grid)}⌉ = {alpha_bits} for α")

    # document level: per-document average losses of s sampled documents
    separator = c["doc_separator"].encode().decode("unicode_escape") if c["doc_separator"] else None
    if separator is None:
        sep_ids = [EOT] if not meta or meta.get("tokenizer") != "char" else load_tokenizer(meta)[0]("\n\n")
    else:
        sep_ids = load_tokenizer(meta)[0](separator)
    starts, ends = documents(np.asarray(train), sep_ids)
    doc_ix = torch.randint(len(starts), (c["eval_docs"],), generator=gen, device="cpu").numpy()
    doc_smooth, doc_err = doc_level(model, train, starts[doc_ix], ends[doc_ix], block, alpha_grid, ks, vocab, c)

    N_tok, N_doc = len(train), len(starts)
    s_tok, s_doc = len(blocks), len(doc_ix)
    results = {"run": run_dir, "kind": ckpt["adapter"]["kind"], "d": d, "levels": c["levels"], "vocab": vocab,
               "N_tokens": N_tok, "N_documents": N_doc, "s_blocks": s_tok, "s_documents": s_doc,
               "confidence": c["confidence"], "base_caveat": caveat, "loss_before_quantization_bits": before,
               "loss_after_quantization_bits": smooth[0], "message": msg, "alphas": alpha_grid, "metrics": {}}
    for level, N, s, sm, er in (("token", N_tok, s_tok, smooth, errors), ("document", N_doc, s_doc, doc_smooth, doc_err)):
        per_alpha = [bound(v, smoothed_range(a, vocab), K + alpha_bits, N, s, eps) for v, a in zip(sm, alpha_grid)]
        best = int(np.argmin(per_alpha))
        results["metrics"][f"{level}_bpd"] = dict(empirical=sm[best], bound=per_alpha[best], alpha=alpha_grid[best],
                                                  delta=smoothed_range(alpha_grid[best], vocab), per_alpha=per_alpha,
                                                  empirical_per_alpha=sm, random_guess=math.log2(vocab))
        for k, e in zip(ks, er):
            results["metrics"][f"{level}_top{k}_error"] = dict(empirical=e, bound=min(1.0, bound(e, 1.0, K, N, s, eps)),
                                                               delta=1.0, random_guess=1 - k / vocab)
    results["seconds"] = time.time() - t0
    print_table(results)
    with open(os.path.join(run_dir, "bounds.json"), "w") as f:
        json.dump(results, f, indent=1)
    import plots

    print(f"  wrote {run_dir}/bounds.json and {plots.plot_bound_vs_alpha(run_dir, results)}")
    return results


@torch.no_grad()
def doc_level(model, train, starts, ends, block, alpha_grid, ks, vocab, c):
    """Mean over the sampled documents of each document's mean smoothed loss / error; a long document is
    scored in block_size chunks, each token with its prefix in the chunk."""
    doc_smooth, doc_err = [], []
    chunks = []  # (document index, start, length)
    for i, (a, b) in enumerate(zip(starts, ends)):
        for j in range(a, b - 1, block):
            chunks.append((i, j, min(block, b - 1 - j)))
    sums = torch.zeros(len(starts), len(alpha_grid), device="cpu")  # host-side sums of the batches' stats
    errs = torch.zeros(len(starts), len(ks), device="cpu")
    count = torch.zeros(len(starts), device="cpu")
    for k in range(0, len(chunks), c["batch_size"]):
        part = chunks[k : k + c["batch_size"]]
        x = torch.zeros(len(part), block, dtype=torch.long, device="cpu")  # filled from the memmap, then moved
        y = torch.zeros(len(part), block, dtype=torch.long, device="cpu")
        mask = torch.zeros(len(part), block, device="cpu")
        for r, (i, j, n) in enumerate(part):
            x[r, :n] = torch.from_numpy(train[j : j + n].astype(np.int64))
            y[r, :n] = torch.from_numpy(train[j + 1 : j + 1 + n].astype(np.int64))
            mask[r, :n] = 1
        s, e = per_token_stats(model, x.to(c["device"]), y.to(c["device"]), alpha_grid, ks, vocab)
        s, e = s.cpu() * mask[..., None], e.cpu() * mask[..., None]
        idx = torch.tensor([i for i, _, _ in part], device="cpu")
        sums.index_add_(0, idx, s.sum(1))
        errs.index_add_(0, idx, e.sum(1))
        count.index_add_(0, idx, mask.sum(1))
    doc_smooth = (sums / count[:, None]).mean(0).tolist()
    doc_err = (errs / count[:, None]).mean(0).tolist()
    return doc_smooth, doc_err


def quantization_aware_tuning(c, model, names, state, flat, centroids, batches, gen, n_train, block):
    """Fine-tune w and the centroids on training batches through the quantiser: the forward uses the
    nearest centroid of each coordinate, the gradient passes to w unchanged (straight-through) and to
    the centroid it picked."""
    w = flat.clone().float().requires_grad_(True)
    cents = centroids.clone().float().requires_grad_(True)
    opt = torch.optim.Adam([w, cents], lr=c["qat_lr"])
    params = dict(model.named_parameters())
    offsets = np.cumsum([0] + [state[n].numel() for n in names])
    for step in range(c["qat_steps"]):
        idx = (w.detach()[:, None] - cents.detach()[None, :]).abs().argmin(dim=1)
        wq = cents[idx] + (w - w.detach())  # straight-through to w, exact gradient to the centroids
        starts = torch.randint(n_train // block - 1, (c["batch_size"],), generator=gen, device="cpu") * block
        x, y = next(batches(starts))
        override = {n: wq[offsets[i] : offsets[i + 1]].view(state[n].shape) for i, n in enumerate(names)}
        loss = torch.func.functional_call(model, {**{k: p for k, p in params.items() if k not in override}, **override},
                                          (x, y))[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, c["qat_steps"] // 5) == 0:
            print(f"  qat step {step}/{c['qat_steps']}: loss {loss.item():.4f}")
    cents = cents.detach().double().half().double()
    return cents, (w.detach().double()[:, None] - cents[None, :]).abs().argmin(dim=1)


def print_table(r):
    print(f"  bits per token before / after quantisation: {r['loss_before_quantization_bits']:.4f} / "
          f"{r['loss_after_quantization_bits']:.4f}; K = {r['message']['total_bits']:.0f} bits, "
          f"N = {r['N_tokens']:,} tokens / {r['N_documents']:,} documents")
    print(f"  {'metric':<22} {'empirical':>10} {'bound':>8} {'random guess':>13} {'α':>7}")
    for name, m in r["metrics"].items():
        alpha = f"{m['alpha']:g}" if "alpha" in m else ""
        print(f"  {name:<22} {m['empirical']:>10.4f} {m['bound']:>8.4f} {m['random_guess']:>13.4f} {alpha:>7}")


def main(argv):
    c = configure(DEFAULTS, argv, {})
    if c["levels"] < 2:
        raise ConfigError(f"levels must be >= 2, got {c['levels']}")
    torch.manual_seed(c["seed"])
    if not c["sweep_dir"]:
        return [evaluate(c, c["out_dir"])]
    runs = sorted(os.path.join(c["sweep_dir"], d) for d in os.listdir(c["sweep_dir"])
                  if os.path.isfile(os.path.join(c["sweep_dir"], d, "ckpt.pt")))
    if not runs:
        raise ConfigError(f"no run with a ckpt.pt under {c['sweep_dir']!r}")
    results = [evaluate(c, r) for r in runs]
    import plots

    print(f"wrote {plots.plot_pareto(c['sweep_dir'], results)}")
    return results


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, CheckpointError, DownloadError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
