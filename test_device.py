"""Device and compile safety of every adapter, provable without a GPU.

    python -m pytest -q test_device.py      # CPU: the meta device and a counting compile backend
    make gpu-check                          # the same tests on CUDA, plus compiled training of every adapter

Two ways to catch on a CPU what fails on CUDA:
- a model on the `meta` device: a tensor made on the CPU in the training step meets meta tensors and
  fails exactly as a CPU tensor meets CUDA ones; a host sync (`.item()`, `bool(t)`) fails as well;
- a CPU model with `torch.device("meta")` as the default device: every tensor made without `device=`
  lands on meta and collides with the real data (for code that needs values: merge, quantise, QAT).
A counting backend (torch._dynamo.testing.CompileCounter) traces what torch.compile would compile,
without inductor: one frame per graph, so graph breaks and recompiles show up as extra frames.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

import hf
from adapters import (
    RankAllocator,
    SubLoRA,
    adapter_state_dict,
    build_sora_optimizers,
    inject_adapters,
    merge_adapters,
    orthogonal_regularization,
    rotation_penalty,
    to_lora,
)
from model import GPT, GPTConfig

DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])
FAMILIES = {  # name -> (kind, settings); every family and mode
    "lora": ("lora", {}),
    "lora_qv": ("lora", dict(targets=["c_attn:q,v", "lm_head"])),
    "dora": ("dora", {}),
    "sora": ("sora", {}),
    "adalora": ("adalora", {}),
    "adadora": ("adadora", {}),
    **{f"pissa_{w}": ("pissa", dict(method=w)) for w in ("way0", "way1", "way2", "way3")},
    "pissa_nf4": ("pissa", dict(method="way0", quantize_residual=True, quantize_base_components=True)),
    "pissa_lowrank": ("pissa", dict(method="way1", svd="lowrank")),
}
SUBLORA = [(p, m) for p in ("rdkronqr", "sparse", "dense") for m in ("uniform", "fixed", "learned")]


def tiny_gpt(device="cpu", **kw):
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, bias=True, dropout=0.0)
    return GPT(GPTConfig(**{**cfg, **kw})).to(device)


def with_adapter(name, device, before):
    """The family `name` injected into a model already on `device` (before=True), or injected on the
    CPU and moved afterwards."""
    kind, settings = FAMILIES[name]
    model = tiny_gpt(device if before else "cpu")
    inject_adapters(model, kind, rank=4, **settings)
    return model if before else model.to(device)


def with_sublora(projector, mode, device, before):
    model = tiny_gpt(device if before else "cpu")
    inject_adapters(model, "lora", targets=["c_attn:q,v", "lm_head"], rank=4)
    model = SubLoRA(model, 60, projector=projector, allocation_mode=mode)
    return model if before else model.to(device)


def train_step(model, device, allocator=None, step=0):
    """Forward, backward, AdamW step and the adapter's after-step work, as train.py does them."""
    x = (
        torch.randint(65, (2, 16), device=device)
        if device != "meta"
        else torch.zeros(2, 16, dtype=torch.long, device=device)
    )
    _, loss = model(x, x)
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
    if allocator:
        allocator.update_and_allocate(step)
    return loss


