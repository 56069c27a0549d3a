"""
Generation: the key/value cache against the whole-context recomputation, ragged batches against each
prompt alone, and sample.py's prompts, stop strings and refusals.

    python -m pytest -q test_sample.py
"""

import copy

import pytest
import torch

import sample
import train
from adapters import merge_adapters
from configurator import ConfigError
from conftest import adapted, run_args, tiny_model


def steps(model, idx, n, kv_cache, seeds, pads=None, temperature=1.0):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return list(model.stream(idx, n, temperature, None, gens, kv_cache, pads))


def assert_same_steps(got, want):
    """The same tokens at every step, and logits equal to float64 rounding."""
    assert len(got) == len(want)
    for (token, logits), (want_token, want_logits) in zip(got, want):
        assert torch.equal(token, want_token)
        torch.testing.assert_close(logits, want_logits, rtol=1e-9, atol=1e-10)


def test_cached_generation_equals_the_uncached_one(family_case):
    """Every family case, adapters unmerged and merged, float64: 2 x block_size tokens sampled with the
    cache give the tokens and the logits of the whole-context recomputation at every step (the last
    block_size of them past the context, where both recompute the sliding window)."""
    _, model, _ = adapted(family_case, tiny_model("gpt"))
    model = model.double().eval()
    idx = torch.randint(0, 40, (1, 3), generator=torch.Generator().manual_seed(0))
    n = 2 * model.config.block_size
    uncached = steps(model, idx, n, False, [7])
    assert_same_steps(steps(model, idx, n, True, [7]), uncached)
    merged = merge_adapters(copy.deepcopy(model))
    assert_same_steps(steps(merged, idx, n, True, [7]), uncached)


