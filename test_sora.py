"""
SoRA: gated LoRA, the proximal gate optimizer, the λ schedule, prune and merge, and train.py with
--adapter=sora end to end.

    python -m pytest -q test_sora.py
"""

import copy
import math
import os

import pytest
import torch
import torch.nn as nn

import plots
import train
from adapters import (
    AdapterError,
    LoRALinear,
    SoRALinear,
    SoRAOptimizer,
    adapter_layers,
    adapter_state_dict,
    build_sora_optimizers,
    count_params,
    effective_ranks,
    inject_adapters,
    lambda_schedule,
    merge_adapters,
    split_sora_params,
    to_lora,
)
from checkpoint import build_model, load_adapter, load_checkpoint, read_adapter_file
from configurator import ConfigError
from conftest import logits, run_args, tiny_model, tokens
from model import GPT, GPTConfig


def randomise(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def test_forward_closed_form_and_identity_at_init():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    layer = SoRALinear(copy.deepcopy(base), rank=4, alpha=8.0)
    x = torch.randn(3, 10)
    assert torch.equal(layer(x), base(x))  # B = 0
    with torch.no_grad():
        layer.lora_B.normal_()
    A, B, g = layer.lora_A, layer.lora_B, layer.gate
    expected = base(x) + 2.0 * ((x @ A.T) * g) @ B.T
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.allclose(layer.delta_weight(), 2.0 * B @ torch.diag(g) @ A, atol=1e-6)
    assert torch.equal(SoRALinear(nn.Linear(10, 6), rank=3, gate_init="ones").gate, torch.ones(3))


@pytest.mark.parametrize("model_type", ["gpt", "bigram"])
def test_model_identity_at_init_and_merge_keeps_outputs(model_type):
    base = tiny_model(model_type)
    model = copy.deepcopy(base)
    inject_adapters(model, "sora", rank=4)
    idx = tokens()
    assert torch.equal(logits(model, idx), logits(base, idx))
    randomise(model)
    before = logits(model, idx)
    merge_adapters(model)
    assert not adapter_layers(model)
    assert torch.allclose(logits(model, idx), before, atol=1e-5)


def test_soft_threshold_on_hand_computed_numbers():
    # zero gradients leave Adam's update at exactly 0, so only the proximal step acts:
    # threshold = λ · lr = 2 · 0.1 = 0.2
    g = nn.Parameter(torch.tensor([0.5, -0.5, 0.1, -0.15, 0.2, -0.2, 0.0, 1.0]))
    opt = SoRAOptimizer([g], lr=0.1, sparse_lambda=2.0)
    g.grad = torch.zeros_like(g)
    opt.step()
    expected = torch.tensor([0.3, -0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.8])
    assert torch.allclose(g.detach(), expected, atol=1e-7)
    assert (g[2:7] == 0).all()  # inside ±λ·lr: exactly zero


def test_proximal_step_equals_adamw_then_threshold():
    torch.manual_seed(0)
    g = nn.Parameter(torch.randn(16))
    ref = nn.Parameter(g.detach().clone())
    opt = SoRAOptimizer([g], lr=0.05, sparse_lambda=3.0, betas=(0.9, 0.99))
    adam = torch.optim.AdamW([ref], lr=0.05, betas=(0.9, 0.99), weight_decay=0.0)
    for step in range(3):
        grad = torch.randn(16)
        g.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        adam.step()
        with torch.no_grad():  # the proximal operator of 3·‖·‖₁ with step 0.05, by hand
            ref.copy_(torch.where(ref.abs() <= 0.15, torch.zeros_like(ref), ref - 0.15 * torch.sign(ref)))
    assert torch.allclose(g, ref, atol=1e-6)
    assert (g == 0).any()


def test_hold_zeros_keeps_zero_gates_and_steps_the_rest_as_plain_adamw():
    """The tuning phase: a gate at exactly zero stays there (its gradient is not zero), every other gate
    follows torch's AdamW without weight decay, and nothing is thresholded even with λ > 0 left over."""
    torch.manual_seed(1)
    g = nn.Parameter(torch.randn(12))
    with torch.no_grad():
        g[[2, 5, 9]] = 0.0
    ref = nn.Parameter(g.detach().clone())
    opt = SoRAOptimizer([g], lr=0.05, sparse_lambda=0.0, betas=(0.9, 0.99))
    opt.set_lambda(0.0, hold_zeros=True)
    adam = torch.optim.AdamW([ref], lr=0.05, betas=(0.9, 0.99), weight_decay=0.0)
    for step in range(4):
        grad = torch.randn(12) + 1.0
        g.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        adam.step()
    zero = torch.zeros(12, dtype=torch.bool)
    zero[[2, 5, 9]] = True
    assert torch.equal(g[zero], torch.zeros(3))
    assert torch.allclose(g[~zero], ref[~zero], atol=1e-7) and (ref[zero] != 0).all()


def test_gates_get_no_weight_decay():
    model = tiny_model("gpt")
    inject_adapters(model, "sora", rank=4)
    gates, others = split_sora_params(model)
    assert len(gates) == len(adapter_layers(model)) and all(p.dim() == 1 for p in gates)
    assert len(others) == 2 * len(gates)
    gate_opt, regular = build_sora_optimizers(model, lr=1e-2, weight_decay=0.3, sparse_lambda=0.0)
    assert [grp["weight_decay"] for grp in gate_opt.param_groups] == [0.0]
    assert [grp["weight_decay"] for grp in regular.param_groups] == [0.3]
    gate_opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "weight_decay": 0.5})
    assert gate_opt.param_groups[-1]["weight_decay"] == 0.0
    # behaviour, not just the setting: zero gradient and λ = 0 leave the gates exactly as they were
    before = [p.detach().clone() for p in gates]
    for p in gates:
        p.grad = torch.zeros_like(p)
    gate_opt.step()
    assert all(torch.equal(p, b) for p, b in zip(gates, before))


