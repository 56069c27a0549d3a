"""
Rotational PiSSA: SVD init, the four rotation ways, NF4 residual, merge, export to LoRA, adapter
state, and train.py with --adapter=pissa.

    python -m pytest -q test_pissa.py
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import plots
import train
from adapters import (
    NF4_LEVELS,
    AdapterError,
    LoRALinear,
    Rotation,
    RotationalPiSSAConfig,
    RotationalPiSSALinear,
    adapter_layers,
    adapter_state_dict,
    inject_adapters,
    load_adapter_state_dict,
    max_orthogonality_error,
    nf4_dequantize,
    nf4_quantize,
    replace_linear_with_rotational_pissa,
    rotation_penalty,
    to_lora,
)
from checkpoint import load_checkpoint
from conftest import logits, run_args, tiny_model, tokens

WAYS = ["way0", "way1", "way2", "way3"]


def train_steps(model, steps=50, lr=1e-2, penalty=0.0, seed=0):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        idx = tokens(seed=seed + step)
        loss = model(idx, idx)[1]
        if penalty:
            loss = loss + penalty * rotation_penalty(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def nf4_error_bound(W, block=64):
    """Per element: half the widest gap between adjacent NF4 levels times the block's absmax."""
    half_gap = float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max()) / 2
    flat = W.reshape(-1)
    absmax = torch.cat([flat, flat.new_zeros((-flat.numel()) % block)]).view(-1, block).abs().amax(1)
    return (absmax.repeat_interleave(block)[: flat.numel()] * half_gap).view(W.shape)


@pytest.mark.parametrize("method", WAYS)
@pytest.mark.parametrize("model_type", ["gpt", "bigram"])
def test_output_equals_base_at_init(method, model_type):
    base = tiny_model(model_type)
    model = copy.deepcopy(base)
    inject_adapters(model, "pissa", rank=4, method=method)
    idx = tokens()
    assert torch.allclose(logits(model, idx), logits(base, idx), atol=1e-5)


@pytest.mark.parametrize("method", WAYS)
def test_quantized_residual_within_the_nf4_bound(method):
    torch.manual_seed(0)
    base = nn.Linear(64, 96)
    layer = RotationalPiSSALinear(copy.deepcopy(base), rank=8, method=method, quantize_residual=True)
    W = base.weight.detach()
    principal = layer.B0 @ layer.A0
    residual = W - principal
    err = (layer.residual_weight - residual).abs()
    assert (err <= nf4_error_bound(residual) + 1e-6).all()
    x = torch.randn(10, 64)
    # the output error is the residual's quantisation error applied to x: |Δy| <= |x| · bound
    assert ((layer(x) - base(x)).abs() <= x.abs() @ nf4_error_bound(residual).T + 1e-4).all()
    # PiSSA's point: the residual has a smaller range than W, so its NF4 error is smaller
    w_err = (nf4_dequantize(*nf4_quantize(W), W.shape) - W).abs().mean()
    assert err.mean() < w_err


def test_nf4_round_trip_matches_an_independent_per_block_computation():
    torch.manual_seed(0)
    W = torch.randn(37, 50)  # 1850 values: 29 blocks of 64, the last one partial
    deq = nf4_dequantize(*nf4_quantize(W), W.shape)
    levels = NF4_LEVELS.numpy().astype(np.float64)
    flat, ref = W.numpy().reshape(-1).astype(np.float64), np.empty(W.numel())
    for start in range(0, flat.size, 64):
        block = flat[start : start + 64]
        absmax = np.abs(block).max()
        idx = np.abs(block[:, None] / absmax - levels[None, :]).argmin(axis=1)
        ref[start : start + 64] = levels[idx] * absmax
    assert np.allclose(deq.numpy().reshape(-1), ref, atol=1e-6)
    mae = np.abs(ref - flat).mean()
    assert (deq - W).abs().mean().item() == pytest.approx(mae, rel=1e-5)
    codes, absmax = nf4_quantize(W)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and absmax.shape == (29,)


@pytest.mark.parametrize("method", ["way1", "way2", "way3"])
def test_exactly_orthogonal_after_50_steps(method):
    model = tiny_model("gpt")
    inject_adapters(model, "pissa", rank=6, method=method)
    train_steps(model, steps=50, lr=5e-2)
    assert max_orthogonality_error(model) <= 1e-5
    rotations = [layer.rotation_U() for layer in adapter_layers(model).values()]
    assert max(float((R.detach() - torch.eye(6)).abs().max()) for R in rotations) > 1e-3  # they did rotate


