"""
The models: GPT-2 weight loading (Conv1D transposes), generation, cropping, optimizer groups.

    python -m pytest -q test_model.py
"""

import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from adapters import inject_adapters
from conftest import write_hf_gpt2
from model import GPT, MODELS, GPTConfig, convert_hf_gpt2_state_dict


def test_from_pretrained_local_folder(tmp_path):
    torch.manual_seed(0)
    ref = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, bias=True, gelu="tanh"))
    write_hf_gpt2(ref, tmp_path)
    model = GPT.from_pretrained(str(tmp_path))
    idx = torch.randint(0, 50, (2, 16))
    ref.eval(), model.eval()
    assert torch.equal(model(idx, idx)[0], ref(idx, idx)[0])
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    with pytest.raises(ValueError, match="unknown pretrained model"):
        GPT.from_pretrained("gpt3")


def test_gpt2_weights_compute_gpt2s_tanh_gelu(tmp_path):
    """GPT-2 was trained with the tanh approximation of GELU (transformers' gelu_new): a model loaded
    from its weights must use it, checked against the formula in float64."""
    torch.manual_seed(0)
    write_hf_gpt2(
        GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50, bias=True)), tmp_path
    )
    model = GPT.from_pretrained(str(tmp_path)).double().eval()
    mlp = model.transformer.h[0].mlp
    x = torch.randn(4, 32, dtype=torch.float64) * 3
    h = x @ mlp.c_fc.weight.T + mlp.c_fc.bias
    gelu_new = 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h**3)))
    torch.testing.assert_close(
        mlp(x), gelu_new @ mlp.c_proj.weight.T + mlp.c_proj.bias, rtol=1e-12, atol=1e-12
    )
    exact = 0.5 * h * (1 + torch.erf(h / 2**0.5))
    assert (mlp(x) - (exact @ mlp.c_proj.weight.T + mlp.c_proj.bias)).abs().max() > 1e-5  # not the exact GELU
    small = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50)
    assert GPT(small).transformer.h[0].mlp.gelu.approximate == "none"  # nanoGPT's models keep the exact one


def test_convert_transposes_exactly_the_conv1d_weights():
    sd = {
        "transformer.h.0.attn.c_attn.weight": torch.arange(6.0).view(2, 3),
        "h.0.ln_1.weight": torch.ones(3),
        "lm_head.weight": torch.zeros(2, 2),
        "h.0.attn.masked_bias": torch.zeros(1),
    }
    out = convert_hf_gpt2_state_dict(sd)
    assert sorted(out) == ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.ln_1.weight"]
    assert torch.equal(out["transformer.h.0.attn.c_attn.weight"], torch.arange(6.0).view(2, 3).t())


@pytest.mark.parametrize("model_type", ["gpt", "bigram"])
def test_loss_is_cross_entropy_and_generate(model_type):
    torch.manual_seed(0)
    model = MODELS[model_type](GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11)).eval()
    idx = torch.randint(0, 11, (2, 8))
    logits, loss = model(idx, idx)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits.reshape(-1, 11), idx.reshape(-1)))
    last, none = model(idx)
    assert none is None and torch.allclose(last[:, 0], logits[:, -1], atol=1e-6)
    out = model.generate(idx[:, :3], max_new_tokens=12, top_k=5)  # runs past block_size: crops the context
    assert out.shape == (2, 15) and torch.equal(out[:, :3], idx[:, :3]) and int(out.max()) < 11
    # greedy (top_k=1) generation equals the argmax of the model's own next-token logits
    greedy = model.generate(idx[:, :4], max_new_tokens=1, top_k=1)
    assert torch.equal(greedy[:, -1], model(idx[:, :4])[0][:, -1].argmax(-1))


def test_crop_block_size():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=11)).eval()
    idx = torch.randint(0, 11, (1, 8))
    before = model(idx)[0]
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape == (8, 16)
    assert torch.equal(model(idx)[0], before)