def test_large_lambda_drives_every_gate_to_exactly_zero():
    model = tiny_model("gpt")
    inject_adapters(model, "sora", rank=4)
    gate_opt, regular = build_sora_optimizers(model, lr=1e-2, sparse_lambda=100.0)
    model.train()
    for step in range(3):  # λ·lr = 1 per step: more than any randn gate survives in 3 steps
        idx = tokens(seed=step)
        model(idx, idx)[1].backward()
        gate_opt.step(), regular.step()
        gate_opt.zero_grad(), regular.zero_grad()
    assert all(r == 0 for r in effective_ranks(model).values())
    assert all(torch.equal(m.gate, torch.zeros(4)) for m in adapter_layers(model).values())


def test_rebalance_keeps_logits_and_leaves_unit_gates():
    model = tiny_model("gpt")
    inject_adapters(model, "sora", rank=4)
    randomise(model)
    with torch.no_grad():
        for i, layer in enumerate(adapter_layers(model).values()):
            layer.gate[i % 4] = 0.0
    idx = tokens()
    before = logits(model, idx)
    products = {n: (m.lora_B * m.gate).clone() for n, m in adapter_layers(model).items()}
    for layer in adapter_layers(model).values():
        layer.rebalance()
    assert torch.allclose(logits(model, idx), before, atol=1e-6)
    for n, m in adapter_layers(model).items():
        assert torch.allclose(m.lora_B * m.gate, products[n], atol=1e-7)
        assert set(m.gate.abs().tolist()) == {0.0, 1.0} and int((m.gate == 0).sum()) == 1
    twice = {n: m.lora_B.clone() for n, m in adapter_layers(model).items()}
    for layer in adapter_layers(model).values():  # idempotent: a resumed run may call it again
        layer.rebalance()
    assert all(torch.equal(m.lora_B, twice[n]) for n, m in adapter_layers(model).items())


def test_prune_keeps_logits_and_shrinks_by_the_pruned_ranks():
    model = tiny_model("gpt")
    inject_adapters(model, "sora", rank=4)
    randomise(model)
    layers = adapter_layers(model)
    with torch.no_grad():  # a known pattern of zero gates: layer i keeps 4 - (i % 5) ranks
        for i, layer in enumerate(layers.values()):
            layer.gate[: i % 5] = 0.0
    idx = tokens()
    before = logits(model, idx)
    trainable_before = count_params(model)[0]
    shapes = {n: (m.in_features + m.out_features, m.rank) for n, m in layers.items()}
    kept = {n: getattr(m, "rank", 0) for n, m in to_lora(model).items()}  # a base Linear: 0
    assert kept == {n: 4 - (i % 5) if i % 5 < 4 else 0 for i, n in enumerate(layers)}
    assert torch.allclose(logits(model, idx), before, atol=1e-5)
    # each layer loses its pruned ranks' rows of A and columns of B; its gate is baked into B
    pruned = sum((r - kept[n]) * width for n, (width, r) in shapes.items())
    gates = sum(r for _, r in shapes.values())
    assert count_params(model)[0] == trainable_before - pruned - gates
    new = adapter_layers(model)
    assert all(type(m) is LoRALinear and m.rank == kept[n] for n, m in new.items())
    assert set(new) == {n for n, r in kept.items() if r}  # all-zero layers are their base Linear again


