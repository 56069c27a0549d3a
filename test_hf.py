"""
Hugging Face interop against the real libraries: GPT-2 logits equal transformers' GPT2LMHeadModel,
every adapter family exported to PEFT gives the same logits under PeftModel (and comes back through
import), PEFT LoRA / DoRA adapters import, fp64 merges match PEFT's, AdaLoRA's masks match PEFT's
RankAllocator over a whole schedule. peft and transformers are test-only requirements.

    python -m pytest -q test_hf.py
"""

import copy
import json
import os
import shutil

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import hf  # noqa: E402
import plots  # noqa: E402
import train  # noqa: E402
from adapters import (  # noqa: E402
    AdaLoRALinear,
    RankAllocator,
    SoRALinear,
    adapter_layers,
    adapter_state_dict,
    count_params,
    find_targets,
    inject_adapters,
    load_adapter_state_dict,
    merge_adapters,
    rank_pattern_layers,
)
from checkpoint import (  # noqa: E402
    FORMAT,
    build_model,
    load_adapter,
    load_checkpoint,
    read_adapter_file,
    save_adapter_file,
)
from conftest import adapted, case_family, case_run_keys, family_cases, run_args  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

V = 65  # the character vocabulary of Tiny Shakespeare, so that a tiny GPT-2 can be trained and evaluated here


def hf_gpt2(folder, seed=0, dtype=torch.float32, **kw):
    """A tiny random GPT-2 of transformers' own (biases and LayerNorms perturbed too), saved to `folder`."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=64,
        vocab_size=kw.pop("vocab_size", V),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        **kw,
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    return GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).eval()


def ids(n=2, t=48, seed=1):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def ours(model, idx):
    with torch.no_grad():
        return model(idx, idx)[0]  # with targets: the logits of every position


def theirs(model, idx):
    with torch.no_grad():
        return model(idx).logits


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny-gpt2"))
    hf_gpt2(folder)
    return folder


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_gpt2_weights_give_transformers_logits(tmp_path, activation):
    """GPT-2's tanh GELU (gelu_new) and the exact one both read from config.json: same logits in fp64."""
    ref = hf_gpt2(str(tmp_path), activation_function=activation, dtype=torch.float64)
    model = GPT.from_pretrained(str(tmp_path)).double().eval()
    idx = ids()
    assert torch.allclose(ours(model, idx), theirs(ref, idx), rtol=0, atol=1e-12)


@pytest.mark.parametrize("bias,gelu", [(True, "tanh"), (False, "none")])
def test_save_pretrained_loads_in_transformers(tmp_path, bias, gelu):
    """A GPT trained here (nanoGPT's exact GELU, no biases) as a GPT-2 folder: the same function there."""
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=V, bias=bias, gelu=gelu)
    ).double()
    model.save_pretrained(str(tmp_path))
    ref = GPT2LMHeadModel.from_pretrained(str(tmp_path), dtype=torch.float64).eval()
    idx = ids()
    assert torch.allclose(ours(model.eval(), idx), theirs(ref, idx), rtol=0, atol=1e-12)
    assert torch.equal(ours(GPT.from_pretrained(str(tmp_path)).double().eval(), idx), ours(model, idx))


def trained(base, case, seed=0):
    """`base` adapted with the family case, every trainable tensor moved away from its init, as training
    would (SoRA with some gates at exactly 0, AdaLoRA with masked ranks and one layer masked whole)."""
    torch.manual_seed(seed)
    _, model, _ = adapted(case, base)
    # the adapters' tensors and SubLoRA's own (a trained embedding reaches PEFT through export_run's base/)
    layers = adapter_layers(model).values()
    moved = [
        p for m in layers for n, p in m.named_parameters() if p.requires_grad and not n.startswith("base.")
    ]
    with torch.no_grad():
        for p in moved + list(model.parameters(recurse=False)):
            p.add_(torch.randn_like(p) * 0.1)
        for i, layer in enumerate(adapter_layers(model).values()):
            if isinstance(layer, SoRALinear):
                layer.gate[i % 3 :: 2] = 0
            if isinstance(layer, AdaLoRALinear):
                layer.lora_E[: 1 + i % 3] = 0
                if i == 1:
                    layer.lora_E.zero_()
    return model.eval()


def test_every_family_exports_to_peft_and_back(gpt2_dir, tmp_path, family_case):
    model = trained(GPT.from_pretrained(gpt2_dir), family_case)
    idx = ids()
    want = ours(model, idx)
    kind = case_run_keys(family_case)["adapter"]
    if any(getattr(layer, "quantized", False) for layer in adapter_layers(model).values()):
        with pytest.raises(hf.InteropError, match="NF4 residual"):  # no LoRA on the base computes it
            hf.lora_factors(model)
        return
    config = hf.export_peft(hf.lora_factors(model), str(tmp_path), gpt2_dir)
    if kind in ("sora", "adalora", "adadora"):
        assert config["rank_pattern"]  # each layer keeps its own number of ranks
    if kind == "pissa":
        assert config["r"] == 8  # P(θ) - P(θ₀): rank 2r
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(gpt2_dir), str(tmp_path)).eval()
    assert torch.allclose(theirs(peft_model, idx), want, rtol=0, atol=1e-5)
    back, info, _ = hf.import_peft(str(tmp_path), base=gpt2_dir)
    assert info["kind"] == ("dora" if config["use_dora"] else "lora")
    assert torch.allclose(ours(back.eval(), idx), want, rtol=0, atol=1e-5)


