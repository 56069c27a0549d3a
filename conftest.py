"""Shared fixtures. Tests run offline, on any clone: Tiny Shakespeare and tiktoken's GPT-2 ranks are
shipped in testdata/ (1.9 MB)."""

import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHAKESPEARE = os.path.join(HERE, "testdata", "tinyshakespeare.txt")  # karpathy/char-rnn's input.txt
TIKTOKEN_CACHE = os.path.join(
    HERE, "testdata", "tiktoken_cache"
)  # tiktoken's cached r50k_base (= GPT-2) ranks
if os.path.isdir(TIKTOKEN_CACHE):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", TIKTOKEN_CACHE)
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
