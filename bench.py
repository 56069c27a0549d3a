"""
Speed and memory of every adapter against full fine-tuning (and PEFT's LoRA, DoRA and AdaLoRA when
`peft` is installed), on the same model, batch and data, in one process. Repetitions are interleaved
over the methods so that machine drift cancels; warm-up steps are not timed; every number in the
README's table is a ratio taken within one run.

    python bench.py                           # CPU: baby and large sizes (2 cores: ~15 minutes)
    python bench.py --device=cuda             # GPU: GPT-2-small shape, 8 x 1024 tokens, bf16
    python bench.py --device=cuda --compile=both   # every method eager and torch.compile'd, side by side
    python bench.py --quick=True              # a tiny model, seconds: what the test runs
    python bench.py --methods=full,lora,dora  # a subset
    python bench.py --fused=True              # beside each adapter row, the fused 3-GEMM path forced on
    python bench.py --sample=True --reps=2    # generation: tokens/s with and without the key/value cache
    python bench.py --profile=dora            # also write a torch.profiler trace of one DoRA step

Writes out_dir/bench.json and out_dir/bench.md (the README table).
"""

import copy
import json
import os
import statistics
import sys
import time

import torch

import adapters
from adapters import config_keys, count_params, family_of, find_targets, fused_on_cuda, merge_adapters
from configurator import (
    COMPILE_MODES,
    ConfigError,
    check_device,
    check_ranges,
    cli,
    config_defaults,
    configure,
)
from files import atomic_write
from model import GPT, GPTConfig

size = ""  # 'baby' | 'large' | 'both' | 'gpu'; '' = 'gpu' on CUDA, 'both' elsewhere
methods = ""  # comma-separated subset of METHODS; '' = all
compile = "False"  # 'True': torch.compile every model; 'both': eager and compiled rows ('<method>+compile')
fused = False  # True: beside each adapter row a '<method>+fused' row, the fused 3-GEMM path forced on
compile_mode = "default"  # torch.compile's mode: 'default' | 'reduce-overhead' (CUDA graphs) | 'max-autotune'
profile = ""  # a method name: write out_dir/trace_<method>.json (chrome trace of one step)
reps = 3  # interleaved repetitions
steps = 2  # timed steps per method and repetition
warmup = 1  # untimed steps per method before the first repetition
rank = 8  # rank of every adapter
sublora_dim = 50000  # capped at half the LoRA parameters it wraps
device = "cuda" if torch.cuda.is_available() else "cpu"  # 'cpu' or 'cuda'
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"  # autocast
out_dir = "bench"  # where bench.json and bench.md go
quick = False  # a tiny model and one repetition (the test)
seed = 0  # seeds the models and the batch
sample = False  # True: time generation instead (sample.py's loop with and without the key/value cache)
prompt_tokens = 100  # sample mode: the prompt's length
new_tokens = 500  # sample mode: tokens generated after it
DEFAULTS = config_defaults(globals())

SIZES = {  # the baby Shakespeare model, and a GPT-2-small-shaped one where the Linears dominate
    "baby": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=65, batch_size=32),
    "large": dict(n_layer=12, n_head=12, n_embd=768, block_size=256, vocab_size=50304, batch_size=4),
    "quick": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, batch_size=4),
    "gpu": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, batch_size=8),
}
# operators that only re-describe memory (no kernel on a GPU): left out of kernels/step on a CPU
VIEW_OPS = {
    "aten::view",
    "aten::_unsafe_view",
    "aten::as_strided",
    "aten::t",
    "aten::transpose",
    "aten::expand",
    "aten::permute",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::reshape",
    "aten::slice",
    "aten::select",
    "aten::split",
    "aten::split_with_sizes",
    "aten::narrow",
    "aten::detach",
    "aten::alias",
    "aten::lift_fresh",
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::unbind",
    "aten::chunk",
    "aten::contiguous",
    "aten::result_type",
    "aten::is_nonzero",
    "aten::_reshape_alias",
    "aten::numpy_T",
    "aten::flatten",
    "aten::unflatten",
    "aten::expand_as",
    "aten::view_as",
    "aten::set_",
    "aten::zero_",
    "aten::to",
    "aten::_to_copy",
}
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10": 125e12,
    "4090": 165e12,
}  # bf16 dense