def test_qv_factors_export_with_zero_rows_for_k(gpt2_dir, tmp_path):
    model = trained(GPT.from_pretrained(gpt2_dir), "lora_qv_rslora_loraplus")
    hf.export_peft(hf.lora_factors(model), str(tmp_path), gpt2_dir)
    from safetensors.torch import load_file

    B = load_file(str(tmp_path / "adapter_model.safetensors"))[
        f"{hf.PREFIX}transformer.h.0.attn.c_attn.lora_B.weight"
    ]
    assert (
        B.shape == (96, 4) and B[32:64].abs().max() == 0 and B[:32].abs().min() > 0 and B[64:].abs().min() > 0
    )


def test_peft_lora_and_dora_adapters_import(gpt2_dir, tmp_path):
    """Adapters made by PEFT itself, with per-layer ranks, alphas and rsLoRA: the same logits here."""
    idx = ids()
    for i, (use_dora, rslora) in enumerate([(False, False), (True, False), (False, True)]):
        torch.manual_seed(i)
        cfg = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["c_attn", "c_proj", "c_fc", "lm_head"],
            use_dora=use_dora,
            use_rslora=rslora,
            rank_pattern={"h.1.mlp.c_fc": 2},
            alpha_pattern={"lm_head": 3.0},
            init_lora_weights=False,
        )  # random A and B: not the identity
        peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(gpt2_dir), cfg).eval()
        folder = tmp_path / f"peft{i}"
        peft_model.save_pretrained(str(folder))
        model, info, _ = hf.import_peft(str(folder), base=gpt2_dir)
        assert info["layers"]["transformer.h.1.mlp.c_fc"]["rank"] == 2
        assert torch.allclose(ours(model.eval(), idx), theirs(peft_model, idx), rtol=0, atol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_pattern_gives_peft_ranks_and_scalings(gpt2_dir, use_rslora):
    """lora_rank_pattern reads as PEFT's rank_pattern: every layer's rank and scaling equal PEFT's for
    the same config, and so does the trainable parameter count."""
    pattern = {"c_fc": 3, "lm_head": 8, "h.1.attn.c_proj": 5}
    cfg = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["c_attn", "c_proj", "c_fc", "lm_head"],
        rank_pattern=pattern,
        use_rslora=use_rslora,
    )
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(gpt2_dir), cfg)
    want = {
        n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.r
    }
    model = GPT.from_pretrained(gpt2_dir)
    names = find_targets(model)
    inject_adapters(
        model,
        "lora",
        names,
        layers=rank_pattern_layers(names, pattern),
        rank=2,
        alpha=4.0,
        use_rslora=use_rslora,
    )
    got = {n: (m.rank, m.scaling) for n, m in adapter_layers(model).items()}
    assert set(got) == set(want) and len({r for r, _ in got.values()}) == 4
    assert all(got[n][0] == want[n][0] and got[n][1] == pytest.approx(want[n][1]) for n in got)
    assert count_params(model)[0] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_fp64_merge_and_dora_norm_match_peft(gpt2_dir, tmp_path):
    """In float64 the DoRA forward and the merged weights agree with PEFT's to fp64 precision (a
    float32 merge or norm is off by ~1e-7)."""
    model = trained(GPT.from_pretrained(gpt2_dir).double(), "dora")
    hf.export_peft(hf.lora_factors(model), str(tmp_path), gpt2_dir)
    peft_model = PeftModel.from_pretrained(
        GPT2LMHeadModel.from_pretrained(gpt2_dir, dtype=torch.float64), str(tmp_path)
    ).eval()
    idx = ids()
    assert torch.allclose(ours(model, idx), theirs(peft_model, idx), rtol=1e-11, atol=1e-11)
    merged, ref = merge_adapters(copy.deepcopy(model)), peft_model.merge_and_unload()
    for name in ("h.0.attn.c_attn", "h.1.mlp.c_fc"):
        w, w_ref = (
            merged.get_submodule(f"transformer.{name}").weight,
            ref.get_submodule(f"transformer.{name}").weight.T,
        )
        assert torch.allclose(w, w_ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_adalora_masks_equal_peft_rank_allocator(gpt2_dir, seed):
    """The same A, B, E and the same gradients at every step of a schedule with tinit, tfinal and
    deltaT > 1: PEFT's RankAllocator and ours mask the same ranks at every step, with the same
    importance (fp64)."""
    total, tinit, tfinal, delta_t = 24, 3, 5, 3
    cfg = AdaLoraConfig(
        init_r=4,
        target_r=2,
        lora_alpha=8,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=delta_t,
        beta1=0.85,
        beta2=0.85,
        total_step=total,
        target_modules=["c_attn", "c_proj", "c_fc"],
    )
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(gpt2_dir, dtype=torch.float64), cfg)
    model = GPT.from_pretrained(gpt2_dir).double()
    inject_adapters(model, "adalora", targets=["c_attn", "c_proj", "c_fc"], rank=4, alpha=8.0)
    allocator = RankAllocator(model, target_r=2, total_step=total, tinit=tinit, tfinal=tfinal, deltaT=delta_t)
    pairs = []
    for name, layer in adapter_layers(model).items():
        for part in ("lora_A", "lora_B", "lora_E"):
            p_ref = peft_model.get_parameter(f"base_model.model.{name}.{part}.default")
            mine = getattr(layer, part)
            with torch.no_grad():
                mine.copy_(p_ref.view_as(mine))
            pairs.append((mine, p_ref))
    gen = torch.Generator().manual_seed(seed)
    for step in range(total + 3):
        for mine, p_ref in pairs:  # one plain gradient step, the same on both sides
            g = torch.randn(p_ref.shape, generator=gen, dtype=torch.float64)
            p_ref.grad, mine.grad = g, g.view_as(mine).clone()
            with torch.no_grad():
                p_ref.sub_(0.1 * g)
                mine.sub_(0.1 * g.view_as(mine))
        allocator.update_and_allocate(step)
        peft_model.base_model.update_and_allocate(step)
        for mine, p_ref in pairs:
            assert torch.equal(mine == 0, p_ref.view_as(mine) == 0), f"step {step}: masks differ"
            assert torch.allclose(mine, p_ref.view_as(mine), rtol=0, atol=1e-12)
        if 0 < step < total - tfinal:  # the importance itself, where PEFT keeps it
            ref = peft_model.base_model.rankallocator
            for name in allocator.layers:
                key = f"{name}.lora_E.default"
                assert torch.allclose(
                    allocator.sensitivity[f"{name}.lora_E"], ref.exp_avg_ipt[key].view(-1), atol=1e-14
                )
                assert torch.allclose(
                    allocator.uncertainty[f"{name}.lora_E"], ref.exp_avg_unc[key].view(-1), atol=1e-14
                )
    assert sum(int((layer.lora_E != 0).sum()) for layer in allocator.layers.values()) == 2 * len(
        allocator.layers
    )


