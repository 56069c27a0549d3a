"""
SubLoRA: projectors, allocation modes, rebuilding from the seed, and train.py with --adapter=sublora.

    python -m pytest -q test_sublora.py
"""

import copy
import os
import subprocess
import sys

import pytest
import torch

import plots
import train
from adapters import (
    AdapterError,
    DenseProjector,
    RdKronQRProjector,
    SparseProjector,
    SubLoRA,
    count_params,
    inject_adapters,
    merge_adapters,
)
from checkpoint import build_model, load_checkpoint, read_adapter_file
from conftest import logits, run_args, tiny_model, tokens
from model import GPT, GPTConfig

MODES = ["uniform", "fixed", "learned"]
HERE = os.path.dirname(os.path.abspath(__file__))


def wrapped(mode="uniform", projector="rdkronqr", d=120, ratio=0.25, model_type="gpt"):
    model = tiny_model(model_type)
    targets = ["c_attn:q,v", "lm_head"] if model_type == "gpt" else ["query", "value", "lm_head"]
    inject_adapters(model, "lora", targets=targets, rank=4, alpha=32.0)
    return SubLoRA(model, d, projector, mode, ratio, seed=3)


@pytest.mark.parametrize("projector", ["dense", "sparse", "rdkronqr"])
@pytest.mark.parametrize("mode", MODES)
def test_logits_equal_the_base_at_w_zero(mode, projector):
    base = tiny_model("gpt")
    sub = wrapped(mode, projector)
    idx = tokens()
    assert torch.equal(logits(sub, idx), logits(base, idx))  # B = 0 in θ₀ and w = 0
    assert count_params(sub)[0] == 120 + (len(sub.blocks) if mode == "learned" else 0)


def test_rdkronqr_is_an_isometry_at_realistic_size():
    P = RdKronQRProjector(D=120_000, d=2_000, seed=0)
    for seed in range(3):
        z = torch.randn(2_000, generator=torch.Generator().manual_seed(seed))
        assert P(z).norm() / z.norm() == pytest.approx(1.0, abs=0.05)
    assert P(torch.zeros(2_000)).shape == (120_000,)


@pytest.mark.parametrize("cls", [DenseProjector, SparseProjector])
def test_dense_and_sparse_have_the_expected_scale(cls):
    P = cls(20_000, 300, seed=1)
    ratios = [P(z).norm() / z.norm() for z in torch.randn(8, 300)]
    assert float(torch.stack(ratios).pow(2).mean()) == pytest.approx(1.0, abs=0.1)  # E‖Pz‖² = ‖z‖²


@pytest.mark.parametrize("cls", [DenseProjector, SparseProjector, RdKronQRProjector])
def test_projector_gradient_is_its_transpose(cls):
    P = (
        cls(3_000, 40, seed=2)
        if cls is not DenseProjector
        else DenseProjector(3_000, 40, seed=2, rows_per_block=700)
    )
    matrix = torch.stack([P(e) for e in torch.eye(40)], dim=1)  # (D, d), column by column
    z = torch.randn(40, requires_grad=True)
    g = torch.randn(3_000)
    (P(z) * g).sum().backward()
    assert torch.allclose(z.grad, matrix.T @ g, atol=1e-4)  # the same P in both passes (regenerated)
    assert torch.allclose(P(z.detach()), matrix @ z.detach(), atol=1e-5)


def test_fixed_mode_routes_round_ratio_d_coordinates_to_B():
    sub = wrapped("fixed", d=120, ratio=0.3)
    d_a, d_b = sub.split
    assert (d_a, d_b) == (84, 36)  # d_B = round(0.3 · 120)
    w = torch.randn(120, requires_grad=True)
    delta_a, delta_b = sub.deltas(w)
    grad_a = torch.autograd.grad((delta_a * torch.randn_like(delta_a)).sum(), w)[0]
    grad_b = torch.autograd.grad((delta_b * torch.randn_like(delta_b)).sum(), w)[0]
    assert torch.equal(grad_a[d_a:], torch.zeros(d_b)) and grad_a[:d_a].abs().sum() > 0
    assert torch.equal(grad_b[:d_a], torch.zeros(d_a)) and grad_b[d_a:].abs().sum() > 0