@pytest.mark.parametrize("spacing", ["linear", "log_linear", "exp_linear"])
def test_lambda_schedule(spacing):
    values = lambda_schedule(0.5, 5.0, 4, spacing)
    assert len(values) == 4 and values[0] == pytest.approx(0.5) and values[-1] == pytest.approx(5.0)
    if spacing == "linear":
        assert values == pytest.approx([0.5, 2.0, 3.5, 5.0])
    elif spacing == "log_linear":  # evenly spaced in exp(λ)
        exps = [math.exp(v) for v in values]
        assert exps[1] - exps[0] == pytest.approx(exps[3] - exps[2])
    else:  # evenly spaced in log λ: a constant ratio
        assert values[1] / values[0] == pytest.approx(values[3] / values[2]) == pytest.approx(10 ** (1 / 3))


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: SoRAOptimizer([nn.Parameter(torch.ones(2))], sparse_lambda=-1.0),
            "sparse_lambda must be >= 0",
        ),
        (lambda: inject_adapters(tiny_model("gpt"), "sora", rank=0), "positive int"),
        (
            lambda: inject_adapters(tiny_model("gpt"), "sora", targets=["transformer.h.0.attn.c_prj"]),
            "matches no module",
        ),
        (lambda: inject_adapters(tiny_model("gpt"), "sora", targets=["ln_f"]), "not nn.Linear"),
        (lambda: inject_adapters(tiny_model("gpt"), "sora", gate_init="zeros"), "gate_init"),
        (lambda: lambda_schedule(0.0, 1.0, 3, "exp_linear"), "start λ > 0"),
        (lambda: build_sora_optimizers(tiny_model("gpt")), "no trainable SoRA gates"),
    ],
)
def test_bad_input(make, message):
    with pytest.raises(AdapterError, match=message):
        make()


def test_explicit_module_names():
    model = tiny_model("gpt")
    names = inject_adapters(model, "sora", targets=["transformer.h.0.attn.c_proj", "lm_head"], rank=2)
    assert names == ["transformer.h.0.attn.c_proj", "lm_head"]
    assert set(effective_ranks(model)) == set(names)


def test_train_sora_end_to_end(char_data, tmp_path):
    """Both optimizers step on their schedules, ranks are logged, and the pruned adapter is smaller and
    reproduces the trained model."""
    out = tmp_path / "sora"
    train.train(
        run_args(
            char_data,
            out,
            adapter="sora",
            lora_rank=4,
            sora_lambda=2.0,
            sora_lambda_max=8.0,
            sora_lambda_levels=3,
            sora_lambda_every=10,
            sora_gate_lr=5e-3,
            max_iters=30,
            eval_interval=30,
            learning_rate=3e-3,
            weight_decay=0.1,
            lr_decay_iters=30,
        ),
        environ={},
    )
    ckpt = load_checkpoint(str(out))
    model = build_model(ckpt)
    ranks = effective_ranks(model)
    assert 0 < sum(ranks.values()) < 4 * len(ranks)  # some gates switched off, not all
    rows = [r for r in plots.read_metrics(str(out)) if r["train_loss"] is not None]
    last = rows[-1]
    assert last["effective_rank"] == ranks  # logged ranks are the model's (the step at 29 is the last)
    final = plots.rank_rows(str(out))[-1]  # what the rank plots show as the end: the state pruning sees
    assert final["iter"] == 30 and final["effective_rank"] == ranks
    layers = adapter_layers(model)
    assert last["adapter_params_remaining"] == sum(
        r * (layers[n].in_features + layers[n].out_features + 1) for n, r in ranks.items()
    )
    assert [r["sora_lambda"] for r in rows if r["iter"] in (0, 10, 29)] == pytest.approx([2.0, 5.0, 8.0])
    # the gate optimizer ran on its own peak learning rate, the rest on learning_rate, same schedule
    c = ckpt["config"]
    ratio = train.get_lr(30, c) / c["learning_rate"]  # the schedule is set before the final save at 30
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(3e-3 * ratio)
    assert ckpt["extra_optimizers"][0]["param_groups"][0]["lr"] == pytest.approx(5e-3 * ratio)
    assert ckpt["extra_optimizers"][0]["param_groups"][0]["weight_decay"] == 0.0
    assert os.path.isfile(out / "effective_rank.png")

    # adapter_pruned.safetensors: smaller, a plain LoRA, and the same logits as the trained gated model
    assert os.path.getsize(out / "adapter_pruned.safetensors") < os.path.getsize(out / "adapter.safetensors")
    base = GPT(GPTConfig(**ckpt["model_args"]))
    base.load_state_dict(
        {
            k.replace(".base.", "."): v
            for k, v in ckpt["model"].items()
            if ".lora_" not in k and not k.endswith(".gate")
        }
    )
    load_adapter(base, str(out / "adapter_pruned.safetensors"))
    assert read_adapter_file(str(out / "adapter_pruned.safetensors"))["adapter"]["kind"] == "lora"
    assert {n: m.rank for n, m in adapter_layers(base).items()} == {n: r for n, r in ranks.items() if r}
    idx = torch.randint(0, 65, (2, 32))
    assert torch.allclose(logits(base, idx), logits(model, idx), atol=1e-5)
    assert sum(v.numel() for v in adapter_state_dict(base).values()) < sum(
        v.numel() for v in adapter_state_dict(model).values()
    )


