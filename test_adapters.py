"""
LoRA layer, injection, counting, adapter-only state and merge, on tiny models of both layouts.

    python -m pytest -q test_adapters.py
"""

import copy

import pytest
import torch
import torch.nn as nn

from adapters import (
    AdapterError,
    LoRALinear,
    adapter_layers,
    adapter_state_dict,
    count_params,
    find_targets,
    inject_adapters,
    load_adapter_state_dict,
    merge_adapters,
)
from conftest import adapted, logits, tiny_model, tokens


def randomise_adapters(model, seed=2):
    """B = 0 at init makes merge trivially right; give every B non-zero values."""
    g = torch.Generator().manual_seed(seed)
    for layer in adapter_layers(model).values():
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("model_type", ["gpt", "bigram"])
def test_output_equals_base_at_init(model_type):
    base = tiny_model(model_type)
    model = copy.deepcopy(base)
    inject_adapters(model, "lora", rank=4, alpha=8.0)
    idx = tokens()
    assert torch.equal(logits(base, idx), logits(model, idx))


def test_lora_forward_matches_closed_form():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoRALinear(copy.deepcopy(base), rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 12)
    W, b, A, B = base.weight, base.bias, layer.lora_A, layer.lora_B
    expected = x @ W.T + b + 2.0 * (x @ A.T) @ B.T  # scaling alpha / r = 2
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.allclose(layer.delta_weight(), 2.0 * B @ A, atol=1e-6)
    rs = LoRALinear(nn.Linear(12, 7), rank=4, alpha=6.0, use_rslora=True)
    assert rs.scaling == pytest.approx(6.0 / 2.0)  # alpha / sqrt(r)


@pytest.mark.parametrize("model_type", ["gpt", "bigram"])
def test_default_targets_and_trainable_count(model_type):
    model = tiny_model(model_type)
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    names = inject_adapters(model, "lora", rank=4)
    assert sorted(names) == sorted(linears)  # every Linear of both layouts is a default target
    trainable, total = count_params(model)
    assert trainable == sum(4 * (m.in_features + m.out_features) for m in linears.values())
    assert total == sum(p.numel() for p in tiny_model(model_type).parameters()) + trainable
    named = {n for n, p in model.named_parameters() if p.requires_grad}
    assert named == {f"{n}.lora_{x}" for n in names for x in "AB"}


def test_train_embeddings_option():
    model = tiny_model("gpt")
    inject_adapters(model, "lora", rank=2, train_embeddings=True)
    trainable, _ = count_params(model)
    lora = sum(2 * (m.in_features + m.out_features) for m in adapter_layers(model).values())
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    assert trainable == lora + wte.numel() + wpe.numel()


def test_trained_embedding_gets_the_tied_heads_gradient():
    """train_embeddings=True trains the token embedding, which the GPT's head is tied to: the adapted
    head passes its weight gradient dyᵀ x to it, as the plain Linear plus LoRA branch does (the fused
    layer once dropped it)."""
    import types

    model = tiny_model("gpt").double()
    inject_adapters(model, "lora", rank=2, train_embeddings=True)
    randomise_adapters(model)
    plain = copy.deepcopy(model)

    def reference(self, x):  # W x + s (x Aᵀ) Bᵀ through autograd's own ops
        B, A, s = self.factors()
        return nn.functional.linear(x, self.base.weight, self.base.bias) + s * (x @ A.T) @ B.T

    for layer in adapter_layers(plain).values():
        layer.forward = types.MethodType(reference, layer)
    idx = tokens()
    model(idx, idx)[1].backward()
    plain(idx, idx)[1].backward()
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_base_weights_unchanged_after_steps():
    model = tiny_model("gpt")
    inject_adapters(model, "lora", rank=4, dropout=0.1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = model.configure_optimizers(
        weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.99), device_type="cpu"
    )
    model.train()
    for step in range(5):
        idx = tokens(seed=step)
        model(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, lora[n]), n


@pytest.mark.parametrize("model_type", ["gpt", "bigram"])
def test_merged_equals_unmerged(model_type):
    model = tiny_model(model_type)
    inject_adapters(model, "lora", rank=4)
    randomise_adapters(model)
    idx = tokens()
    unmerged = logits(model, idx)
    for layer in adapter_layers(model).values():
        layer.merge()
    assert torch.allclose(logits(model, idx), unmerged, atol=1e-5)
    plain = merge_adapters(copy.deepcopy(model))
    assert not adapter_layers(plain)
    assert all(type(m) is nn.Linear for n, m in plain.named_modules() if n.endswith(("c_attn", "lm_head")))
    assert torch.allclose(logits(plain, idx), unmerged, atol=1e-5)


def test_merge_closed_form_idempotent_and_unmerge_restores():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 24), rank=4, alpha=16.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    W0 = layer.base.weight.detach().clone()
    expected = W0 + 4.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    layer.merge()
    layer.merge()  # a second merge is a no-op
    assert layer.merged
    assert torch.allclose(layer.base.weight, expected, atol=1e-6)
    x = torch.randn(3, 16)
    assert torch.allclose(layer(x), x @ expected.T + layer.base.bias, atol=1e-5)
    layer.unmerge()
    layer.unmerge()
    assert not layer.merged
    assert torch.allclose(layer.base.weight, W0, atol=1e-6)