# -----------------------------------------------------------------------------
# the command line: a run trained here -> PEFT -> back, evaluated by train.py


def tiny_run(data_dir, out_dir, **kw):
    """run_args at 6 iterations of a 32-wide model."""
    keys = dict(
        n_embd=32, batch_size=4, eval_interval=6, learning_rate=1e-2, warmup_iters=0, lr_decay_iters=6
    )
    return run_args(data_dir, out_dir, **{**keys, "max_iters": 6, "min_lr": 1e-4, **kw})


def test_command_line_round_trip(char_data, tmp_path, capsys):
    """SoRA on a seeded random base, `python hf.py` exports (base/ written: it was made here), PEFT gives
    the run's logits, `python hf.py --import_from` brings it back as a run, and train.py's evaluation
    and eval_bounds' unquantised loss of the imported run equal the original's."""
    run = tmp_path / "sora"
    train.train(
        tiny_run(char_data, run, adapter="sora", lora_rank=4, init_from="scratch", sora_lambda=0.3),
        environ={},
    )
    export = tmp_path / "export"
    hf.main([f"--out_dir={run}", f"--export_dir={export}"])
    config = json.loads((export / "adapter_config.json").read_text())
    assert (
        config["base_model_name_or_path"] == str((export / "base").absolute())
        and (export / "base" / "config.json").is_file()
    )
    model = build_model(load_checkpoint(str(run))).eval()
    peft_model = PeftModel.from_pretrained(
        GPT2LMHeadModel.from_pretrained(str(export / "base")), str(export)
    ).eval()
    idx = ids(t=32)
    assert torch.allclose(theirs(peft_model, idx), ours(model, idx), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="not empty"):  # an earlier export is never overwritten silently
        hf.main([f"--out_dir={run}", f"--export_dir={export}"])

    imported = tmp_path / "imported"
    hf.main([f"--import_from={export}", f"--out_dir={imported}", f"--data_dir={char_data}"])
    assert torch.allclose(
        ours(build_model(load_checkpoint(str(imported))).eval(), idx), ours(model, idx), atol=1e-5
    )
    blob = read_adapter_file(str(imported / "adapter.safetensors"))
    assert blob["adapter"]["kind"] == "lora" and blob["format"] == FORMAT
    losses = {}
    for name, source in (("original", run), ("imported", imported)):
        out = tmp_path / f"eval-{name}"
        train.train(tiny_run(char_data, out, init_from=str(source), eval_only=True), environ={})
        losses[name] = [r["val_loss"] for r in plots.read_metrics(str(out)) if r["val_loss"] is not None]
    assert losses["original"] and losses["imported"] == pytest.approx(losses["original"], abs=1e-5)
    import eval_bounds  # and bounded: the same training loss before quantisation (the messages differ)

    raw = {}
    for source in (run, imported):
        eval_bounds.main(
            [
                f"--out_dir={source}",
                "--eval_blocks=16",
                "--eval_docs=8",
                "--exact_max_tokens=0",
                "--device=cpu",
            ]
        )
        raw[source] = json.loads((source / "bounds.json").read_text())["loss_before_quantization_bits"]
    assert raw[imported] == pytest.approx(raw[run], abs=1e-4)