def test_train_sora_tuning_phase_keeps_the_pruned_set(char_data, tmp_path):
    """sora_tune_iters: λ is 0 for the last iterations, the ranks pruned when it starts stay pruned, the
    kept gates still move, and the result differs from the run without the phase."""
    args = dict(
        adapter="sora",
        lora_rank=4,
        sora_lambda=4.0,
        sora_lambda_max=12.0,
        sora_lambda_levels=2,
        sora_lambda_every=10,
        max_iters=30,
        eval_interval=10,
        log_interval=1,
        learning_rate=3e-3,
        lr_decay_iters=30,
    )
    train.train(run_args(char_data, tmp_path / "tuned", **args, sora_tune_iters=10), environ={})
    train.train(run_args(char_data, tmp_path / "plain", **args), environ={})
    rows = {r["iter"]: r for r in plots.read_metrics(str(tmp_path / "tuned")) if r["train_loss"] is not None}
    plain = {r["iter"]: r for r in plots.read_metrics(str(tmp_path / "plain")) if r["train_loss"] is not None}
    assert [rows[i]["sora_lambda"] for i in (0, 10, 19, 20, 29)] == pytest.approx([4.0, 12.0, 12.0, 0.0, 0.0])
    assert rows[19]["train_loss"] == pytest.approx(
        plain[19]["train_loss"], abs=1e-6
    )  # the same run until then
    at_start = rows[20]["effective_rank"]  # logged after iteration 20's step: the set the phase holds
    assert 0 < sum(at_start.values()) < 4 * len(at_start)
    assert all(rows[i]["effective_rank"] == at_start for i in range(20, 30))
    final = effective_ranks(build_model(load_checkpoint(str(tmp_path / "tuned"))))
    assert final == at_start and sum(final.values()) >= sum(plain[29]["effective_rank"].values())
    assert rows[29]["train_loss"] != plain[29]["train_loss"]
    with pytest.raises(ConfigError, match="sora_tune_iters 30 leaves no iteration to sparsify"):
        train.train(run_args(char_data, tmp_path / "bad", **args, sora_tune_iters=30), environ={})


def test_train_rejects_negative_lambda(char_data, tmp_path):
    with pytest.raises(
        ConfigError, match=r"sora_lambda must be in \[0, inf\), got -0.5"
    ):  # the key the user typed
        train.train(run_args(char_data, tmp_path, adapter="sora", sora_lambda=-0.5), environ={})


def test_a_shorter_max_iters_scales_the_tuning_phase(tmp_path, capsys):
    """--max_iters on a SoRA config keeps the phase's share of the run (sora_tune_iters, like
    sora_lambda_every), unless the command line sets it."""
    cfg = tmp_path / "sora.py"
    cfg.write_text("adapter = 'sora'\nmax_iters = 300\nsora_lambda_every = 38\nsora_tune_iters = 150\n")
    for argv, want in (
        ([str(cfg), "--max_iters=30"], (4, 15)),
        ([str(cfg), "--max_iters=30", "--sora_tune_iters=5"], (4, 5)),
    ):
        c = train.configure(train.DEFAULTS, argv, {}, train.TEST_MODE)
        train.follow_max_iters(c, train.DEFAULTS, argv, {}, {})
        assert (c["sora_lambda_every"], c["sora_tune_iters"]) == want
    assert "sora_tune_iters 150 -> 15" in capsys.readouterr().out