@pytest.mark.parametrize("before", [True, False], ids=["injected_on_device", "moved_after"])
@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("device", DEVICES)
def test_every_family_trains_on_a_non_cpu_device(name, device, before):
    model = with_adapter(name, device, before)
    kind = FAMILIES[name][0]
    reg = {"adalora": orthogonal_regularization, "adadora": orthogonal_regularization}.get(kind)
    reg = rotation_penalty if name == "pissa_way0" else reg
    allocator = RankAllocator(model, 2, total_step=4, deltaT=1) if kind in ("adalora", "adadora") else None
    for step in range(3):
        loss = train_step(model, device, allocator, step)
        if reg:
            reg(model).backward()
    assert loss.device.type == device
    assert all(p.device.type == device for p in model.parameters())
    assert all(b.device.type == device for b in model.buffers())
    if allocator:
        allocator.finalize()
    if device == "cuda":  # on a real GPU: the same numbers as on the CPU
        cpu = with_adapter(name, "cpu", True)
        cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
        x = torch.randint(65, (2, 16))
        torch.testing.assert_close(model(x.cuda())[0].cpu(), cpu(x)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("before", [True, False], ids=["built_on_device", "moved_after"])
@pytest.mark.parametrize("projector,mode", SUBLORA)
@pytest.mark.parametrize("device", DEVICES)
def test_sublora_trains_on_a_non_cpu_device(projector, mode, device, before):
    model = with_sublora(projector, mode, device, before)
    train_step(model, device)
    assert model.w.grad is None or model.w.grad.device.type == device
    assert all(t.device.type == device for t in [*model.parameters(), *model.buffers()])
    if device == "cuda":  # same P, θ₀ and outputs as on the CPU: the seed rebuilds it anywhere
        cpu = with_sublora(projector, mode, "cpu", True)
        cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
        x = torch.randint(65, (2, 16))
        torch.testing.assert_close(model(x.cuda())[0].cpu(), cpu(x)[0], rtol=1e-4, atol=1e-4)


def test_the_meta_device_catches_a_tensor_made_on_the_cpu():
    """The check above is real: SubLoRA before its fix (projector buffers left on the CPU)."""
    model = with_sublora("rdkronqr", "uniform", "meta", True)
    proj = model.projectors[0]
    proj.Q1 = torch.zeros(proj.Q1.shape)  # what a buffer built on the CPU and never moved is
    with pytest.raises(RuntimeError, match="device"):
        train_step(model, "meta")


@pytest.mark.parametrize("name", ["lora", "dora", "sora", "adadora", "pissa_way1", "pissa_nf4"])
def test_merge_prune_slice_export_make_no_tensor_off_the_model_device(name):
    """Value-dependent paths (they check finiteness, count ranks): a CPU model with meta as the default
    device, so any tensor made without device= lands on meta and fails."""
    model = with_adapter(name, "cpu", True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    x = torch.randint(65, (2, 16))
    want = model(x)[0]
    with torch.device("meta"):
        if name != "pissa_nf4":  # (refused: no LoRA on the original weights computes an NF4 residual)
            hf.lora_factors(model)  # every family as the LoRA / DoRA that PEFT receives
            to_lora(model)  # SoRA's prune, AdaLoRA's slice, PiSSA's export
        adapter_state_dict(model)
        merge_adapters(model)
    torch.testing.assert_close(model(x)[0], want, rtol=1e-4, atol=1e-4)


def test_eval_bounds_quantisation_and_qat_make_no_tensor_off_the_vector_device():
    """Bug 3 of the GPU report: quantize built its bin edges on the CPU, so no bound on a GPU."""
    from eval_bounds import quantize

    w = torch.randn(500, dtype=torch.float64)
    with torch.device("meta"):
        centroids, symbols = quantize(w, 11, "kmeans")
    assert centroids.device.type == "cpu" and symbols.device.type == "cpu"
    assert torch.equal(symbols, (w[:, None] - centroids[None, :]).abs().argmin(1))
    # quantisation-aware tuning of a SubLoRA message (it once mixed a CPU codebook with a CUDA w)
    from eval_bounds import (
        DEFAULTS,
        message_groups,
        message_vector,
        quantization_aware_tuning,
        quantize_message,
    )

    model = with_sublora("rdkronqr", "learned", "cpu", True)
    state = message_vector(model)
    groups = message_groups(state)
    data = torch.randint(65, (4000,), generator=torch.Generator().manual_seed(0))

    def batches(starts):
        yield (
            torch.stack([data[j : j + 16] for j in starts.tolist()]),
            torch.stack([data[j + 1 : j + 17] for j in starts.tolist()]),
        )

    c = dict(DEFAULTS, qat_steps=3, batch_size=4)
    with torch.device("meta"):
        coded = quantize_message(state, groups, 11, "kmeans")
        coded = quantization_aware_tuning(
            c, model, state, groups, coded, batches, torch.Generator().manual_seed(0), len(data) // 16 - 1, 16
        )
    for g, names in groups.items():
        centroids, symbols = coded[g]
        assert centroids.device.type == "cpu" and symbols.numel() == sum(state[n].numel() for n in names)


# -----------------------------------------------------------------------------
# torch.compile: one graph per model, no recompiles after the first step


def compiled_steps(model, optimizers, steps=5, allocator=None, extra=None, autocast=False):
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        # bf16: the adapter factors cast to the autocast dtype
        x = torch.randint(65, (8 if autocast else 2, 16), generator=gen)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = compiled(x, x)[1]
        if extra:
            loss = loss + extra(model)
        loss.backward()
        for opt in optimizers:
            opt.step()
        if allocator:
            allocator.update_and_allocate(step)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
    return counter


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_compile_traces_one_graph_and_never_recompiles(name, autocast):
    model = with_adapter(name, "cpu", True)
    kind = FAMILIES[name][0]
    opts = (
        list(build_sora_optimizers(model))
        if kind == "sora"
        else [torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)]
    )
    allocator = RankAllocator(model, 2, total_step=6, deltaT=1) if kind in ("adalora", "adadora") else None
    extra = (lambda m: 0.1 * orthogonal_regularization(m)) if allocator else None
    counter = compiled_steps(model, opts, allocator=allocator, extra=extra, autocast=autocast)
    assert counter.frame_count == 1  # a graph break or a recompile would add a frame
    assert counter.op_count > 0


@pytest.mark.parametrize("projector,mode", SUBLORA)
def test_compile_sublora_one_graph(projector, mode):
    model = with_sublora(projector, mode, "cpu", True)
    counter = compiled_steps(
        model, [torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)]
    )
    assert counter.frame_count == 1