def test_way0_penalty_decreases_the_orthogonality_error():
    def run(penalty):
        torch.manual_seed(1)
        model = tiny_model("gpt")
        inject_adapters(model, "pissa", rank=4, method="way0", init_identity=False)  # start off orthogonal
        start = max_orthogonality_error(model)
        train_steps(model, steps=50, lr=1e-2, penalty=penalty)
        return start, max_orthogonality_error(model)

    start, with_penalty = run(penalty=10.0)
    _, without = run(penalty=0.0)
    assert with_penalty < start / 4 and with_penalty < without / 2


def test_givens_round_robin_covers_every_pair_once():
    from adapters import round_robin_pairs

    for r in (2, 5, 8):
        pairs = round_robin_pairs(r)
        flat = [tuple(sorted(p)) for rnd in pairs.tolist() for p in rnd]
        assert sorted(flat) == [(i, j) for i in range(r) for j in range(i + 1, r)]
        for rnd in pairs.tolist():  # disjoint within a round
            members = [i for p in rnd for i in p]
            assert len(members) == len(set(members))


def test_randomized_and_full_svd_reconstruct_the_weight():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(96, 64))
    V, _ = torch.linalg.qr(torch.randn(64, 64))
    S = torch.cat([torch.tensor([20.0, 15, 12, 10, 8, 7]), 0.1 * torch.rand(58)])  # a clear top-6
    base = nn.Linear(64, 96)
    with torch.no_grad():
        base.weight.copy_(U @ torch.diag(S) @ V.T)
    W = base.weight.detach().clone()
    layers = {
        svd: RotationalPiSSALinear(copy.deepcopy(base), rank=6, svd=svd, svd_niter=6)
        for svd in ("full", "lowrank")
    }
    principals = {}
    for svd, layer in layers.items():
        principals[svd] = layer.B0 @ layer.A0
        residual = W - principals[svd]  # the exact difference
        assert torch.allclose(residual + principals[svd], W, atol=1e-6)
        layer.merge()
        assert torch.allclose(layer.base.weight, W, atol=1e-5)  # W_res + P(θ₀) at init, for either SVD
    assert torch.allclose(principals["full"], principals["lowrank"], atol=1e-2)
    assert torch.allclose(torch.linalg.svdvals(principals["full"])[:6], S[:6], atol=1e-4)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("method", WAYS)
def test_merged_equals_unmerged_and_lora_export(method, quantize):
    model = tiny_model("gpt")
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    inject_adapters(model, "pissa", rank=4, method=method, quantize_residual=quantize)
    train_steps(model, steps=5, lr=5e-2)
    idx = tokens()
    trained = logits(model, idx)
    merged = copy.deepcopy(model)
    for layer in adapter_layers(merged).values():
        layer.merge()
    assert torch.allclose(logits(merged, idx), trained, atol=1e-4)
    for layer in adapter_layers(merged).values():
        layer.unmerge()
    assert torch.allclose(logits(merged, idx), trained, atol=1e-4)
    if not quantize:  # the rank-2r LoRA on the original weights reproduces the trained layers
        exported = copy.deepcopy(model)
        to_lora(exported)
        layers = adapter_layers(exported)
        assert all(type(m) is LoRALinear and m.rank == 8 for m in layers.values())
        assert all(torch.equal(m.base.weight, original[n]) for n, m in layers.items())
        assert torch.allclose(logits(exported, idx), trained, atol=1e-4)


@pytest.mark.parametrize("quantize", [False, True])
def test_adapter_state_round_trip(quantize):
    model = tiny_model("gpt")
    inject_adapters(model, "pissa", rank=4, method="way2", quantize_residual=quantize)
    train_steps(model, steps=5, lr=5e-2)
    idx = tokens()
    state = adapter_state_dict(model)
    assert not any(".base." in k for k in state)  # U, V, P(θ₀) and the NF4 residual, never the base
    fresh = tiny_model("gpt")  # the original base; its own SVD is overwritten by the stored factors
    inject_adapters(fresh, "pissa", rank=4, method="way2", quantize_residual=quantize)
    fresh.eval()
    fresh(idx)  # fills the residual cache, which the load below must invalidate
    load_adapter_state_dict(fresh, state)
    assert torch.allclose(logits(fresh, idx), logits(model, idx), atol=1e-6)