def test_adapter_files_are_safetensors_and_old_pt_files_load(gpt2_dir, tmp_path):
    """adapter.safetensors: no pickle, the settings as JSON in its header; an adapter.pt of older runs
    (the same dict, torch-saved) still loads and gives the same model."""
    model = trained(GPT.from_pretrained(gpt2_dir), "dora")
    info = dict(
        kind="dora",
        targets=list(adapter_layers(model)),
        settings=dict(rank=4, alpha=16.0),
        train_embeddings=True,
    )
    blob = {
        "format": FORMAT,
        "adapter": info,
        "model_type": "gpt",
        "model_args": {},
        "base": gpt2_dir,
        "seed": 0,
        "state": adapter_state_dict(model),
    }
    save_adapter_file(blob, str(tmp_path / "adapter.safetensors"))
    raw = (tmp_path / "adapter.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert json.loads(header["__metadata__"]["lowrank"])["adapter"] == info
    torch.save(blob, tmp_path / "adapter.pt")
    idx = ids()
    for name in ("adapter.safetensors", "adapter.pt"):
        loaded = load_adapter(GPT.from_pretrained(gpt2_dir), str(tmp_path / name)).eval()
        assert torch.equal(ours(loaded, idx), ours(model, idx))


def test_bad_folders_and_adapters_give_one_clear_error(gpt2_dir, tmp_path):
    with pytest.raises(hf.InteropError, match="not a PEFT adapter folder"):
        hf.import_peft(str(tmp_path), base=gpt2_dir)
    cfg = LoraConfig(r=2, target_modules=["c_attn"], bias="all")
    get_peft_model(GPT2LMHeadModel.from_pretrained(gpt2_dir), cfg).save_pretrained(str(tmp_path / "bias"))
    with pytest.raises(hf.InteropError, match="bias='all'"):
        hf.import_peft(str(tmp_path / "bias"), base=gpt2_dir)
    config = json.loads((tmp_path / "bias" / "adapter_config.json").read_text())
    (tmp_path / "bias" / "adapter_config.json").write_text(
        json.dumps(dict(config, peft_type="IA3", bias="none"))
    )
    with pytest.raises(
        hf.InteropError,
        match="peft_type 'IA3' .* does not import; these do: LORA, LORA with use_dora, ADALORA",
    ):
        hf.import_peft(str(tmp_path / "bias"), base=gpt2_dir)
    model = GPT.from_pretrained(gpt2_dir)
    inject_adapters(model, "pissa", rank=4, quantize_residual=True)
    with pytest.raises(hf.InteropError, match="NF4 residual"):
        hf.lora_factors(model)


def test_import_accepts_only_the_options_it_understands(gpt2_dir, tmp_path):
    """Adapters PEFT makes and reloads exactly, which this importer would get wrong: aLoRA (applied only
    after its invocation tokens) and an unconverted PiSSA initialisation (its base is the residual).
    Each is refused naming the field; an adapter whose other fields hold PEFT's defaults, with
    harmless metadata set (task_type, layers_to_transform), still imports with PEFT's logits."""
    for name, cfg in (
        ("alora", LoraConfig(r=2, target_modules=["c_attn"], alora_invocation_tokens=[3, 4])),
        ("pissa", LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights="pissa")),
    ):
        peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(gpt2_dir), cfg)
        peft_model.save_pretrained(str(tmp_path / name))
        with pytest.raises(
            hf.InteropError,
            match={"alora": r"alora_invocation_tokens=\[3, 4\]", "pissa": "init_lora_weights='pissa'"}[name],
        ):
            hf.import_peft(str(tmp_path / name), base=gpt2_dir)
    config = json.loads((tmp_path / "alora" / "adapter_config.json").read_text())
    config.update(alora_invocation_tokens=None, lora_bias=True, use_qalora=True, some_future_option={"on": 1})
    assert hf.unsupported_options(config) == [
        "lora_bias=True",
        "use_qalora=True",
        "some_future_option={'on': 1}",
    ]
    torch.manual_seed(0)
    cfg = LoraConfig(
        r=2,
        target_modules=["c_attn"],
        layers_to_transform=[1],
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(gpt2_dir), cfg).eval()
    peft_model.save_pretrained(str(tmp_path / "plain"))
    model, info, _ = hf.import_peft(str(tmp_path / "plain"), base=gpt2_dir)
    assert info["targets"] == ["transformer.h.1.attn.c_attn"]
    idx = ids()
    assert torch.allclose(ours(model.eval(), idx), theirs(peft_model, idx), rtol=0, atol=1e-5)


def export_of(model, info, config, meta, folder, *args):
    """A run folder holding `model` (a GPT with adapters) as train.py would save it, exported by hf.py."""
    from checkpoint import save_checkpoint

    os.makedirs(folder)
    model_args = {k: getattr(model.config, k) for k in GPTConfig.__dataclass_fields__}
    save_checkpoint(
        {
            "format": FORMAT,
            "model": model.state_dict(),
            "model_type": "gpt",
            "model_args": model_args,
            "iter_num": 1,
            "best_val_loss": 1.0,
            "config": config,
            "adapter": info,
            "meta": meta,
        },
        str(folder / "ckpt.pt"),
    )
    hf.main([f"--out_dir={folder}", *args])
    return folder / "peft"


def with_random_lora(model):
    """Rank-2 LoRA on every default target of `model`, B drawn (not zero); returns its checkpoint entry."""
    info = dict(
        kind="lora", targets=find_targets(model), settings=dict(rank=2, alpha=4.0), train_embeddings=False
    )
    inject_adapters(model, "lora", targets=info["targets"], **info["settings"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    return info


def test_an_export_merges_in_peft_with_every_position_and_its_tokenizer(gpt2_dir, char_data, tmp_path):
    """A GPT-2 folder (64 positions) fine-tuned at block 32 with its head adapted: base/ holds an untied
    head, so PEFT's merge_and_unload gives the adapted logits and leaves the embedding alone; every
    position of the base is there (a 48-token input gives the adapted model's logits); the adapter names
    its base by a relative path; AutoTokenizer reads base/ and round-trips the training text."""
    from transformers import AutoTokenizer

    from prepare import load_tokenizer, read_meta

    torch.manual_seed(0)
    full = GPT.from_pretrained(gpt2_dir)
    model = copy.deepcopy(full)
    model.crop_block_size(32)
    info = with_random_lora(model)
    meta = read_meta(char_data)
    export = export_of(model, info, {"init_from": gpt2_dir, "data_dir": char_data}, meta, tmp_path / "run")
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((export / "base").absolute())
    base_config = json.loads((export / "base" / "config.json").read_text())
    assert base_config["tie_word_embeddings"] is False and base_config["n_positions"] == 64
    peft_model = PeftModel.from_pretrained(
        GPT2LMHeadModel.from_pretrained(config["base_model_name_or_path"]), str(export)
    ).eval()
    idx = ids(t=32)
    want = ours(model.eval(), idx)
    assert torch.allclose(theirs(peft_model, idx), want, rtol=0, atol=1e-5)
    merged = peft_model.merge_and_unload()
    got = theirs(merged, idx)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(
        merged.transformer.wte.weight, GPT2LMHeadModel.from_pretrained(gpt2_dir).transformer.wte.weight
    )
    long = ids(t=48)  # past the fine-tune's block: the base's own positions 32..47
    inject_adapters(full, "lora", targets=info["targets"], **info["settings"])
    load_adapter_state_dict(full, adapter_state_dict(model))
    want = ours(full.eval(), long)
    assert (theirs(merged, long) - want).abs().max() <= 1e-5 * want.abs().max()
    copied = tmp_path / "elsewhere" / "peft"  # the export moved: its relative base is found beside it
    import shutil

    shutil.copytree(export, copied)
    shutil.rmtree(export)
    imported, _, base = hf.import_peft(str(copied))
    assert base == str(copied / "base") and torch.equal(ours(imported.eval(), idx), ours(model, idx))
    text = open("testdata/tinyshakespeare.txt").read()[:5000]
    tokenizer = AutoTokenizer.from_pretrained(str(copied / "base"))
    encode, _ = load_tokenizer(meta)
    assert tokenizer(text)["input_ids"] == encode(text) and tokenizer.decode(encode(text)) == text


def test_a_padded_vocabulary_exports_as_gpt2s_with_its_tokenizer(tmp_path):
    """A nanoGPT-style model on GPT-2 tokens (vocabulary padded to 50,304) exports 50,257 token rows, the
    same logits over them in PEFT, and GPT-2's tokenizer files, which give tiktoken's ids."""
    from transformers import AutoTokenizer

    from prepare import load_tokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50304, bias=True))
    info = with_random_lora(model)
    export = export_of(model, info, {"init_from": "scratch", "dataset": "none-here"}, None, tmp_path / "run")
    assert json.loads((export / "base" / "config.json").read_text())["vocab_size"] == 50257
    peft_model = PeftModel.from_pretrained(
        GPT2LMHeadModel.from_pretrained(str(export / "base")), str(export)
    ).eval()
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(theirs(peft_model, idx), ours(model.eval(), idx)[..., :50257], rtol=0, atol=1e-5)
    text = "ROMEO: But, soft! what light through yonder window breaks?<|endoftext|> Ünïcödé\n"
    encode, _ = load_tokenizer(None)
    assert AutoTokenizer.from_pretrained(str(export / "base"))(text)["input_ids"] == encode(text)


