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
    AdapterError,
    SubLoRA,
    adapter_state_dict,
    build_sora_optimizers,
    merge_adapters,
    to_lora,
)
from conftest import adapted, tiny_model

DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


def with_case(case, device, before, **kw):
    """(family, model): the family case adapted as train.py adapts it, into a model already on `device`
    (before=True), or on the CPU and moved afterwards; its optimizers built as train.py builds them."""
    family, model, _ = adapted(case, tiny_model(device=device if before else "cpu", vocab_size=65), **kw)
    model = model if before else model.to(device)
    family.opts = [opt for opt, _ in family.optimizers(model, 1e-3, (0.9, 0.99), 0.1, "cpu")]
    return family, model


def train_step(family, model, device, step=0):
    """Forward and finish_step, as train.py does them."""
    x = (
        torch.randint(65, (2, 16), device=device)
        if device != "meta"
        else torch.zeros(2, 16, dtype=torch.long, device=device)
    )
    loss = model(x, x)[1]
    finish_step(family, model, loss, step)
    return loss


def finish_step(family, model, loss, step):
    """The family's extra loss, backward, the optimizers' step and the family's after-step work."""
    extra = family.extra_loss(model)
    (loss if extra is None else loss + extra).backward()
    for opt in family.opts:
        opt.step()
    family.after_step(model, step)
    for opt in family.opts:
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("before", [True, False], ids=["injected_on_device", "moved_after"])
@pytest.mark.parametrize("device", DEVICES)
def test_every_family_trains_on_a_non_cpu_device(family_case, device, before):
    family, model = with_case(family_case, device, before)
    for step in range(3):
        loss = train_step(family, model, device, step)
    assert loss.device.type == device
    assert all(t.device.type == device for t in [*model.parameters(), *model.buffers()])
    if device == "cuda":  # on a real GPU: the same numbers as on the CPU (SubLoRA: the seed rebuilds P)
        cpu = with_case(family_case, "cpu", True)[1]
        cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
        x = torch.randint(65, (2, 16))
        torch.testing.assert_close(model(x.cuda())[0].cpu(), cpu(x)[0], rtol=1e-4, atol=1e-4)


def test_the_meta_device_catches_a_tensor_made_on_the_cpu():
    """The check above is real: SubLoRA before its fix (projector buffers left on the CPU)."""
    family, model = with_case("sublora_dense_uniform", "meta", True, sublora_projector="rdkronqr")
    proj = model.projectors[0]
    proj.Q1 = torch.zeros(proj.Q1.shape)  # what a buffer built on the CPU and never moved is
    with pytest.raises(RuntimeError, match="device"):
        train_step(family, model, "meta")


def test_merge_prune_slice_export_make_no_tensor_off_the_model_device(family_case):
    """Value-dependent paths (they check finiteness, count ranks): a CPU model with meta as the default
    device, so any tensor made without device= lands on meta and fails."""
    family, model = with_case(family_case, "cpu", True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    x = torch.randint(65, (2, 16))
    want = model.eval()(x)[0]
    with torch.device("meta"):
        try:
            hf.lora_factors(model)  # every family as the LoRA / DoRA that PEFT receives
            to_lora(model)  # SoRA's prune, AdaLoRA's slice, PiSSA's export
        except (AdapterError, hf.InteropError) as e:  # PiSSA's NF4 residual: no LoRA computes it
            assert "NF4" in str(e)
        adapter_state_dict(model)
        model = merge_adapters(model)
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

    model = with_case("sublora_rdkronqr_learned", "cpu", True)[1]
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


def compiled_steps(family, model, steps=5, autocast=False):
    """Training steps through torch.compile with a counting backend, the family's hooks around them."""
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = torch.randint(65, (8 if autocast else 2, 16), generator=gen)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = compiled(x, x)[1]
        finish_step(family, model, loss, step)
    return counter


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_compile_traces_one_graph_and_never_recompiles(family_case, autocast):
    family, model = with_case(family_case, "cpu", True)
    counter = compiled_steps(family, model, autocast=autocast)
    assert counter.frame_count == 1  # a graph break or a recompile would add a frame
    assert counter.op_count > 0


def test_compiled_gradients_equal_eager():
    """Compiling must not change what is trained: the same step compiled and eager (DoRA, whose norm
    is recomputed in the graph, and SubLoRA learned, whose mask gradient is straight-through)."""
    for build in (
        lambda: with_case("adadora", "cpu", True)[1],
        lambda: with_case("sublora_rdkronqr_learned", "cpu", True)[1],
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


@pytest.mark.parametrize("case", ["lora_qv_rslora_loraplus", "dora"])
def test_compiled_bf16_step_equals_eager(case):
    """Under bf16 autocast (the fused LoRA function and DoRA's norm in the graph), AOT autograd's trace
    gives eager's loss and gradients."""
    eager, compiled = with_case(case, "cpu", True)[1], with_case(case, "cpu", True)[1]
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
        model = with_case("sora", "cuda", True)[1]
        assert all(opt.defaults.get("fused") for opt in build_sora_optimizers(model))