def test_merging_the_tied_head_leaves_the_embedding():
    """GPT ties lm_head to wte: merging the head's LoRA must not change the token embedding."""
    model = tiny_model("gpt")
    wte = model.transformer.wte.weight.detach().clone()
    inject_adapters(model, "lora", rank=4)
    randomise_adapters(model)
    idx = tokens()
    before = logits(model, idx)
    merge_adapters(model)
    assert torch.equal(model.transformer.wte.weight, wte)
    assert torch.allclose(logits(model, idx), before, atol=1e-5)


def test_merge_refuses_non_finite():
    layer = LoRALinear(nn.Linear(8, 8), rank=2)
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
    W0 = layer.base.weight.detach().clone()
    with pytest.raises(AdapterError, match="non-finite"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base.weight, W0)


@pytest.mark.parametrize("model_type", ["gpt", "bigram"])
def test_adapter_state_round_trip(model_type, tmp_path):
    model = tiny_model(model_type)
    inject_adapters(model, "lora", rank=4, train_embeddings=True)
    randomise_adapters(model)
    with torch.no_grad():  # a trained token embedding (tied to the head in the GPT)
        next(m for m in model.modules() if isinstance(m, nn.Embedding)).weight.add_(0.5)
    state = adapter_state_dict(model)
    n_adapter = sum(v.numel() for v in state.values())
    assert n_adapter == count_params(model)[0]  # exactly the trainable tensors, nothing frozen
    torch.save(state, tmp_path / "adapter.pt")

    fresh = tiny_model(model_type)  # same seed: the same frozen base
    inject_adapters(fresh, "lora", rank=4, train_embeddings=True)
    idx = tokens()
    assert not torch.allclose(logits(fresh, idx), logits(model, idx))
    load_adapter_state_dict(fresh, torch.load(tmp_path / "adapter.pt", weights_only=True))
    assert torch.equal(logits(fresh, idx), logits(model, idx))


def test_adapter_state_mismatch_errors():
    model = tiny_model("gpt")
    inject_adapters(model, "lora", rank=4)
    other = tiny_model("gpt")
    inject_adapters(other, "lora", rank=2)
    with pytest.raises(AdapterError, match="shape"):
        load_adapter_state_dict(other, adapter_state_dict(model))
    partial = tiny_model("gpt")
    inject_adapters(partial, "lora", rank=4, targets=["c_attn"])
    with pytest.raises(AdapterError, match="unknown keys"):
        load_adapter_state_dict(partial, adapter_state_dict(model))


def test_fused_qv_target():
    model = tiny_model("gpt")
    names = inject_adapters(model, "lora", targets=["c_attn:q,v", "lm_head"], rank=2)
    assert names == [f"transformer.h.{i}.attn.c_attn:q,v" for i in range(2)] + ["lm_head"]
    layer = model.transformer.h[0].attn.c_attn
    assert layer.lora_B.shape == (64, 2)  # q and v rows of the 96 outputs only
    randomise_adapters(model)
    delta = layer.delta_weight()
    assert (
        torch.equal(delta[32:64], torch.zeros(32, 32))
        and delta[:32].abs().sum() > 0
        and delta[64:].abs().sum() > 0
    )
    x = torch.randn(3, 32)
    assert torch.allclose(layer(x), layer.base(x) + x @ delta.T, atol=1e-6)
    assert count_params(model)[0] == 2 * (2 * (32 + 64)) + 2 * (32 + 40)
    with pytest.raises(AdapterError, match="fused thirds"):
        inject_adapters(tiny_model("gpt"), "lora", targets=["c_attn:x"])
    with pytest.raises(AdapterError, match="3·C outputs"):
        inject_adapters(tiny_model("gpt"), "lora", targets=["lm_head:q"])


def test_target_patterns():
    model = tiny_model("gpt")
    assert find_targets(model, ["transformer.h.0.attn.c_proj"]) == ["transformer.h.0.attn.c_proj"]
    assert find_targets(model, ["attn.c_proj"]) == [f"transformer.h.{i}.attn.c_proj" for i in range(2)]
    assert find_targets(model, ["transformer.h.*.mlp.c_fc"]) == [
        f"transformer.h.{i}.mlp.c_fc" for i in range(2)
    ]
    assert find_targets(model, ["c_proj"]) == [
        f"transformer.h.{i}.{m}.c_proj" for i in range(2) for m in ("attn", "mlp")
    ]


@pytest.mark.parametrize(
    "targets, settings, message",
    [
        (["nonexistent"], dict(rank=4), "matches no module"),
        (["transformer.wte"], dict(rank=4), "not nn.Linear"),
        (["c_attn"], dict(rank=0), "positive int"),
        (["c_attn"], dict(rank=33), "larger than the layer"),
    ],
)
def test_bad_injection_errors(targets, settings, message):
    with pytest.raises(AdapterError, match=message):
        inject_adapters(tiny_model("gpt"), "lora", targets=targets, **settings)