def test_adalora_exports_and_imports_in_peft_adalora_format(gpt2_dir, char_data, tmp_path):
    """--peft_format=native writes PEFT's AdaLoRA (AdaLoraConfig, A, B, E sliced to the kept ranks, the
    mask in rank_pattern; a layer masked whole keeps one rank at E = 0): PeftModel gives the run's
    logits and the import gives them back. An AdaLoRA adapter PEFT itself allocated imports with its
    logits. AdaDoRA, which PEFT's AdaLoRA cannot hold, is refused in one line (it leaves as DoRA)."""
    from prepare import read_meta

    model = trained(GPT.from_pretrained(gpt2_dir), "adalora")
    info = dict(
        kind="adalora",
        targets=list(adapter_layers(model)),
        settings=dict(rank=4, alpha=16.0),
        train_embeddings=False,
    )
    config = {
        "init_from": gpt2_dir,
        "data_dir": char_data,
        "max_iters": 50,
        "adalora_target_r": 2,
        "adalora_tinit": 5,
    }
    export = export_of(model, info, config, read_meta(char_data), tmp_path / "run", "--peft_format=native")
    saved = json.loads((export / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["init_r"] == 4 and saved["total_step"] == 50
    masks = {f"{n}.lora_E": (layer.lora_E != 0).tolist() for n, layer in adapter_layers(model).items()}
    assert saved["rank_pattern"] == {
        n: m if any(m) else [True, False, False, False] for n, m in masks.items()
    }
    assert not any(masks["transformer.h.0.attn.c_proj.lora_E"])  # masked whole: kept as one rank at E = 0
    peft_model = PeftModel.from_pretrained(
        GPT2LMHeadModel.from_pretrained(saved["base_model_name_or_path"]), str(export)
    ).eval()
    assert type(peft_model.peft_config["default"]).__name__ == "AdaLoraConfig"
    idx = ids()
    want = ours(model, idx)
    assert torch.allclose(theirs(peft_model, idx), want, rtol=0, atol=1e-5)
    back, back_info, _ = hf.import_peft(str(export))
    assert back_info["kind"] == "adalora"
    assert torch.allclose(ours(back.eval(), idx), want, rtol=0, atol=1e-5)

    torch.manual_seed(0)  # an AdaLoRA adapter PEFT trained and allocated itself
    cfg = AdaLoraConfig(
        init_r=4,
        target_r=2,
        lora_alpha=8,
        tinit=1,
        tfinal=1,
        deltaT=1,
        total_step=6,
        target_modules=["c_attn", "c_fc"],
    )
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(gpt2_dir), cfg)
    for step in range(6):
        for p in peft_model.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p)
                with torch.no_grad():
                    p.sub_(0.1 * p.grad)
        peft_model.base_model.update_and_allocate(step)
    peft_model.save_pretrained(str(tmp_path / "peft_adalora"))
    reloaded = PeftModel.from_pretrained(
        GPT2LMHeadModel.from_pretrained(gpt2_dir), str(tmp_path / "peft_adalora")
    ).eval()
    mine, mine_info, _ = hf.import_peft(str(tmp_path / "peft_adalora"), base=gpt2_dir)
    assert {s["rank"] for s in mine_info["layers"].values()} <= {0, 1, 2, 3, 4}
    assert torch.allclose(ours(mine.eval(), idx), theirs(reloaded, idx), rtol=0, atol=1e-5)

    dora = trained(GPT.from_pretrained(gpt2_dir), "adadora")
    info = dict(info, kind="adadora")
    with pytest.raises(hf.InteropError, match="PEFT's AdaLoRA has no DoRA magnitude"):
        export_of(dora, info, config, read_meta(char_data), tmp_path / "dora", "--peft_format=native")


