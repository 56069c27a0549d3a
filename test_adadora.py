"""
AdaLoRA / AdaDoRA / DoRA: SVD-form layer, DoRA magnitude, rank allocator, orthogonality regulariser,
slicing, and train.py's loop order.

    python -m pytest -q test_adadora.py
"""

import copy
import os

import pytest
import torch
import torch.nn as nn

import plots
import train
from adapters import (
    AdaLoRALinear,
    AdapterError,
    LoRALinear,
    RankAllocator,
    adapter_layers,
    adapter_state_dict,
    effective_ranks,
    family_of,
    inject_adapters,
    merge_adapters,
    orthogonal_regularization,
)
from checkpoint import build_model, load_adapter, load_checkpoint, read_adapter_file
from conftest import logits, run_args, tiny_model, tokens


def trained_layer(cls, seed=0, **kw):
    """A layer with non-trivial A, B, E and magnitude (as after some training)."""
    torch.manual_seed(seed)
    layer = cls(nn.Linear(12, 9), rank=4, alpha=8.0, use_dora=True, **kw)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p.copy_(torch.randn_like(p) * 0.3)
        if isinstance(layer, AdaLoRALinear):
            layer.lora_E.copy_(torch.randn(4))
        layer.magnitude.mul_(1 + 0.1 * torch.randn(9))
    return layer


@pytest.mark.parametrize("kind", ["adalora", "adadora", "dora"])
@pytest.mark.parametrize("model_type", ["gpt", "bigram"])
def test_identity_at_init(kind, model_type):
    base = tiny_model(model_type)
    model = copy.deepcopy(base)
    inject_adapters(model, kind, rank=4)
    idx = tokens()
    assert torch.allclose(logits(model, idx), logits(base, idx), atol=1e-5)
    for layer in adapter_layers(model).values():
        if kind != "dora":
            assert torch.equal(layer.lora_E, torch.zeros(4))  # E = 0 (peft#1798 drew it randomly)
            assert layer.lora_A.std().item() == pytest.approx(0.02, rel=0.3)
        if kind != "adalora":
            assert torch.allclose(layer.magnitude, layer.base.weight.norm(dim=1))  # m = ‖W‖ per row
        else:
            assert layer.magnitude is None


@pytest.mark.parametrize("cls", [LoRALinear, AdaLoRALinear])
def test_dora_forward_equals_dense_formula(cls):
    layer = trained_layer(cls)
    x = torch.randn(5, 12)
    W, b = layer.base.weight, layer.base.bias
    if cls is AdaLoRALinear:  # ΔW = B diag(E) A · alpha / ranknum, written out independently
        delta = layer.lora_B @ torch.diag(layer.lora_E) @ layer.lora_A * (8.0 / 4)
    else:
        delta = layer.lora_B @ layer.lora_A * (8.0 / 4)
    V = W + delta
    expected = (layer.magnitude / V.norm(dim=1))[None, :] * (x @ V.T) + b  # (m/‖W+ΔW‖) ⊙ (W+ΔW) x + b
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.allclose(layer.weight_norm(), V.norm(dim=1), atol=1e-5)  # the norm without forming V


@pytest.mark.parametrize("cls", [LoRALinear, AdaLoRALinear])
def test_detached_norm_receives_no_gradient(cls):
    layer = trained_layer(cls)
    x = torch.randn(5, 12)
    layer(x).pow(2).sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}

    def dense_grads(detach):
        ref = copy.deepcopy(layer)
        ref.zero_grad()
        B, A, s = ref.factors()
        V = ref.base.weight + s * B @ A
        norm = V.norm(dim=1)
        y = (ref.magnitude / (norm.detach() if detach else norm))[None, :] * (x @ V.T) + ref.base.bias
        y.pow(2).sum().backward()
        return {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}

    detached, through = dense_grads(True), dense_grads(False)
    for n in got:
        assert torch.allclose(got[n], detached[n], atol=1e-5), n
    assert not torch.allclose(got["lora_A"], through["lora_A"], atol=1e-5)  # a norm with gradient differs