def test_learned_mode_gates_get_gradients_and_masks_are_monotone():
    sub = wrapped("learned", d=120)
    assert sub.blocks == ["transformer.h.0", "transformer.h.1", "head"]
    assert sum(sub.block_dims) == 120
    for a, m in zip(sub.mask_args(), sub.masks()):
        # m = sigmoid(a) with a finite is in (0, 1); in float64, m > 0 and 1 - m = sigmoid(-a) > 0
        # (fp32 rounds m to exactly 0 or 1 a few indices away from the boundary)
        assert torch.isfinite(a).all() and (a[1:] < a[:-1]).all()
        assert (torch.sigmoid(a.double()) > 0).all() and (torch.sigmoid(-a.double()) > 0).all()
        assert ((m >= 0) & (m <= 1)).all() and (m[1:] <= m[:-1]).all()  # falling with the index
        assert abs(float((m > 0.5).sum()) - 0.5 * len(m)) <= 1  # γ = 0.5 at init: half the coordinates to B
    with torch.no_grad():
        sub.w.normal_(std=0.5)
    idx = tokens()
    sub(idx, idx)[1].backward()
    assert sub.gate_logits.grad is not None and (sub.gate_logits.grad != 0).all()


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_learned_mode_works_for_every_d_up_to_D(share):
    """nanoGPT's 6 x 384 shape: the head's B (65 x 4 = 260 numbers) is far smaller than its share of
    w; no block gets more coordinates than its two factors hold, and a part smaller than the block's
    coordinates reads only its end of them."""
    model = GPT(
        GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=64, vocab_size=65, bias=False, dropout=0.0)
    )
    inject_adapters(model, "lora", targets=["c_attn:q,v", "lm_head"], rank=4)
    D = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sub = SubLoRA(model, int(share * D), allocation_mode="learned")
    assert sum(sub.block_dims) == int(share * D)
    sizes = {
        b: sum(
            sub.shapes[n].numel()
            for n in sub.a_names + sub.b_names
            if n.startswith(b) or b == "head" and "lm_head" in n
        )
        for b in sub.blocks
    }
    assert all(dl <= sizes[b] for b, dl in zip(sub.blocks, sub.block_dims))
    idx = torch.randint(0, 65, (2, 16))
    torch.testing.assert_close(sub(idx)[0], sub.model(idx)[0])  # w = 0: the base
    with torch.no_grad():
        sub.w.normal_(std=0.01)
    sub(idx, idx)[1].backward()
    assert sub.w.grad.abs().sum() > 0 and (sub.gate_logits.grad != 0).all()


def test_learned_gates_get_a_gradient_from_the_whole_edge_of_the_mask():
    """The SubLoRA code's mask sigmoid(C (γ d - i)) moves ~1/C coordinates: with gate_grad_width = 0 the gate
    gradient is that of one or two coordinates of w; the straight-through wide mask gathers it over
    the block's edge, and leaves the forward (and so the bound) unchanged."""
    narrow, wide = wrapped("learned", d=120), wrapped("learned", d=120)
    narrow.gate_grad_width = 0.0
    with torch.no_grad():
        for sub in (narrow, wide):
            sub.w.copy_(torch.linspace(-1, 1, 120))
    for a, b in zip(narrow.masks(), wide.masks()):
        assert torch.equal(a.detach(), b.detach())  # same forward
    # how many coordinates' mask values pass a gradient to their block's gate logit
    for sub, check in ((narrow, lambda r, dl: r <= 3), (wide, lambda r, dl: r >= 0.2 * dl)):
        J = torch.autograd.functional.jacobian(lambda g: torch.cat(sub.masks(g)), sub.gate_logits.detach())
        start = 0
        for k, dl in enumerate(sub.block_dims):
            col = J[start : start + dl, k].abs()
            reach = int((col > 1e-3 * col.max()).sum())
            assert check(reach, dl), (k, reach, dl)
            start += dl