class Method:
    """A model to train and its family (optimizers, extra loss, the work around each step), or PEFT's."""

    def __init__(self, model, family, optimizers, init_seconds=0.0):
        self.model, self.family, self.optimizers = model, family, optimizers
        self.init_seconds, self.step_times = init_seconds, []
        self.forward = model  # torch.compile(model) for a compiled row


def fused_forward(model):
    """model's forward with AdapterLinear's fused 3-GEMM path forced on, whatever the device (its
    backward is the one its forward chose): bench.py --fused=True's rows."""

    def forward(*args):
        default, adapters.FUSED_LORA = adapters.FUSED_LORA, "always"
        try:
            return model(*args)
        finally:
            adapters.FUSED_LORA = default

    return forward


def adam(model):
    """AdamW over the trainable parameters, its fused kernel on CUDA (for PEFT's models)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **fused_on_cuda(params))]


def qv_dim(cap=None):
    """A SubLoRA row's d: sublora_dim, at most half the LoRA numbers it drives and at most `cap`."""

    def dim(model, c):
        D = sum(
            4 * (m.in_features + (2 * m.out_features // 3 if t.endswith(":q,v") else m.out_features))
            for t in find_targets(model, QV["lora_targets"].split(";"))
            for m in [model.get_submodule(t.partition(":")[0])]
        )
        return min(c["sublora_dim"], D // 2, cap or D)

    return dim


# method -> the train.py settings it runs with (every other key at train.py's default; a callable is
# given the base model and bench.py's config). The dense projector draws D·d Gaussians in each pass:
# 1.6e10 for d = 50,000 on the large model, so it is measured at d <= 2,000 (the row says which d).
QV = dict(
    lora_targets="c_attn:q,v;lm_head", lora_rank=4, lora_alpha=32.0
)  # SubLoRA's LoRA: r = 4 on q, v and the head
SETTINGS = {
    "full": dict(adapter="none"),
    "lora": dict(adapter="lora"),
    "dora": dict(adapter="dora"),
    "sora": dict(adapter="sora"),
    "adalora": dict(adapter="adalora"),
    "adadora": dict(adapter="adadora"),
    **{f"pissa_{w}": dict(adapter="pissa", pissa_method=w) for w in ("way0", "way1", "way2", "way3")},
    "pissa_way0_lowrank": dict(adapter="pissa", pissa_svd="lowrank"),
    "lora_qv": dict(adapter="lora", **QV),
    **{
        f"sublora_{p}": dict(
            adapter="sublora", sublora_projector=p, intrinsic_dim=qv_dim(2000 if p == "dense" else None), **QV
        )
        for p in ("rdkronqr", "dense", "sparse")
    },
}


def build(name, base, c):
    """The method `name` on a copy of `base` through the hooks train.py calls, timed from the copy to a
    model ready to train."""
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    if name.startswith("peft_"):
        return build_peft(name, model, c)
    settings = {k: default for k, (default, *_) in config_keys().items()}
    settings.update(lora_rank=c["rank"], max_iters=10**6)
    settings.update({k: v(model, c) if callable(v) else v for k, v in SETTINGS[name].items()})
    family = family_of(settings["adapter"])(settings, say=lambda *a: None)
    model, _ = family.inject(model)
    device_type = "cuda" if c["device"].startswith("cuda") else "cpu"
    optimizers = [opt for opt, _ in family.optimizers(model, 1e-4, (0.9, 0.99), 0.1, device_type)]
    return Method(model, family, optimizers, time.perf_counter() - t0)


def build_peft(name, model, c):
    from peft import AdaLoraConfig, LoraConfig, inject_adapter_in_model

    targets = ["c_attn", "c_proj", "c_fc", "lm_head"]
    t0 = time.perf_counter()
    if name == "peft_adalora":  # timed like ours: train.py's orthogonality weight and allocation interval
        config = AdaLoraConfig(
            init_r=c["rank"],
            target_r=c["rank"] // 2,
            lora_alpha=16,
            target_modules=targets,
            total_step=10**6,
            deltaT=10,
            orth_reg_weight=0.5,
        )
    else:
        config = LoraConfig(r=c["rank"], lora_alpha=16, target_modules=targets, use_dora=name == "peft_dora")
    model = inject_adapter_in_model(config, model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    family = PeftFamily(config, model)
    return Method(model, family, adam(model), time.perf_counter() - t0)


class PeftFamily:
    """PEFT's side of a row: AdaLoRA's orthogonality term and allocation, as PEFT's own loop adds them."""

    def __init__(self, config, model):
        from peft import AdaLoraConfig
        from peft.tuners.adalora import RankAllocator as PeftRankAllocator

        self.adalora = isinstance(config, AdaLoraConfig)
        self.weight = config.orth_reg_weight if self.adalora else 0.0
        self.allocator = PeftRankAllocator(model, config, "default") if self.adalora else None
        self.model = model

    def extra_loss(self, model):
        return self.weight * peft_orthogonal_regularization(model) if self.adalora else None

    def before_step(self, model, it):
        pass

    def after_step(self, model, it):
        if self.allocator:
            self.allocator.update_and_allocate(self.model, it)


def peft_orthogonal_regularization(model):
    """What peft's AdaLoraModel.forward adds to the loss (a loop over every lora_A / lora_B)."""
    terms = []
    for n, p in model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and p.requires_grad:
            para_cov = p @ p.T if "lora_A" in n else p.T @ p
            eye = torch.eye(*para_cov.size(), out=torch.empty_like(para_cov))
            terms.append(torch.norm(para_cov - eye, p="fro"))
    return torch.stack(terms).mean()


METHODS = [m for m in SETTINGS if m != "pissa_way0_lowrank"] + ["peft_lora", "peft_dora", "peft_adalora"]


def step(method, x, y, ctx, it):
    """One training step; its time in seconds (CUDA events on a GPU: the device's time, end to end)."""
    cuda = x.device.type == "cuda"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    method.family.before_step(method.model, it)
    with ctx:
        loss = method.forward(x, y)[1]
        extra = method.family.extra_loss(method.model)
        if extra is not None:
            loss = loss + extra
    loss.backward()
    for opt in method.optimizers:
        opt.step()
    method.family.after_step(method.model, it)
    for opt in method.optimizers:
        opt.zero_grad(set_to_none=True)
    if cuda:
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    return time.perf_counter() - t0


def kernels_per_step(method, x, y, ctx, it, trace=None):
    """Kernels one step launches: on a GPU the device kernels (and copies) torch.profiler records; on
    a CPU the leaf operators it dispatches (each is a kernel on a GPU), views left out. A GPU step
    whose kernels are many and small is bound by the host launching them."""
    from torch.profiler import ProfilerActivity, profile

    cuda = x.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step(method, x, y, ctx, it)
    if trace:
        prof.export_chrome_trace(trace)
    events = prof.events()
    if cuda:
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(
        1 for e in events if e.name.startswith("aten::") and not e.cpu_children and e.name not in VIEW_OPS
    )


@torch.no_grad()
def latency(model, x, ctx, n):
    """Median time of one inference forward (CUDA events on a GPU), after a warm-up."""
    model.eval()
    cuda = x.device.type == "cuda"
    times = []
    for _ in range(n + 2):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        with ctx:
            model(x)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            times.append(time.perf_counter() - t0)
    model.train()
    return statistics.median(times[2:])


def state_bytes(method):
    """Parameters + gradients of the trainable ones + optimizer state, in bytes (exact, any device)."""
    params = sum(p.numel() * p.element_size() for p in method.model.parameters())
    params += sum(b.numel() * b.element_size() for b in method.model.buffers())
    grads = sum(p.numel() * p.element_size() for p in method.model.parameters() if p.requires_grad)
    opt = sum(
        t.numel() * t.element_size()
        for o in method.optimizers
        for s in o.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    return params + grads + opt


def train_flops_per_token(method, cfg):
    """Honest training FLOPs per token: 6 N for trained weights, 4 N for frozen ones (forward and the
    input gradient, no weight gradient), plus attention (PaLM appendix B)."""
    trainable, total = count_params(method.model)  # the tied embedding counted once, as nanoGPT does
    attention = 12 * cfg["n_layer"] * cfg["n_embd"] * cfg["block_size"]
    return 6 * trainable + 4 * (total - trainable) + attention


def peak_flops(device):
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((f for k, f in PEAK_FLOPS.items() if k in name), None)


def method_names(c):
    """The rows to time: the methods asked for (PEFT's only when it is installed), each eager and/or
    compiled ('+compile'), and with --fused=True each adapter also with the fused path forced ('+fused')."""
    names = [m for m in (c["methods"].split(",") if c["methods"] else METHODS)]
    try:
        import peft  # noqa: F401
    except ImportError:
        skipped = [n for n in names if n.startswith("peft_")]
        if skipped:
            print(f"peft is not installed: skipping {skipped} (pip install peft)")
        names = [n for n in names if not n.startswith("peft_")]
    which = str(c["compile"])
    if which == "both":
        names = [n for name in names for n in (name, name + "+compile")]
    elif which == "True":
        names = [name + "+compile" for name in names]
    if c["fused"]:
        fusable = lambda n: not n.startswith(("full", "peft_", "sublora")) and "+" not in n  # noqa: E731
        names = [n for name in names for n in ([name, name + "+fused"] if fusable(name) else [name])]
    return names


def build_all(names, base, c, size_name):
    """{row name: Method}, each built on a copy of `base`, its forward compiled or fused as the name says."""
    methods = {}
    for name in names:
        methods[name] = build(name.removesuffix("+compile").removesuffix("+fused"), base, c)
        if name.endswith("+compile"):
            methods[name].forward = torch.compile(methods[name].model, mode=c["compile_mode"])
        if name.endswith("+fused"):
            methods[name].forward = fused_forward(methods[name].model)
        print(
            f"[{size_name}] built {name}: {count_params(methods[name].model)[0]:,} trainable, "
            f"init {methods[name].init_seconds * 1000:.1f}ms",
            flush=True,
        )
    return methods


def bench_size(size_name, c):
    cfg = SIZES[size_name]
    torch.manual_seed(c["seed"])
    base = GPT(
        GPTConfig(
            **{k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")},
            bias=False,
            dropout=0.0,
        )
    ).to(c["device"])
    ptdtype = getattr(torch, c["dtype"])
    ctx = (
        torch.autocast(c["device"].split(":")[0], ptdtype)
        if ptdtype != torch.float32
        else torch.enable_grad()
    )
    gen = torch.Generator().manual_seed(c["seed"])
    x = torch.randint(cfg["vocab_size"], (cfg["batch_size"], cfg["block_size"]), generator=gen).to(
        c["device"]
    )
    y = torch.roll(x, -1, dims=1)
    names = method_names(c)
    methods = build_all(names, base, c, size_name)
    if "pissa_way0" in names:  # the randomized SVD's init time, for the full-vs-randomized ratio
        methods["pissa_way0_lowrank_init"] = build("pissa_way0_lowrank", base, c)
    it = 0
    for name in names:
        for _ in range(c["warmup"] + 2 * name.endswith("+compile")):  # compiling takes the first steps
            step(methods[name], x, y, ctx, it)
            it += 1
    for rep in range(c["reps"]):  # interleaved: every method once per repetition
        for name in names:
            for _ in range(c["steps"]):
                methods[name].step_times.append(step(methods[name], x, y, ctx, it))
                it += 1
        print(
            f"[{size_name}] repetition {rep + 1}/{c['reps']}: "
            + ", ".join(f"{n} {1000 * statistics.median(methods[n].step_times):.0f}ms" for n in names)
        )

    tokens = cfg["batch_size"] * cfg["block_size"]
    base_latency = latency(base, x, ctx, 3 * c["reps"])
    full_time = {
        suffix: statistics.median(methods["full" + suffix].step_times) if "full" + suffix in methods else None
        for suffix in ("", "+compile")
    }
    peak = peak_flops(c["device"])
    rows = []
    for name in names:
        m = methods[name]
        t = statistics.median(m.step_times)
        compiled = name.endswith("+compile")
        plain = name.removesuffix("+compile").removesuffix("+fused")
        merged = (
            merge_adapters(copy.deepcopy(m.model)) if not plain.startswith(("full", "peft_")) else m.model
        )
        if c["device"].startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            step(m, x, y, ctx, it)
            peak_mem = torch.cuda.max_memory_allocated()
        else:
            peak_mem = None
        trace = os.path.join(c["out_dir"], f"trace_{name}.json") if plain == c["profile"] else None
        kernels = kernels_per_step(m, x, y, ctx, it, trace)
        trainable, total = count_params(m.model)
        full = full_time["+compile" if compiled else ""]
        eager = methods.get(plain)
        rows.append(
            dict(
                size=size_name,
                method=name,
                step_ms=1000 * t,
                ratio_to_full=t / full if full else None,
                ratio_to_eager=t / statistics.median(eager.step_times) if compiled and eager else None,
                tokens_per_s=tokens / t,
                kernels_per_step=kernels,
                trainable_params=trainable,
                total_params=total,
                state_mb=state_bytes(m) / 2**20,
                peak_mem_mb=peak_mem / 2**20 if peak_mem else None,
                init_ms=1000 * m.init_seconds,
                merged_latency_ratio=latency(merged, x, ctx, 3 * c["reps"]) / base_latency,
                mfu=train_flops_per_token(m, cfg) * tokens / t / peak if peak else None,
            )
        )
        del merged
    if "pissa_way0_lowrank_init" in methods:
        rows.append(
            dict(
                size=size_name,
                method="pissa_init_full_over_lowrank",
                ratio=methods["pissa_way0"].init_seconds / methods["pissa_way0_lowrank_init"].init_seconds,
            )
        )
    return rows


# sample mode: the baby GPT and GPT-2 small's shape (random weights: the speed does not depend on them)
SAMPLE_SIZES = {
    "baby": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=65),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "quick": dict(n_layer=2, n_head=2, n_embd=32, block_size=256, vocab_size=65),
}


def bench_sampling(size_name, c):
    """Tokens/s of one text (prompt_tokens, then new_tokens sampled as sample.py samples them) with the
    key/value cache and without it, interleaved over the repetitions; both must give the same text."""
    torch.manual_seed(c["seed"])
    model = GPT(GPTConfig(**SAMPLE_SIZES[size_name], dropout=0.0)).to(c["device"]).eval()
    vocab = SAMPLE_SIZES[size_name]["vocab_size"]
    prompt = torch.randint(vocab, (1, c["prompt_tokens"]), generator=torch.Generator().manual_seed(c["seed"]))
    times, texts = {True: [], False: []}, {}
    for kv_cache in (True, False):  # warm-up, not timed
        model.generate(prompt.to(c["device"]), 8, 0.8, 200, None, kv_cache)
    for rep in range(c["reps"]):
        for kv_cache in (True, False):
            gen = torch.Generator(device=c["device"]).manual_seed(c["seed"])
            t0 = time.perf_counter()
            x = prompt.to(c["device"])
            texts[kv_cache] = model.generate(x, c["new_tokens"], 0.8, 200, gen, kv_cache).cpu()
            if c["device"].startswith("cuda"):
                torch.cuda.synchronize()
            times[kv_cache].append(time.perf_counter() - t0)
            print(
                f"[{size_name}] repetition {rep + 1}: kv_cache={kv_cache} {times[kv_cache][-1]:.2f}s",
                flush=True,
            )
    cached, uncached = statistics.median(times[True]), statistics.median(times[False])
    return dict(
        size=size_name,
        prompt_tokens=c["prompt_tokens"],
        new_tokens=c["new_tokens"],
        block_size=model.config.block_size,
        cached_tokens_per_s=c["new_tokens"] / cached,
        uncached_tokens_per_s=c["new_tokens"] / uncached,
        speedup=uncached / cached,
        same_text=torch.equal(texts[True], texts[False]),
    )


def sampling_markdown(rows):
    lines = ["| size | block | prompt + new | tokens/s cached | tokens/s uncached | speedup | same text |"]
    lines.append("| --- " * 7 + "|")
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['block_size']} | {r['prompt_tokens']} + {r['new_tokens']} | "
            f"{r['cached_tokens_per_s']:,.1f} | {r['uncached_tokens_per_s']:,.1f} | {r['speedup']:.2f}x | {r['same_text']} |"
        )
    return "\n".join(lines)


def markdown(rows):
    lines = [
        "| size | method | step ms | × full | × eager | kernels/step | tokens/s | trainable | state MB | peak MB | MFU "
        "| init ms | merged latency × base |",
        "| --- " * 13 + "|",
    ]
    fmt = lambda v, f: format(v, f) if v is not None else ""  # noqa: E731
    for r in rows:
        if "step_ms" not in r:
            continue
        lines.append(
            f"| {r['size']} | {r['method']} | {r['step_ms']:.1f} | {fmt(r['ratio_to_full'], '.2f')} | "
            f"{fmt(r['ratio_to_eager'], '.2f')} | {r['kernels_per_step']:,} | {r['tokens_per_s']:,.0f} | "
            f"{r['trainable_params']:,} | {r['state_mb']:.1f} | {fmt(r['peak_mem_mb'], ',.0f')} | "
            f"{fmt(r['mfu'] and 100 * r['mfu'], '.1f')} | {r['init_ms']:.1f} | {r['merged_latency_ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=()):
    c = configure(DEFAULTS, list(argv), {})
    check_ranges(c, {"reps": "[1, inf)", "steps": "[1, inf)", "warmup": "[0, inf)", "rank": "[1, inf)"})
    check_device(c["device"])
    size = c["size"] or ("gpu" if c["device"].startswith("cuda") else "both")
    sizes = ["quick"] if c["quick"] else (["baby", "large"] if size == "both" else [size])
    if any(s not in SIZES for s in sizes):
        raise ConfigError(f"size must be one of {sorted(SIZES)} or 'both', got {size!r}")
    if c["compile_mode"] not in COMPILE_MODES:
        raise ConfigError(f"compile_mode must be one of {COMPILE_MODES}, got {c['compile_mode']!r}")
    if str(c["compile"]) not in ("True", "False", "both"):
        raise ConfigError(f"compile must be True, False or both, got {c['compile']!r}")
    if c["quick"]:
        c.update(reps=1, steps=1, warmup=1, sublora_dim=200)
    unknown = [m for m in c["methods"].split(",") if m and m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown methods {unknown}; choose from {METHODS}")
    if c["sample"]:
        sizes = ["quick"] if c["quick"] else ["baby", "gpt2"] if not c["size"] else c["size"].split(",")
        if any(s not in SAMPLE_SIZES for s in sizes):
            raise ConfigError(f"sample mode's size must be among {sorted(SAMPLE_SIZES)}, got {c['size']!r}")
        return write_rows(c, argv, [bench_sampling(s, c) for s in sizes], sampling_markdown, "sampling")
    rows = write_rows(c, argv, [r for s in sizes for r in bench_size(s, c)], markdown, "bench")
    for r in rows:
        if r["method"] == "pissa_init_full_over_lowrank":
            print(f"[{r['size']}] PiSSA init: full SVD takes {r['ratio']:.1f}x the randomized SVD's time")
    return rows


def write_rows(c, argv, rows, table_of, name):
    """out_dir/<name>.json (the rows and the machine, date and command) and out_dir/<name>.md (the table)."""
    os.makedirs(c["out_dir"], exist_ok=True)
    info = dict(
        device=c["device"] if not c["device"].startswith("cuda") else torch.cuda.get_device_name(),
        dtype=c["dtype"],
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        reps=c["reps"],
        steps=c["steps"],
        compile=str(c["compile"]),
        compile_mode=c["compile_mode"],
        date=time.strftime("%Y-%m-%d"),
        command="python bench.py " + " ".join(argv),
    )
    atomic_write(os.path.join(c["out_dir"], f"{name}.json"), json.dumps(dict(info=info, rows=rows), indent=1))
    table = table_of(rows)
    atomic_write(os.path.join(c["out_dir"], f"{name}.md"), table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    cli(main, sys.argv[1:])