@pytest.mark.parametrize("vocab", [V, 50257], ids=["char", "bpe"])
def test_greedy_generation_equals_transformers(tmp_path, vocab):
    """Greedy generation here (the key/value cache, the adapters unmerged) equals transformers'
    generate(do_sample=False) on the exported PEFT model, token for token, for a character vocabulary
    and GPT-2's BPE (a prompt encoded by tiktoken)."""
    from prepare import gpt2_encoding

    folder = str(tmp_path / "base")
    hf_gpt2(folder, vocab_size=vocab)
    model = trained(GPT.from_pretrained(folder), "lora")
    hf.export_peft(hf.lora_factors(model), str(tmp_path / "peft"), folder)
    peft_model = PeftModel.from_pretrained(
        GPT2LMHeadModel.from_pretrained(folder), str(tmp_path / "peft")
    ).eval()
    prompt = gpt2_encoding().encode("ROMEO: But soft,") if vocab > V else ids(1, 6)[0].tolist()
    x = torch.tensor([prompt])
    with torch.no_grad():
        want = peft_model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=40, do_sample=False, pad_token_id=0
        )
    got = model.generate(x, 40, temperature=0)
    assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("case,weight_decay", [("lora", 0.1), ("dora", 0.0)])
def test_loraplus_groups_and_step_equal_peft(gpt2_dir, case, weight_decay):
    """--loraplus=True: every parameter's learning rate (B factors and vectors at 16x) and one AdamW step
    equal peft.optimizers.create_loraplus_optimizer's on the same model and gradients (PEFT decays
    DoRA's magnitude with loraplus_weight_decay, this repo never decays vectors: DoRA at 0)."""
    from peft.optimizers import create_loraplus_optimizer

    family, model, _ = adapted(case, GPT.from_pretrained(gpt2_dir), loraplus=True)
    model.eval()  # no dropout: both copies see the same gradient
    twin = copy.deepcopy(model)
    ours = [opt for opt, _ in family.optimizers(model, 1e-3, (0.9, 0.99), weight_decay, "cpu")]
    theirs = create_loraplus_optimizer(
        twin,
        torch.optim.AdamW,
        lr=1e-3,
        loraplus_lr_ratio=16.0,
        loraplus_weight_decay=weight_decay,
        betas=(0.9, 0.99),
    )

    def rates(m, opts):
        names = {id(p): n for n, p in m.named_parameters()}
        return {
            names[id(p)]: (g["lr"], g["weight_decay"])
            for o in opts
            for g in o.param_groups
            for p in g["params"]
        }

    assert rates(model, ours) == rates(twin, [theirs])
    assert {lr for lr, _ in rates(model, ours).values()} == {1e-3, 16e-3}
    for m in (model, twin):
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.01)  # B away from 0: A gets a gradient
        m(ids(), ids())[1].backward()
    for opt in (*ours, theirs):
        opt.step()
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), n


def test_loraplus_on_a_family_without_b_factors_is_refused():
    from adapters import AdapterError

    with pytest.raises(AdapterError, match="drop --loraplus"):
        case_family("pissa_way0", loraplus=True)


def test_import_holds_the_folder_lock_and_overwrite_leaves_nothing_old(gpt2_dir, char_data, tmp_path):
    """An import into a folder a training run holds is refused, the run's files untouched; with
    --overwrite into a finished run's folder, nothing of that run (metrics, plots, bounds) stays beside
    the imported checkpoint."""
    import fcntl

    torch.manual_seed(0)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False)
    folder = tmp_path / "peft"
    get_peft_model(GPT2LMHeadModel.from_pretrained(gpt2_dir), cfg).save_pretrained(str(folder))
    out = tmp_path / "run"
    train.train(run_args(char_data, out, max_iters=2, eval_interval=2), environ={})
    (out / "bounds.json").write_text("{}")
    args = [f"--import_from={folder}", f"--base={gpt2_dir}", f"--out_dir={out}", "--overwrite=True"]
    with open(out / ".lock", "a+") as held:  # another process's lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = (out / "ckpt.pt").read_bytes()
        with pytest.raises(OSError, match="is in use by"):
            hf.main(args, environ={})
        assert (out / "ckpt.pt").read_bytes() == before
    hf.main(args, environ={})
    assert sorted(os.listdir(out)) == [".lock", "adapter.safetensors", "ckpt.pt"]
    assert load_checkpoint(str(out))["config"]["imported_from"] == str(folder)