def test_optimizer_holds_only_trainable_params_with_decay_on_matrices():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11, bias=True))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert sum(p.numel() for p in decay["params"] + no_decay["params"]) == model.get_num_params(False)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    inject_adapters(model, "lora", rank=2)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("lora_" in names[id(p)] for g in opt.param_groups for p in g["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == 2 * len(
        [m for m in model.modules() if hasattr(m, "lora_A")]
    )


def test_bigram_layout_has_separate_qkv():
    model = MODELS["bigram"](GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {"blocks.0.sa.key", "blocks.0.sa.query", "blocks.0.sa.value", "blocks.0.sa.proj"} <= names


def hf_gpt2(folder, **config):
    """A tiny GPT2LMHeadModel saved by transformers itself (the oracle), with these config fields."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=16,
        vocab_size=50,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **config,
    )
    model = GPT2LMHeadModel(cfg).eval()
    return model


@pytest.mark.parametrize(
    "field, value",
    [
        ("scale_attn_by_inverse_layer_idx", True),
        ("scale_attn_weights", False),
        ("layer_norm_epsilon", 1e-3),
        ("n_inner", 48),
    ],
)
def test_a_gpt2_config_field_this_gpt_does_not_compute_is_refused(tmp_path, field, value):
    """Each of these changes transformers' outputs; reading the folder as if it did not would give
    other logits without a word."""
    hf_gpt2(tmp_path, **{field: value}).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=f"config.json sets {field}="):
        GPT.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("layout", ["single", "sharded", "gelu_pytorch_tanh", "n_inner_4x", "untied head"])
def test_gpt2_folders_transformers_writes_load_with_its_logits(tmp_path, layout):
    extra = {
        "single": {},
        "sharded": {},
        "gelu_pytorch_tanh": {"activation_function": "gelu_pytorch_tanh"},
        "n_inner_4x": {"n_inner": 128},
        "untied head": {"tie_word_embeddings": False},
    }[layout]
    hf = hf_gpt2(tmp_path, **extra)
    if layout == "untied head":  # a head of its own, not a copy of the embedding
        with torch.no_grad():
            hf.lm_head.weight.normal_(0, 0.1)
    hf.save_pretrained(str(tmp_path), max_shard_size="20KB" if layout == "sharded" else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == (layout == "sharded")
    model = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, idx)[0], hf(input_ids=idx).logits, rtol=1e-5, atol=1e-5)


def test_an_incomplete_or_pickled_gpt2_folder_is_one_line(tmp_path):
    from safetensors.torch import load_file

    hf = hf_gpt2(tmp_path)
    hf.save_pretrained(str(tmp_path / "bin"))  # as older transformers wrote it: a pickled pytorch_model.bin
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), str(tmp_path / "bin" / "pytorch_model.bin"))
    with pytest.raises(ValueError, match="has no model.safetensors .only pytorch_model.bin"):
        GPT.from_pretrained(str(tmp_path / "bin"))
    hf.save_pretrained(str(tmp_path / "cut"))
    tensors = load_file(str(tmp_path / "cut" / "model.safetensors"))
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, str(tmp_path / "cut" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['transformer.h.1.mlp.c_fc.weight'\]"):
        GPT.from_pretrained(str(tmp_path / "cut"))


def test_a_folder_of_another_model_type_is_one_line(tmp_path):
    """A Llama folder given where a GPT-2 folder is expected (sample.py --init_from): one line naming its
    model_type, no KeyError."""
    import sample
    from configurator import cli

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(SystemExit) as exit_info:
        cli(sample.sample, [f"--init_from={tmp_path}", "--device=cpu", "--max_new_tokens=2"])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert "holds a 'llama' model (config.json's model_type)" in message


def test_save_pretrained_refuses_a_model_that_still_holds_adapters(tmp_path):
    """Its folder would load as another function: refused in one line; merged first, it writes and
    loads back with the adapted model's logits. A merged head adapter unties the head from the
    embedding: the folder says tie_word_embeddings=false and holds lm_head.weight, and both this GPT
    and transformers load it with the adapted logits."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50, bias=True)).eval()
    inject_adapters(model, "lora", rank=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
    with pytest.raises(ValueError, match="adapters still in it"):
        model.save_pretrained(str(tmp_path / "unmerged"))
    assert not (tmp_path / "unmerged" / "model.safetensors").exists()
    idx = torch.randint(0, 50, (2, 16))
    from adapters import merge_adapters

    want = model(idx, idx)[0]
    merge_adapters(copy.deepcopy(model)).save_pretrained(str(tmp_path / "untied"))
    assert json.loads((tmp_path / "untied" / "config.json").read_text())["tie_word_embeddings"] is False
    back = GPT.from_pretrained(str(tmp_path / "untied")).eval()
    assert not back.head_is_tied()
    assert (back(idx, idx)[0] - want).abs().max() <= 1e-5 * want.abs().max()  # merged in fp32: rounding only
    from transformers import GPT2LMHeadModel

    with torch.no_grad():
        theirs = GPT2LMHeadModel.from_pretrained(str(tmp_path / "untied")).eval()(idx).logits
    assert (theirs - want).abs().max() <= 1e-5 * want.abs().max()
    model.lm_head = (
        model.lm_head.base
    )  # the head's adapter dropped: the rest merged still differs from the base
    want = model(idx, idx)[0]
    merge_adapters(model).save_pretrained(str(tmp_path / "merged"))
    torch.testing.assert_close(
        GPT.from_pretrained(str(tmp_path / "merged")).eval()(idx, idx)[0], want, rtol=1e-5, atol=1e-5
    )