def test_materialize_and_merge_keep_the_outputs():
    sub = wrapped("learned")
    with torch.no_grad():
        sub.w.normal_(std=0.5)
    idx = tokens()
    expected = logits(sub, idx)
    plain = merge_adapters(copy.deepcopy(sub))
    assert not isinstance(plain, SubLoRA) and torch.allclose(logits(plain, idx), expected, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d=10**6), "intrinsic_dim must be in 2.."),
        (dict(mode="fixed", ratio=0.0), "leaves no coordinate"),
        (dict(projector="fastfood"), "projector must be one of"),
        (dict(mode="halves"), "allocation_mode must be"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(AdapterError, match=message):
        wrapped(**kwargs)
    with pytest.raises(AdapterError, match="only trainable parameters are LoRA"):
        SubLoRA(tiny_model("gpt"), 10)


@pytest.mark.parametrize("mode", MODES)
def test_training_w_lowers_val_loss(mode, char_data, tmp_path):
    out = tmp_path / mode
    train.train(
        run_args(
            char_data,
            out,
            adapter="sublora",
            intrinsic_dim=300,
            allocation_mode=mode,
            allocation_ratio=0.5,
            lora_rank=4,
            lora_alpha=32.0,
            max_iters=30,
            eval_interval=30,
            learning_rate=2e-2,
            lr_decay_iters=30,
        ),
        environ={},
    )
    rows = plots.read_metrics(str(out))
    v = [r["val_loss"] for r in rows if r["val_loss"] is not None]
    assert v[-1] < v[0] - 0.1
    steps = [r for r in rows if r["train_loss"] is not None]
    assert all(r["grad_norm_A"] >= 0 and r["grad_norm_B"] > 0 for r in steps)
    assert steps[0]["grad_norm_A"] == 0.0  # B = 0 at w = 0: the loss cannot feel A yet
    if mode == "learned":
        assert set(steps[-1]["gamma"]) == {"transformer.h.0", "transformer.h.1", "head"}
        assert steps[-1]["gamma"] != steps[0]["gamma"]


def test_adapter_file_rebuilds_from_the_seed_in_a_new_process(char_data, tmp_path):
    out = tmp_path / "run"
    train.train(
        run_args(
            char_data,
            out,
            adapter="sublora",
            intrinsic_dim=200,
            allocation_mode="learned",
            max_iters=10,
            eval_interval=10,
            learning_rate=2e-2,
        ),
        environ={},
    )
    blob = read_adapter_file(str(out / "adapter.safetensors"))
    assert set(blob["state"]) == {"w", "gate_logits"}  # θ₀, P and the base are not stored
    idx = torch.randint(0, 65, (2, 32), generator=torch.Generator().manual_seed(0))
    torch.save(idx, tmp_path / "idx.pt")
    path = str(out / "adapter.safetensors")
    script = (
        "import sys, torch; from checkpoint import base_from_seed, load_adapter, read_adapter_file; "
        f"blob = read_adapter_file({path!r}); model = load_adapter(base_from_seed(blob), {path!r}).eval(); "
        f"idx = torch.load({str(tmp_path / 'idx.pt')!r}); torch.save(model(idx, idx)[0], {str(tmp_path / 'out.pt')!r})"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = build_model(load_checkpoint(str(out))).eval()
    assert torch.equal(torch.load(tmp_path / "out.pt"), model(idx, idx)[0])


def test_sweep_table_is_the_mean_over_seeds_with_the_best_of_each_dimension_in_bold():
    import sweep

    def run(d, mode, ratio, seed, loss):
        return dict(intrinsic_dim=d, allocation_mode=mode, allocation_ratio=ratio, seed=seed, val_loss=loss)

    summary = [
        run(1000, "uniform", 0.5, 0, 3.0),
        run(1000, "uniform", 0.5, 1, 3.2),
        run(1000, "fixed", 0.2, 0, 2.9),
        run(1000, "fixed", 0.2, 1, 3.0),
        run(2000, "uniform", 0.5, 0, 2.7),
        run(2000, "uniform", 0.5, 1, 2.8),
        run(2000, "fixed", 0.2, 0, 2.8),
        run(2000, "fixed", 0.2, 1, 2.9),
    ]
    assert sweep.mean_table(summary).splitlines() == [
        "| d | uniform | fixed:0.2 | seeds |",
        "| --- | --- | --- | --- |",
        "| 1000 | 3.100 | **2.950** | 2 |",
        "| 2000 | **2.750** | 2.850 | 2 |",
    ]