def test_fold_rotations_keeps_outputs():
    model = tiny_model("gpt")
    inject_adapters(model, "pissa", rank=4, method="way1")
    train_steps(model, steps=5, lr=5e-2)
    idx = tokens()
    before = logits(model, idx)
    for layer in adapter_layers(model).values():
        layer.fold_rotations()
        assert torch.equal(layer.rotation_U.angles, torch.zeros_like(layer.rotation_U.angles))
    assert torch.allclose(logits(model, idx), before, atol=1e-5)


def test_seed_design_entry_point():
    model = tiny_model("gpt")
    model.transformer.ln_f.weight.requires_grad_(True)
    cfg = RotationalPiSSAConfig(r=4, method="way3", freeze_singular_values=True)
    layers = replace_linear_with_rotational_pissa(
        model=model,
        pissa_config=cfg,
        target_modules=["c_attn", "c_fc"],
        adapter_name="default",
        freeze_base_model=False,
    )
    assert sorted(layers) == sorted(
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")
    )
    assert all(
        isinstance(m, RotationalPiSSALinear) and not m.singular_values.requires_grad for m in layers.values()
    )
    assert model.transformer.ln_f.weight.requires_grad  # freeze_base_model=False kept it trainable
    with pytest.raises(AdapterError, match="adapter_name"):
        replace_linear_with_rotational_pissa(model=tiny_model("gpt"), pissa_config=cfg, adapter_name="second")


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(method="way9"), "way0, way1, way2 or way3"),
        (dict(svd="qr"), "'full' or 'lowrank'"),
        (dict(rank=40), "larger than the layer"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(AdapterError, match=message):
        inject_adapters(tiny_model("gpt"), "pissa", **{"rank": 4, **settings})


def test_rotation_identity_at_init():
    for method in WAYS:
        assert torch.allclose(Rotation(5, method)(), torch.eye(5), atol=1e-7)


@pytest.mark.parametrize("method", ["way0", "way1"])
def test_train_pissa_end_to_end(method, char_data, tmp_path):
    out = tmp_path / method
    train.train(
        run_args(
            char_data,
            out,
            adapter="pissa",
            pissa_method=method,
            lora_rank=4,
            lora_alpha=4.0,
            pissa_ortho_weight=0.5,
            pissa_init_identity=False,
            max_iters=12,
            eval_interval=12,
            learning_rate=1e-2,
        ),
        environ={},
    )
    rows = [r for r in plots.read_metrics(str(out)) if r["train_loss"] is not None]
    if method == "way0":
        for r in rows:  # the weighted penalty is logged beside the task loss, and their sum
            assert r["total_loss"] == pytest.approx(r["task_loss"] + r["extra_loss"])
            assert r["task_loss"] == r["train_loss"]
        # iteration 0's term is 0.5 x the penalty of the model the run started from (rebuilt from its seed)
        from adapters import rotation_penalty
        from checkpoint import initial_model
        from prepare import read_meta

        start = initial_model(load_checkpoint(str(out)), read_meta(char_data))
        assert rows[0]["iter"] == 0 and rows[0]["extra_loss"] > 0
        assert rows[0]["extra_loss"] == pytest.approx(0.5 * rotation_penalty(start).item(), rel=1e-5)
    else:
        assert "extra_loss" not in rows[-1] and max(r["max_orthogonality_error"] for r in rows) <= 1e-5
    ckpt = load_checkpoint(str(out))
    assert ckpt["adapter"]["settings"]["method"] == method


def test_givens_product_equals_the_sequential_rotations():
    import math

    rot = Rotation(7, "way1")
    with torch.no_grad():
        rot.angles.normal_()
    expected = torch.eye(7)
    for pairs, angles in zip(rot.pairs.tolist(), rot.angles.tolist()):  # round 0 first
        G = torch.eye(7)
        for (i, j), t in zip(pairs, angles):
            G[i, i], G[j, j], G[i, j], G[j, i] = math.cos(t), math.cos(t), -math.sin(t), math.sin(t)
        expected = G @ expected
    assert torch.allclose(rot().detach(), expected, atol=1e-6)


def closed_form_rotation(rot):
    """R from a rotation's parameters in float64, by hand: Givens rounds one by one (way1), the Cayley
    map with an explicit inverse (way2), the exponential as its Taylor series (way3)."""
    import math

    r = rot.r
    if rot.method == "way1":
        R = torch.eye(r, dtype=torch.float64)
        for pairs, angles in zip(rot.pairs.tolist(), rot.angles.tolist()):
            G = torch.eye(r, dtype=torch.float64)
            for (i, j), t in zip(pairs, angles):
                G[i, i], G[j, j], G[i, j], G[j, i] = math.cos(t), math.cos(t), -math.sin(t), math.sin(t)
            R = G @ R
        return R
    if rot.method == "way2":
        B, C = rot.skew_B.detach().double(), rot.skew_C.detach().double()
        K = B @ C.T - C @ B.T
        return torch.linalg.inv(torch.eye(r, dtype=torch.float64) - K) @ (
            torch.eye(r, dtype=torch.float64) + K
        )
    A = rot.generator.detach().double()
    A = A - A.T
    R, term = torch.eye(r, dtype=torch.float64), torch.eye(r, dtype=torch.float64)
    for k in range(1, 40):
        term = term @ A / k
        R = R + term
    return R


@pytest.mark.parametrize("method", ["way1", "way2", "way3"])
def test_rotations_equal_their_closed_forms(method):
    """Every rotation of a model (ways 1-3) equals its closed form in float64."""
    torch.manual_seed(0)
    model = tiny_model("gpt")
    inject_adapters(model, "pissa", rank=4, method=method, init_identity=False)
    rotations = [
        rot for layer in adapter_layers(model).values() for rot in (layer.rotation_U, layer.rotation_V)
    ]
    for rot in rotations:
        assert torch.allclose(rot().double(), closed_form_rotation(rot), atol=1e-6)


def test_factors_are_built_in_the_buffers_precision_under_autocast():
    """Under bf16 autocast U R_U and V R_V stay fp32 products, so P(θ) - P(θ₀) is built from the same
    numbers as the frozen P(θ₀) (at init its two halves are equal, not a bf16 rounding apart)."""
    model = tiny_model("gpt")
    inject_adapters(model, "pissa", rank=4, method="way1")
    for layer in adapter_layers(model).values():
        want = layer.factors()
        with torch.autocast("cpu", torch.bfloat16):
            got = layer.factors()
        assert all(g.dtype == torch.float32 and torch.equal(g, w) for g, w in zip(got[:2], want[:2]))
        B, A, _ = got
        assert torch.equal(B[:, :4], -B[:, 4:]) and torch.equal(A[:4], A[4:])


def test_milora_starts_from_the_smallest_singular_triplets_in_float64():
    """pissa_components='minor' (MiLoRA): the adapter's part at init is the r smallest singular triplets
    of W, equal to numpy's float64 SVD reconstruction, and W = residual + that part exactly (the layer
    computes its base at init)."""
    import numpy as np

    from adapters import RotationalPiSSALinear

    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)  # the whole layer in float64, its rotations included
    try:
        base = nn.Linear(24, 16)
        layer = RotationalPiSSALinear(base, rank=4, alpha=4.0, method="way3", components="minor")
    finally:
        torch.set_default_dtype(torch.float32)
    U, S, Vt = np.linalg.svd(base.weight.detach().numpy(), full_matrices=False)
    minor = (U[:, -4:] * S[-4:]) @ Vt[-4:]
    part = (layer.B0 @ layer.A0).detach().numpy()
    assert np.abs(part - minor).max() < 1e-12
    x = torch.randn(5, 24, dtype=torch.float64)
    assert torch.allclose(layer(x), base(x), rtol=0, atol=1e-12)


def test_olora_equals_peft_olora():
    """pissa_components='olora': the part the adapter starts from is the first r columns of W's QR, as
    PEFT's init_lora_weights='olora' computes it (its lora_B lora_A at scale 1), and the residual is
    PEFT's new base weight."""
    peft = pytest.importorskip("peft")

    from adapters import RotationalPiSSALinear

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(24, 16))
    ours = RotationalPiSSALinear(
        copy.deepcopy(model.fc), rank=4, alpha=4.0, method="way1", components="olora"
    )
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["fc"], init_lora_weights="olora")
    theirs = peft.get_peft_model(copy.deepcopy(model), config).base_model.model.fc
    part = theirs.lora_B["default"].weight @ theirs.lora_A["default"].weight
    assert torch.allclose(ours.B0 @ ours.A0, part, rtol=0, atol=1e-5)
    residual = model.fc.weight - ours.B0 @ ours.A0
    assert torch.allclose(residual, theirs.base_layer.weight, rtol=0, atol=1e-5)
    x = torch.randn(5, 24)
    assert torch.allclose(ours(x), theirs(x), rtol=0, atol=1e-5)