@pytest.mark.parametrize("case", [c for c in family_cases() if c.startswith("sublora")])
def test_a_sublora_export_merges_in_peft(gpt2_dir, char_data, tmp_path, case):
    """SubLoRA adapts the LM head of its wrapped model ('model.lm_head' on the wrapper): the export
    writes base/ with an untied head, so PEFT's merge_and_unload gives the run's logits, for every
    allocation mode."""
    from prepare import read_meta

    torch.manual_seed(0)
    _, model, info = adapted(case, GPT.from_pretrained(gpt2_dir))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    meta = read_meta(char_data)
    export = export_of(model, info, {"init_from": gpt2_dir, "data_dir": char_data}, meta, tmp_path / "run")
    assert json.loads((export / "base" / "config.json").read_text())["tie_word_embeddings"] is False
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(export / "base")), str(export))
    idx, want = ids(), ours(model.eval(), ids())
    got = theirs(peft_model.eval().merge_and_unload(), idx)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_an_export_replaces_its_folder_whole_and_names_its_base_absolutely(
    gpt2_dir, char_data, tmp_path, monkeypatch
):
    """Re-exported with --overwrite (a character run, then a GPT-2-token run), the folder holds the new
    export only: no character tokenizer.json left for AutoTokenizer to read. The character tokenizer
    refuses a character outside the vocabulary, as the repo's encoder does; its model_max_length is
    the base's positions, not the fine-tune's block. AutoPeftModelForCausalLM opens the export from
    any working directory. A run whose base folder moved exports with --base=WHERE_IT_IS_NOW, and a
    wrong base is refused."""
    import shutil

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from prepare import load_tokenizer, read_meta

    torch.manual_seed(0)
    model = GPT.from_pretrained(gpt2_dir)
    model.crop_block_size(32)
    info = with_random_lora(model)
    meta = read_meta(char_data)
    export = export_of(model, info, {"init_from": gpt2_dir, "data_dir": char_data}, meta, tmp_path / "run")
    tokenizer = AutoTokenizer.from_pretrained(str(export / "base"))
    assert tokenizer.model_max_length == 64  # the base's positions
    with pytest.raises(Exception, match="Missing \\[UNK\\] token"):  # 'é' is not in Tiny Shakespeare
        tokenizer("café")
    monkeypatch.chdir(tmp_path / "run")
    auto = AutoPeftModelForCausalLM.from_pretrained(str(export)).eval()
    assert torch.allclose(theirs(auto, ids(t=32)), ours(model.eval(), ids(t=32)), rtol=0, atol=1e-5)
    moved = tmp_path / "moved_gpt2"
    shutil.copytree(gpt2_dir, moved)
    hf.main([f"--out_dir={tmp_path / 'run'}", "--overwrite=True", f"--base={moved}"])
    other = tmp_path / "other_gpt2"
    hf_gpt2(str(other), seed=5)
    with pytest.raises(hf.InteropError, match="is not the one this run started from"):
        hf.main([f"--out_dir={tmp_path / 'run'}", "--overwrite=True", f"--base={other}"])
    (export / "stray.txt").write_text("from before")
    gpt2_tokens = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50304, bias=True))
    info = with_random_lora(gpt2_tokens)
    config = {"init_from": "scratch", "dataset": "none-here"}
    shutil.rmtree(tmp_path / "run2", ignore_errors=True)
    export_of(
        gpt2_tokens, info, config, None, tmp_path / "run2", f"--export_dir={export}", "--overwrite=True"
    )
    assert sorted(os.listdir(export)) == ["adapter_config.json", "adapter_model.safetensors", "base"]
    assert "tokenizer.json" not in os.listdir(export / "base")
    assert AutoTokenizer.from_pretrained(str(export / "base"))("ROMEO")["input_ids"] == load_tokenizer(None)[
        0
    ]("ROMEO")


def test_an_import_refuses_data_of_another_vocabulary(gpt2_dir, char_data, tmp_path):
    """A PEFT adapter for a GPT-2-token base imported with character data is refused in one line (it
    would score and sample nonsense), and so is a character export's base with data of other
    characters; with the data it reads, the import records that vocabulary, so sample.py decodes."""
    from prepare import read_meta, write_hf_tokenizer

    big = tmp_path / "gpt2_tokens"
    hf_gpt2(str(big), vocab_size=50257)
    torch.manual_seed(0)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False)
    folder = tmp_path / "peft"
    get_peft_model(GPT2LMHeadModel.from_pretrained(str(big)), cfg).save_pretrained(str(folder))
    args = [f"--import_from={folder}", f"--base={big}", f"--data_dir={char_data}"]
    with pytest.raises(ValueError, match="reads gpt2 tokens but .* holds char tokens"):
        hf.main([*args, f"--out_dir={tmp_path / 'a'}"], environ={})
    assert not (tmp_path / "a").exists()
    meta = read_meta(char_data)
    base = tmp_path / "char_gpt2"
    shutil.copytree(gpt2_dir, base)
    write_hf_tokenizer(meta, str(base), 64)  # the base as an export here writes it: its characters known
    small = tmp_path / "peft_small"
    get_peft_model(GPT2LMHeadModel.from_pretrained(str(base)), cfg).save_pretrained(str(small))
    other = dict(meta, itos={str(i): meta["itos"][str((i + 1) % V)] for i in range(V)})
    other["stoi"] = {ch: int(i) for i, ch in other["itos"].items()}
    shifted = tmp_path / "shifted"
    shutil.copytree(char_data, shifted)
    (shifted / "meta.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="the same characters with other ids"):
        hf.main(
            [
                f"--import_from={small}",
                f"--base={base}",
                f"--data_dir={shifted}",
                f"--out_dir={tmp_path / 'b'}",
            ]
        )
    out = tmp_path / "c"
    hf.main([f"--import_from={small}", f"--base={base}", f"--data_dir={char_data}", f"--out_dir={out}"])
    assert load_checkpoint(str(out))["meta"] == meta


def test_an_adapter_config_with_bad_numbers_or_another_rank_is_refused(gpt2_dir, tmp_path):
    """lora_alpha NaN (NaN <= 0 is false, so it passed), an AdaLoRA init_r written as a string, a
    lora_dropout of 1, an r that disagrees with the tensors (PeftModel refuses that file too): one line
    each naming the field."""
    torch.manual_seed(0)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False)
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(gpt2_dir), cfg).eval()
    folder = tmp_path / "peft"
    peft_model.save_pretrained(str(folder))
    good = json.loads((folder / "adapter_config.json").read_text())
    for change, words in (
        (dict(lora_alpha=float("nan")), "lora_alpha must be a finite number > 0, got nan"),
        (dict(peft_type="ADALORA", init_r="12"), "init_r must be a finite number > 0, got '12'"),
        (dict(lora_dropout=1.0), "lora_dropout must be a number in \\[0, 1\\), got 1.0"),
        (dict(r=8), "gives transformer.h.0.attn.c_attn rank 8 but its tensors have rank 2"),
    ):
        (folder / "adapter_config.json").write_text(json.dumps(dict(good, **change)))
        with pytest.raises(hf.InteropError, match=words):
            hf.import_peft(str(folder), base=gpt2_dir)


