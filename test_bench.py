"""
bench.py in its quick mode: every method has a row with positive, consistent numbers.

    python -m pytest -q test_bench.py
"""

import json

import pytest
import torch.nn as nn

import bench
from adapters import count_params
from model import GPT, GPTConfig


def test_quick_bench_has_every_row(tmp_path):
    bench.main(["--quick=True", f"--out_dir={tmp_path}", "--device=cpu", "--dtype=float32"])
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["method"]: r for r in data["rows"] if "step_ms" in r}
    try:
        import peft  # noqa: F401

        expected = set(bench.METHODS)
    except ImportError:
        expected = {m for m in bench.METHODS if not m.startswith("peft_")}
    assert set(rows) == expected
    for r in rows.values():
        for key in ("step_ms", "tokens_per_s", "state_mb", "merged_latency_ratio"):
            assert r[key] > 0, (r["method"], key)
        assert r["tokens_per_s"] * r["step_ms"] / 1000 == pytest.approx(4 * 32)  # batch × block
        assert r["ratio_to_full"] == pytest.approx(r["step_ms"] / rows["full"]["step_ms"])
    # trainable counts equal the closed forms of the adapters
    cfg = {k: bench.SIZES["quick"][k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}
    model = GPT(GPTConfig(**cfg, bias=False))
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert rows["full"]["trainable_params"] == count_params(model)[0]
    assert rows["lora"]["trainable_params"] == sum(8 * (m.in_features + m.out_features) for m in linears)
    assert rows["dora"]["trainable_params"] == rows["lora"]["trainable_params"] + sum(
        m.out_features for m in linears
    )
    assert rows["sora"]["trainable_params"] == rows["lora"]["trainable_params"] + 8 * len(linears)
    assert rows["pissa_way3"]["trainable_params"] == len(linears) * (2 * 8 * 8 + 8)
    assert rows["sublora_rdkronqr"]["trainable_params"] == 200
    assert rows["full"]["total_params"] == rows["full"]["trainable_params"]
    assert (tmp_path / "bench.md").read_text().count("\n") == len(rows) + 2
    assert [r for r in data["rows"] if r["method"] == "pissa_init_full_over_lowrank"][0]["ratio"] > 0


def test_sample_mode_times_both_paths_on_the_same_text(tmp_path):
    """bench.py --sample=True: generation with and without the key/value cache gives the same text, and
    the speed-up is the ratio of the two rates."""
    argv = ["--sample=True", "--quick=True", "--prompt_tokens=10", "--new_tokens=30", f"--out_dir={tmp_path}"]
    (row,) = bench.main([*argv, "--device=cpu"])
    assert row["same_text"] and row["new_tokens"] == 30
    assert row["speedup"] == pytest.approx(row["cached_tokens_per_s"] / row["uncached_tokens_per_s"])
    assert json.loads((tmp_path / "sampling.json").read_text())["rows"] == [row]