def test_the_cache_under_bf16_autocast(family_case):
    """Under bf16 autocast (what a GPU run samples in), greedy generation with the cache gives the
    tokens of the uncached path, and logits within bf16's rounding of its."""
    _, model, _ = adapted(family_case, tiny_model("gpt"))
    idx = torch.randint(0, 40, (1, 3), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", torch.bfloat16):
        got, want = (steps(model.eval(), idx, 12, kv, [0], temperature=0) for kv in (True, False))
    for (token, logits), (want_token, want_logits) in zip(got, want):
        assert logits.dtype == torch.bfloat16 and torch.equal(token, want_token)
        torch.testing.assert_close(logits.float(), want_logits.float(), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("model_type", ["gpt", "bigram"])
@pytest.mark.parametrize("kv_cache", [True, False])
def test_a_ragged_batch_gives_each_prompt_what_it_gives_alone(model_type, kv_cache):
    """Prompts of 2, 5 and 9 tokens left-padded into one batch, each row with its own generator: every
    row's tokens and logits are those of its prompt generated alone with the same seed, past block_size
    too (the pads leave each row's window as they leave its context)."""
    model = tiny_model(model_type).double().eval()
    prompts = [torch.randint(0, 40, (n,), generator=torch.Generator().manual_seed(n)) for n in (2, 5, 9)]
    longest = max(len(p) for p in prompts)
    pads = torch.tensor([longest - len(p) for p in prompts])
    batch = torch.stack([torch.cat([torch.zeros(longest - len(p), dtype=torch.long), p]) for p in prompts])
    together = steps(model, batch, 20, kv_cache, [11, 12, 13], pads)
    for row, (prompt, seed) in enumerate(zip(prompts, [11, 12, 13])):
        alone = steps(model, prompt[None], 20, kv_cache, [seed])
        assert_same_steps([(t[row : row + 1], lg[row : row + 1]) for t, lg in together], alone)


def test_greedy_is_the_argmax():
    model = tiny_model("gpt").eval()
    idx = torch.randint(0, 40, (2, 4), generator=torch.Generator().manual_seed(0))
    (token, logits), *_ = steps(model, idx, 1, True, [0, 1], temperature=0)
    assert torch.equal(token, logits.argmax(-1))


@pytest.fixture(scope="module")
def run_dir(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sample_run")
    train.train(run_args(char_data, out, max_iters=4, eval_interval=4), environ={})
    return str(out)


def test_one_text_streams_what_it_returns(run_dir, capsys):
    """A single text is printed as its tokens come, cut at the stop string: what was shown is the text."""
    base = [
        f"--out_dir={run_dir}",
        "--device=cpu",
        "--max_new_tokens=40",
        "--num_samples=1",
        "--start=ROMEO:",
    ]
    capsys.readouterr()
    (text,) = sample.sample([*base, "--stop=e"], environ={})
    shown = capsys.readouterr().out
    assert shown == text + "\n---------------\n" and "e" not in text[len("ROMEO:") :]


def test_prompts_file_stop_and_seeds(run_dir, tmp_path):
    """--prompts gives one text per line and sample (texts in order, each with seed + k); a text equals
    the same prompt sampled alone with its seed; --stop cuts each text before the stop string."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\nJULIET: O\n\n")
    base = [f"--out_dir={run_dir}", "--device=cpu", "--max_new_tokens=30", "--seed=5"]
    texts = sample.sample([*base, f"--prompts={prompts}", "--num_samples=2"], environ={})
    assert len(texts) == 4 and texts[0].startswith("ROMEO:") and texts[2].startswith("JULIET: O")
    alone = sample.sample([*base, "--start=JULIET: O", "--num_samples=1", "--seed=7"], environ={})
    assert alone[0] == texts[2]
    unstopped = sample.sample([*base, "--start=ROMEO:", "--num_samples=1"], environ={})[0]
    stop = unstopped[len("ROMEO:") + 3 : len("ROMEO:") + 5]  # two characters it generates
    stopped = sample.sample([*base, "--start=ROMEO:", "--num_samples=1", f"--stop={stop}"], environ={})[0]
    assert stopped == "ROMEO:" + unstopped[len("ROMEO:") :].split(stop)[0] and stop not in stopped[6:]
    uncached = sample.sample(
        [*base, f"--prompts={prompts}", "--num_samples=2", "--kv_cache=False"], environ={}
    )
    assert uncached == texts


def test_bad_input_is_one_line_before_any_generation(run_dir, tmp_path, monkeypatch):
    base = [f"--out_dir={run_dir}", "--device=cpu", "--max_new_tokens=5"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no prompt"):
        sample.sample([*base, f"--prompts={empty}"], environ={})
    with pytest.raises(ConfigError, match="leaves no room in the model's context of 32"):
        sample.sample([*base, "--start=" + "a" * 40], environ={})
    with pytest.raises(ConfigError, match="cannot be encoded"):
        sample.sample([*base, "--stop=<|endoftext|>"], environ={})  # characters outside the vocabulary
    monkeypatch.setattr(sample.os, "sysconf", lambda name: 1)  # one free byte
    with pytest.raises(ConfigError, match="lower --batch_size"):
        sample.sample(base, environ={})


def test_a_vocabulary_that_does_not_fit_the_model_is_one_line(char_data, tmp_path):
    """A checkpoint whose recorded vocabulary disagrees with its model, and an older checkpoint (no
    vocabulary of its own) whose data folder was prepared again from other text: one line each, not a
    KeyError while decoding."""
    from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from prepare import prepare_shakespeare_char

    out = tmp_path / "run"
    train.train(run_args(char_data, out, max_iters=2, eval_interval=2), environ={})
    ckpt = load_checkpoint(str(out))
    args = [f"--out_dir={out}", "--device=cpu", "--max_new_tokens=5", "--start=a"]
    save_checkpoint(dict(ckpt, meta=dict(ckpt["meta"], vocab_size=70)), str(out / "ckpt.pt"))
    with pytest.raises(
        CheckpointError, match="the model reads 65 token ids but the checkpoint's vocabulary has 70"
    ):
        sample.sample(args, environ={})
    data = tmp_path / "data"
    (tmp_path / "other.txt").write_text("a smaller alphabet, prepared again\n" * 50)
    prepare_shakespeare_char(str(data), input_path=str(tmp_path / "other.txt"))
    old = {k: v for k, v in ckpt.items() if k != "meta"}
    save_checkpoint(dict(old, config=dict(ckpt["config"], data_dir=str(data))), str(out / "ckpt.pt"))
    with pytest.raises(CheckpointError, match="vocabulary has 17 .the data was prepared again"):
        sample.sample(args, environ={})