@pytest.mark.parametrize("cls", [LoRALinear, AdaLoRALinear])
def test_merged_equals_unmerged_and_unmerge_restores(cls):
    layer = trained_layer(cls)
    W0 = layer.base.weight.detach().clone()
    x = torch.randn(5, 12)
    before = layer(x)
    layer.merge()
    layer.merge()
    assert torch.allclose(layer(x), before, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(layer.base.weight, W0, atol=1e-6)
    assert torch.allclose(layer(x), before, atol=1e-5)


@pytest.mark.parametrize("kind", ["adadora", "dora"])
def test_merge_adapters_on_a_model(kind):
    model = tiny_model("gpt")
    inject_adapters(model, kind, rank=4)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in layer.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
    idx = tokens()
    before = logits(model, idx)
    merge_adapters(model)
    assert not adapter_layers(model)
    assert torch.allclose(logits(model, idx), before, atol=1e-5)


def test_budget_follows_the_cubic_schedule():
    model = tiny_model("gpt")
    n = len(inject_adapters(model, "adalora", rank=6))
    alloc = RankAllocator(model, target_r=2, total_step=100, tinit=10, tfinal=20, deltaT=5)
    init, target = 6 * n, 2 * n
    for step in (0, 10, 11, 25, 40, 55, 79, 80, 81, 100):
        budget, mask = alloc.budget(step)
        if step <= 10:
            assert (budget, mask) == (init, False)
        elif step >= 80:
            assert (budget, mask) == (target, True)
        else:  # b(t) = target + (init - target) (1 - (t - tinit) / (T - tfinal - tinit))^3
            assert budget == int(target + (init - target) * (1 - (step - 10) / 70) ** 3)
            assert mask == (step % 5 == 0)


def test_importance_scores_by_hand():
    torch.manual_seed(0)
    layer = AdaLoRALinear(nn.Linear(3, 2), rank=2)
    model = nn.Sequential(layer)
    alloc = RankAllocator(model, target_r=1, total_step=10, beta1=0.5, beta2=0.75)
    values = {
        "lora_A": [[1.0, -2.0, 0.5], [0.0, 1.0, 2.0]],
        "lora_B": [[1.0, 2.0], [-1.0, 0.5]],
        "lora_E": [0.5, -1.0],
    }
    grads = [
        {
            "lora_A": [[0.5, 0.5, 2.0], [1.0, -1.0, 0.25]],
            "lora_B": [[2.0, 0.0], [1.0, 4.0]],
            "lora_E": [2.0, 1.0],
        },
        {
            "lora_A": [[1.0, 0.25, 0.0], [2.0, 1.0, -1.0]],
            "lora_B": [[0.0, 1.0], [3.0, 1.0]],
            "lora_E": [-4.0, 0.5],
        },
    ]
    with torch.no_grad():
        for k, v in values.items():
            getattr(layer, k).copy_(torch.tensor(v))
    for g in grads:
        for k, v in g.items():
            getattr(layer, k).grad = torch.tensor(v)
        alloc.update_importance()
    # by hand for E: I1 = |p g1| = [1, 1], I2 = [2, 0.5]
    # Ī1 = 0.5 I1 = [0.5, 0.5];  Ū1 = 0.25 |I1 - Ī1| = [0.125, 0.125]
    # Ī2 = 0.5 Ī1 + 0.5 I2 = [1.25, 0.5];  Ū2 = 0.75 Ū1 + 0.25 |I2 - Ī2| = [0.28125, 0.09375]
    assert torch.allclose(alloc.sensitivity["0.lora_E"], torch.tensor([1.25, 0.5]))
    assert torch.allclose(alloc.uncertainty["0.lora_E"], torch.tensor([0.28125, 0.09375]))

    def by_hand(p, gs):
        s, u = torch.zeros_like(p), torch.zeros_like(p)
        for g in gs:
            ipt = (p * g).abs()
            s = 0.5 * s + 0.5 * ipt
            u = 0.75 * u + 0.25 * (ipt - s).abs()
        return s * u

    score = {k: by_hand(torch.tensor(values[k]), [torch.tensor(g[k]) for g in grads]) for k in values}
    expected = score["lora_E"] + score["lora_A"].mean(1) + score["lora_B"].mean(0)
    assert torch.allclose(alloc.rank_scores()["0"], expected)


def test_final_budget_is_exact_and_stays():
    model = tiny_model("gpt")
    n = len(inject_adapters(model, "adadora", rank=4))
    alloc = RankAllocator(model, target_r=2, total_step=16, tinit=2, tfinal=6, deltaT=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(16):
        idx = tokens(seed=step)
        (model(idx, idx)[1] + 0.1 * orthogonal_regularization(model)).backward()
        opt.step()
        alloc.update_and_allocate(step)
        opt.zero_grad()
        ranks = effective_ranks(model)
        if step >= 16 - 6:
            assert sum(ranks.values()) == 2 * n, step
            assert alloc.final_mask is not None
            assert ranks == {k: int(v.sum()) for k, v in alloc.final_mask.items()}
        elif step < 2:
            assert sum(ranks.values()) == 4 * n  # all E moved off zero, nothing masked yet


def test_loop_order_in_train(char_data, tmp_path, monkeypatch):
    """train.py calls the allocator after optimizer.step() and before zero_grad(), every step."""
    calls = []
    for cls, name in (
        (torch.optim.AdamW, "step"),
        (torch.optim.AdamW, "zero_grad"),
        (RankAllocator, "update_and_allocate"),
    ):
        original = getattr(cls, name)

        def spy(self, *a, _name=name, _original=original, **kw):
            calls.append(_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(cls, name, spy)
    train.train(
        run_args(
            char_data,
            tmp_path,
            adapter="adalora",
            lora_rank=4,
            adalora_target_r=2,
            max_iters=4,
            eval_interval=4,
        ),
        environ={},
    )
    # AdamW.step may call zero_grad-free helpers; keep only the three names, drop an initial zero_grad
    seq = [c for c in calls if c in ("step", "update_and_allocate", "zero_grad")]
    # ... and once more after the last step: finalize() builds the final mask at total_step - tfinal
    assert seq == ["step", "update_and_allocate", "zero_grad"] * 4 + ["update_and_allocate"]


@pytest.mark.parametrize("tfinal", [0, 3])
def test_the_final_allocation_is_what_is_saved_whatever_tfinal(char_data, tmp_path, tfinal):
    """tfinal = 0 (the default) once saved every rank: E regrew between masks and the final mask was
    never built (total_step - tfinal is one past the last step)."""
    out = tmp_path / "ada"
    train.train(
        run_args(
            char_data,
            out,
            adapter="adalora",
            lora_rank=4,
            adalora_target_r=2,
            adalora_tfinal=tfinal,
            adalora_deltaT=3,
            max_iters=10,
            eval_interval=10,
        ),
        environ={},
    )
    model = build_model(load_checkpoint(str(out)))
    n = len(adapter_layers(model))
    assert sum(effective_ranks(model).values()) == 2 * n  # the checkpoint holds the target budget
    pruned = read_adapter_file(str(out / "adapter_pruned.safetensors"))
    assert sum(r["rank"] for r in pruned["adapter"]["layers"].values()) == 2 * n
    assert sum(v.shape[0] for k, v in pruned["state"].items() if k.endswith("lora_A")) == 2 * n


def test_importance_is_not_updated_at_the_final_step():
    """peft and the AdaLoRA code update the importance only while step < total_step - tfinal; the final
    mask comes from the scores as they were."""
    model = tiny_model("gpt")
    inject_adapters(model, "adalora", rank=4)
    alloc = RankAllocator(model, target_r=2, total_step=6, tfinal=2, deltaT=1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    idx = tokens()
    for step in range(5):
        model.zero_grad()
        model(idx, idx)[1].backward()
        opt.step()
        before = {k: v.clone() for k, v in alloc.sensitivity.items()}
        alloc.update_and_allocate(step)
        changed = before.keys() != alloc.sensitivity.keys() or any(
            not torch.equal(before[k], alloc.sensitivity[k]) for k in before
        )
        assert changed == (step < 4), step  # step 4 = total_step - tfinal
    assert alloc.final_mask is not None


def test_orthogonal_regularization_by_hand():
    model = tiny_model("gpt")
    inject_adapters(model, "adalora", rank=3, targets=["lm_head", "transformer.h.0.attn.c_proj"])
    terms = []
    for layer in adapter_layers(model).values():
        A, B = layer.lora_A, layer.lora_B
        terms += [((A @ A.T - torch.eye(3)) ** 2).sum().sqrt(), ((B.T @ B - torch.eye(3)) ** 2).sum().sqrt()]
    assert torch.allclose(orthogonal_regularization(model), sum(terms) / 4)


def test_prune_keeps_outputs_and_loads_back(tmp_path):
    """The family's finish: every AdaDoRA layer becomes the DoRA of its ranks with E != 0 (a layer with
    none keeps a zero rank-1 branch: its magnitude still rescales W), the same logits, fewer numbers,
    and the entry it writes loads back onto a fresh base with those logits."""
    model = tiny_model("gpt")
    names = inject_adapters(model, "adadora", rank=4)
    with torch.no_grad():
        for i, layer in enumerate(adapter_layers(model).values()):
            layer.lora_E.copy_(torch.randn(4))
            layer.lora_E[: i % 5] = 0.0  # layer i keeps 4 - (i % 5) ranks (0 when i % 5 == 4)
            layer.magnitude.mul_(1.1)
    idx = tokens()
    before = logits(model, idx)
    full = sum(v.numel() for v in adapter_state_dict(model).values())
    info = dict(
        kind="adadora", targets=names, settings=dict(rank=4, alpha=16.0, dropout=0.0), train_embeddings=False
    )
    entry, state = family_of("adadora")({"adalora_prune": True}, say=lambda *a: None).finish(model, info)
    layers = adapter_layers(model)
    assert [m.rank for m in layers.values()] == [max(1, 4 - (i % 5)) for i in range(len(layers))]
    assert all(type(m) is LoRALinear and m.magnitude is not None for m in layers.values())
    assert entry["kind"] == "dora" and entry["targets"] == names
    assert torch.allclose(logits(model, idx), before, atol=1e-5)
    assert sum(v.numel() for v in state.values()) < full
    torch.save({"format": "lowrank-gpt/1", "state": state, "adapter": entry}, tmp_path / "pruned.pt")
    fresh = tiny_model("gpt")
    load_adapter(fresh, str(tmp_path / "pruned.pt"))
    assert torch.allclose(logits(fresh, idx), before, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_r=8, total_step=100), "target_r must be in 1..init rank 4"),
        (dict(target_r=2, total_step=100, tinit=60, tfinal=40), "tinit < total_step - tfinal"),
    ],
)
def test_bad_allocator_settings(kwargs, message):
    model = tiny_model("gpt")
    inject_adapters(model, "adalora", rank=4)
    with pytest.raises(AdapterError, match=message):
        RankAllocator(model, **kwargs)
    with pytest.raises(AdapterError, match="needs AdaLoRA layers"):
        RankAllocator(tiny_model("gpt"), target_r=1, total_step=10)


def test_train_adadora_end_to_end(char_data, tmp_path):
    out = tmp_path / "adadora"
    train.train(
        run_args(
            char_data,
            out,
            adapter="adadora",
            lora_rank=4,
            adalora_target_r=2,
            adalora_tinit=4,
            adalora_tfinal=8,
            adalora_deltaT=2,
            max_iters=20,
            eval_interval=20,
        ),
        environ={},
    )
    ckpt = load_checkpoint(str(out))
    model = build_model(ckpt)
    n = len(adapter_layers(model))
    assert sum(effective_ranks(model).values()) == 2 * n
    rows = [r for r in plots.read_metrics(str(out)) if r["train_loss"] is not None]
    assert [r["rank_budget"] for r in rows[:5]] == [4 * n] * 5  # tinit
    assert all(r["rank_budget"] == 2 * n and sum(r["effective_rank"].values()) == 2 * n for r in rows[12:])
    assert all(r["extra_loss"] > 0 for r in rows)
    v = [r["val_loss"] for r in plots.read_metrics(str(out)) if r["val_loss"] is not None]
    assert v[-1] < v[0]
    assert os.path.isfile(out / "rank_allocation.png") and os.path.isfile(out / "effective_rank.png")
    # the sliced adapter: smaller, and the base plus it gives the trained model's logits
    assert os.path.getsize(out / "adapter_pruned.safetensors") < os.path.getsize(out / "adapter.safetensors")
    base = tiny_base_from(ckpt)
    load_adapter(base, str(out / "adapter_pruned.safetensors"))
    idx = torch.randint(0, 65, (2, 32))
    assert torch.allclose(logits(base, idx), logits(model, idx), atol=1e-5)


def tiny_base_from(ckpt):
    """The checkpoint's frozen base model, without its adapters."""
    from model import MODELS, GPTConfig

    base = MODELS[ckpt["model_type"]](GPTConfig(**ckpt["model_args"]))
    keep = {
        k.replace(".base.", "."): v
        for k, v in ckpt["model"].items()
        if ".lora_" not in k and not k.endswith((".gate", ".magnitude"))
    }
    base.load_state_dict(keep)
    return base


def test_cached_base_norms_follow_a_weight_change():
    layer = trained_layer(LoRALinear)
    layer(torch.randn(2, 12))  # fills the cache of ‖W_i‖²
    with torch.no_grad():
        layer.base.weight.mul_(2.0)  # e.g. load_state_dict copying new base weights in place
    V = layer.base.weight + layer.delta_weight()
    assert torch.allclose(layer.weight_norm(), V.norm(dim=1), atol=1e-5)