def test_compiled_gradients_equal_eager():
    """Compiling must not change what is trained: the same step compiled and eager (DoRA, whose norm
    is recomputed in the graph, and SubLoRA learned, whose mask gradient is straight-through)."""
    for build in (
        lambda: with_adapter("adadora", "cpu", True),
        lambda: with_sublora("rdkronqr", "learned", "cpu", True),
    ):
        eager, compiled = build(), build()
        compiled.load_state_dict(eager.state_dict())
        if isinstance(eager, SubLoRA):
            for m in (eager, compiled):
                with torch.no_grad():
                    m.w.normal_(generator=torch.Generator().manual_seed(1))
        torch._dynamo.reset()
        x = torch.randint(65, (2, 16), generator=torch.Generator().manual_seed(0))
        eager(x, x)[1].backward()
        torch.compile(compiled, backend="aot_eager")(x, x)[1].backward()
        for (n, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
            if a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_compiled_bf16_step_equals_eager(name):
    """Under bf16 autocast (the fused LoRA function and DoRA's norm in the graph), AOT autograd's trace
    gives eager's loss and gradients."""
    eager, compiled = with_adapter(name, "cpu", True), with_adapter(name, "cpu", True)
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    x = torch.randint(65, (8, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", torch.bfloat16):
        want, got = eager(x, x)[1], torch.compile(compiled, backend="aot_eager")(x, x)[1]
    want.backward(), got.backward()
    assert torch.equal(want, got)
    for (n, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad), n


# -----------------------------------------------------------------------------
# the GPU check: compiled training through train.py for every adapter (CUDA only; make gpu-check)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (make gpu-check on a GPU machine)")
@pytest.mark.parametrize(
    "adapter", ["none", "lora", "dora", "sora", "adalora", "adadora", "pissa", "sublora"]
)
def test_compiled_training_on_cuda(adapter, char_data, tmp_path):
    from train import train

    args = [
        f"--data_dir={char_data}",
        f"--out_dir={tmp_path}",
        "--device=cuda",
        "--compile=True",
        "--max_iters=30",
        "--eval_interval=30",
        "--adapter=" + adapter,
        "--adalora_deltaT=2",
    ]
    last = train(args, environ={"TEST_MODE": "True"})
    assert last["val_loss"] == last["val_loss"] and last["val_loss"] < 4.2  # finite, below ln(65)


def test_adamw_takes_its_fused_kernel_only_on_cuda():
    """train.py's and bench.py's optimizers (SoRA's two, SubLoRA's) ask for AdamW's fused kernel when
    every parameter is on CUDA, as model.configure_optimizers does; never on a CPU or a mixed list."""
    from adapters import fused_on_cuda

    cpu = torch.zeros(2)
    assert fused_on_cuda([cpu]) == {} and fused_on_cuda([{"params": [cpu]}]) == {} and fused_on_cuda([]) == {}
    if torch.cuda.is_available():
        gpu = torch.zeros(2, device="cuda", requires_grad=True)
        assert fused_on_cuda([gpu]) == {"fused": True} and fused_on_cuda([gpu, cpu]) == {}
        model = with_adapter("sora", "cuda", True)
        assert all(opt.defaults.get("fused") for opt in build_sora_optimizers(model))
