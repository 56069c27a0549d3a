"""Shared fixtures. Tests run offline, on any clone: Tiny Shakespeare and tiktoken's GPT-2 ranks are
shipped in testdata/ (1.9 MB)."""

import json
import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHAKESPEARE = os.path.join(HERE, "testdata", "tinyshakespeare.txt")  # karpathy/char-rnn's input.txt
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shakespeare_text():
    assert os.path.isfile(SHAKESPEARE), f"tests read Tiny Shakespeare from {SHAKESPEARE}"
    with open(SHAKESPEARE, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    """Tiny Shakespeare prepared at the character level, once per session."""
    from prepare import prepare_shakespeare_char

    out = str(tmp_path_factory.mktemp("shakespeare_char"))
    prepare_shakespeare_char(out, input_path=SHAKESPEARE)
    return out


# -----------------------------------------------------------------------------
# small models, inputs and runs the test files share

TINY_MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=40, dropout=0.0, bias=True)


def tiny_model(model_type="gpt", seed=0, device="cpu", **kw):
    """A 2-layer model of either layout (model.MODELS), seeded; kw overrides TINY_MODEL."""
    from model import MODELS, GPTConfig

    torch.manual_seed(seed)
    return MODELS[model_type](GPTConfig(**{**TINY_MODEL, **kw})).to(device)


def tokens(seed=1, B=3, T=16, vocab=TINY_MODEL["vocab_size"]):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, idx):
    model.eval()
    return model(idx, idx)[0]  # targets given: logits at every position


def run_args(data_dir, out_dir, **kw):
    """train.py's arguments for a run of seconds on the character data (kw: any train.py key)."""
    args = dict(
        device="cpu",
        data_dir=data_dir,
        out_dir=str(out_dir),
        n_layer=2,
        n_head=2,
        n_embd=64,
        block_size=32,
        batch_size=8,
        eval_iters=4,
        eval_interval=20,
        log_interval=1,
        dropout=0.0,
        learning_rate=3e-3,
        warmup_iters=5,
        lr_decay_iters=60,
        min_lr=3e-4,
        max_iters=20,
        dtype="float32",
        init_from="scratch",
    )
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


# -----------------------------------------------------------------------------
# the family table: every registered family's example cases (Family.examples). A test that takes the
# argument `family_case` runs once per case of every family registered when its file is collected, so
# a family added with register() and its examples is covered without editing a test file.


def family_cases():
    """{case id: (kind, train.py keys)} over the registered families' examples."""
    from adapters import FAMILIES

    return {
        f"{kind}_{name}" if name else kind: (kind, dict(settings))
        for kind, family in FAMILIES.items()
        for name, settings in family.examples.items()
    }


def pytest_generate_tests(metafunc):
    if "family_case" in metafunc.fixturenames:
        metafunc.parametrize("family_case", list(family_cases()))


def case_run_keys(case, **kw):
    """train.py's keys of a case: its adapter, rank 4 and its example settings (kw overrides)."""
    kind, settings = family_cases()[case]
    return {"adapter": kind, "lora_rank": 4, **settings, **kw}


def case_family(case, **kw):
    """The case's Family, holding the flat config train.py would resolve for it (20 iterations)."""
    from adapters import config_keys, family_of

    keys = case_run_keys(case, **kw)
    c = {k: default for k, (default, *_) in config_keys().items()}
    c.update(max_iters=20, **keys)
    family = family_of(keys["adapter"])(c, say=lambda *a: None)
    family.check()
    return family


def adapted(case, model, **kw):
    """(family, the model to train, the checkpoint's adapter entry): `model` adapted as train.py would."""
    family = case_family(case, **kw)
    model, info = family.inject(model)
    return family, model, info


def python_tree(root, extra=()):
    """A small standard-library-like folder: modules, a package, and the tests that must be left out."""
    files = {
        "os_like.py": "import sys\n\ndef f(x):\n    return x + 1\n",
        "pkg/__init__.py": "from .core import *\n",
        "pkg/core.py": "# café: a UTF-8 byte sequence\nclass C:\n    pass\n",
        "json_like/decoder.py": "def dec(s): ...\n",
        "test/test_os.py": "assert True\n",
        "pkg/tests/helper.py": "TEST = 1\n",
        "pkg/test_core.py": "x = 1\n",
        "notes.txt": "not python\n",
        **dict(extra),
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return {rel: text for rel, text in files.items() if rel.endswith(".py") and "test" not in rel}


GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def write_hf_gpt2(model, folder):
    """Save a GPT in the layout of OpenAI's GPT-2 on the Hugging Face hub: no 'transformer.' prefix,
    Conv1D weights stored (in, out), the tied head left out, old causal-mask buffers present."""
    from safetensors.torch import save_file

    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        k = k.removeprefix("transformer.")
        sd[k] = v.t().contiguous() if k.endswith(GPT2_CONV1D) else v.clone()
    for i in range(model.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
    save_file(sd, str(folder / "model.safetensors"))
    c = model.config
    (folder / "config.json").write_text(
        json.dumps(
            dict(
                n_layer=c.n_layer,
                n_head=c.n_head,
                n_embd=c.n_embd,
                vocab_size=c.vocab_size,
                n_positions=c.block_size,
            )
        )
    )