def test_vera_equals_peft_vera_on_the_same_seed(gpt2_dir, tmp_path):
    """VeRA against PEFT's VeraConfig on the same base with the same projection_prng_key: the shared A
    and B are PEFT's own draws (sliced per layer, never stored), and with the same trained vectors d and
    b the logits agree in float64. The checkpoint holds d and b alone; the rebuilt model regenerates A
    and B from the seed. An export leaves as the rank-r LoRA it computes (PEFT LoRA gives the logits):
    PEFT's own VeRA format would need its projection matrices saved or drawn by PEFT's code, while the
    LoRA is the same function in the format every LoRA tool reads."""
    from peft import VeraConfig

    from adapters import VeRA

    torch.manual_seed(0)
    targets = ["c_attn", "c_proj", "c_fc"]
    cfg = VeraConfig(r=8, target_modules=targets, projection_prng_key=7, d_initial=0.1, save_projection=False)
    reference = get_peft_model(GPT2LMHeadModel.from_pretrained(gpt2_dir), cfg).double().eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    c = dict(train.all_keys(), vera_rank=8, vera_seed=7, lora_targets=";".join(targets))
    model, info = VeRA(c).inject(GPT.from_pretrained(gpt2_dir).double())
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "vera_lambda" in name:
                module = name.removeprefix(hf.PREFIX).split(".vera_lambda")[0]
                own[f"{module}.vera_{'d' if '_d.' in name else 'b'}"].copy_(p)
    idx = ids()
    want = theirs(reference, idx)
    assert torch.allclose(ours(model.eval(), idx), want, rtol=0, atol=1e-10)
    state = adapter_state_dict(model)
    assert sorted({k.rsplit(".", 1)[1] for k in state}) == ["vera_b", "vera_d"]
    rebuilt = VeRA.rebuild(GPT.from_pretrained(gpt2_dir).double(), info)
    load_adapter_state_dict(rebuilt, state)
    assert torch.equal(ours(rebuilt.eval(), idx), ours(model, idx))
    hf.export_peft(hf.lora_factors(model.float()), str(tmp_path), gpt2_dir)
    exported = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(gpt2_dir), str(tmp_path)).eval()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 8
    assert torch.allclose(theirs(exported, idx), want.float(), rtol=0, atol=1e-4)


def test_vera_refuses_a_rank_larger_than_a_layer_and_loraplus(gpt2_dir):
    from adapters import AdapterError, VeRA

    c = dict(train.all_keys(), vera_rank=40)
    with pytest.raises(
        AdapterError,
        match=r"vera_rank 40 is larger than transformer.h.0.attn.c_attn \(96 x 32\): lower --vera_rank to 32",
    ):
        VeRA(c).inject(GPT.from_pretrained(gpt2_dir))
    with pytest.raises(AdapterError, match="loraplus=True gives B factors their own learning rate, but vera"):
        VeRA(dict(c, loraplus=True)).check()


def test_loraga_equals_peft_loraga_on_the_same_batches(gpt2_dir, monkeypatch):
    """LoRA-GA against PEFT's init_lora_weights='lora_ga' (LoraGAConfig: ArB2r, stable scale, gamma 16)
    on copies of the same GPT (nn.Linear layers) and the same training batches: the same A and B, and the
    base keeps the same residual W - s B A (PEFT writes it into the base, this repo keeps B₀, A₀ and
    subtracts them), so the logits agree at init and after both adapters move alike. torch.svd_lowrank
    is randomized; both sides run it through one exact SVD here, so the comparison is deterministic.
    (PEFT on transformers' GPT-2 scales B by in_features^¼: its Conv1D weight is stored (in, out); the
    paper's scale, used here, is out_features^¼.)"""
    from peft import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    from adapters import LoRAGA

    def exact(M, q, niter):
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :q], S[:q], Vh[:q].T

    monkeypatch.setattr(torch, "svd_lowrank", exact)
    torch.manual_seed(0)
    data = [torch.randint(0, V, (4, 17)) for _ in range(3)]
    batches = [(x[:, :-1].contiguous(), x[:, 1:].contiguous()) for x in data]
    base = GPT.from_pretrained(gpt2_dir, dict(dropout=0.0))
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_fc"],
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(),
    )
    reference = copy.deepcopy(base)

    def train_step():
        for x, y in batches:
            reference(x, y)[1].backward()

    preprocess_loraga(reference, cfg, train_step)
    reference = get_peft_model(reference, cfg).eval()
    c = dict(train.all_keys(), lora_rank=4, lora_alpha=8.0, lora_targets="c_attn;c_fc", loraga_batches=3)
    family = LoRAGA(c)
    model, _ = family.inject(copy.deepcopy(base))
    family.init_from_data(model.train(), iter(batches))
    for name, layer in adapter_layers(model).items():
        theirs_layer = reference.get_submodule(hf.PREFIX + name)
        assert torch.allclose(layer.lora_A, theirs_layer.lora_A["default"].weight, rtol=0, atol=1e-5)
        assert torch.allclose(layer.lora_B, theirs_layer.lora_B["default"].weight, rtol=0, atol=1e-5)
        residual = layer.base.weight - layer.scaling * layer.lora_B0 @ layer.lora_A0
        assert torch.allclose(residual, theirs_layer.base_layer.weight, rtol=0, atol=1e-5)
    idx = ids()
    assert torch.allclose(ours(model.eval(), idx), ours(reference, idx), rtol=0, atol=1e-4)
    with torch.no_grad():
        for name, layer in adapter_layers(model).items():
            step = torch.randn_like(layer.lora_B) * 0.1
            layer.lora_B.add_(step)
            reference.get_submodule(hf.PREFIX + name).lora_B["default"].weight.add_(step)
    assert torch.allclose(ours(model, idx), ours(reference, idx), rtol=0, atol=1e-4)