def test_unknown_kind_and_double_injection():
    model = tiny_model("gpt")
    with pytest.raises(AdapterError, match="unknown adapter"):
        inject_adapters(model, "nope")
    inject_adapters(model, "lora", rank=2)
    with pytest.raises(AdapterError, match="already has adapters"):
        inject_adapters(model, "lora", rank=2)


@pytest.mark.parametrize("dropout,bias", [(False, True), (True, False)])
def test_fused_lora_linear_gradients_are_exact(dropout, bias):
    """The 3-GEMM forward / 5-GEMM backward against torch's finite differences (float64): every input
    that trains or carries a gradient (x, the dropped-out x, A, B) gets the gradient of
    x Wᵀ + b + s (xd Aᵀ) Bᵀ."""
    from adapters import fused_lora_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    xd = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True) if dropout else x
    W = torch.randn(4, 5, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g) if bias else None
    A = torch.randn(2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.float64, generator=g, requires_grad=True)
    inputs = (x, xd, A, B) if dropout else (x, A, B)
    fn = (
        (lambda x, xd, A, B: fused_lora_linear(x, xd, W, b, A, B, 0.7))
        if dropout
        else (lambda x, A, B: fused_lora_linear(x, x, W, b, A, B, 0.7))
    )
    assert torch.autograd.gradcheck(fn, inputs)
    want = x @ W.T + (0 if b is None else b) + 0.7 * (xd @ A.T) @ B.T
    torch.testing.assert_close(fn(*inputs), want)


def test_fused_path_equals_the_plain_forward(family_case, monkeypatch):
    """The fused 3-GEMM layer (FUSED_LORA='always') against the plain forward, its oracle, for every
    family case: in float64 (dropout off) the loss and every gradient agree to rounding; under bf16
    autocast the two stay as close to the float64 loss as each other."""
    import adapters

    _, model, _ = adapted(family_case, tiny_model("gpt"))
    model.eval()  # dropout off: both paths see the same input
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every trained tensor away from its init (B = 0 would hide the branch)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)
    idx = tokens()

    def run(fused, model, autocast=False):
        monkeypatch.setattr(adapters, "FUSED_LORA", "always" if fused else "never")
        model = copy.deepcopy(model)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = model(idx, idx)[1]
        loss.backward()
        return loss.double(), {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}

    (plain, plain_grads), (fused, fused_grads) = run(False, model.double()), run(True, model.double())
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for n, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[n], grad, rtol=1e-9, atol=1e-12, msg=n)
    bf16_plain, bf16_fused = run(False, model.float(), True)[0], run(True, model.float(), True)[0]
    assert abs(bf16_fused - plain) <= 2 * abs(bf16_plain - plain) + 1e-2


def test_regularisers_ignore_autocast():
    """AdaLoRA's orthogonality term and PiSSA way0's rotation penalty are computed in the factors'
    precision: under bf16 autocast they equal their fp32 values exactly."""
    from adapters import orthogonal_regularization, rotation_penalty

    for kind, term, settings in (
        ("adalora", orthogonal_regularization, {}),
        ("pissa", rotation_penalty, dict(method="way0", init_identity=False)),
    ):
        model = tiny_model("gpt")
        inject_adapters(model, kind, rank=4, **settings)
        with torch.autocast("cpu", torch.bfloat16):
            under = term(model)
        assert under.dtype == torch.float32 and torch.equal(under, term(model)), kind


@pytest.mark.parametrize("kind", ["lora", "dora", "sora", "adalora"])
def test_the_plain_line_is_the_line_that_runs(kind, monkeypatch):
    """Edit the formula as a researcher would (a tanh between A and B, in AdapterLinear.forward's own
    source) and the CPU output follows the edit: the forward computes the line it shows. The edited
    model equals an independent computation of W x + b + s·B tanh(A x) (DoRA: rescaled per row)."""
    import inspect
    import textwrap

    import adapters

    source = textwrap.dedent(inspect.getsource(adapters.AdapterLinear.forward))
    plain = "F.linear(x, W, b) + s * (xd @ A.T) @ B.T"
    assert source.count(plain) == 1, "the plain formula is written once in AdapterLinear.forward"
    namespace = {}
    exec(
        source.replace(plain, "F.linear(x, W, b) + s * torch.tanh(xd @ A.T) @ B.T"), vars(adapters), namespace
    )
    model = tiny_model("gpt")
    inject_adapters(model, kind, rank=2, targets=["lm_head"])
    layer = adapter_layers(model)["lm_head"]
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if n in ("lora_B", "lora_E", "gate"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    x = torch.randn(3, layer.in_features)
    before = layer(x)
    monkeypatch.setattr(adapters.AdapterLinear, "forward", namespace["forward"])
    after = layer(x)
    B, A, s = (t.detach() if torch.is_tensor(t) else t for t in layer.factors())
    W = layer.base.weight.detach()
    want = x @ W.T + s * torch.tanh(x @ A.T) @ B.T
    if layer.magnitude is not None:
        want = want * (layer.magnitude / (W + s * B @ A).norm(dim=1)).detach()
    torch.testing.assert_close(after, want)
    assert not torch.allclose(after, before)
