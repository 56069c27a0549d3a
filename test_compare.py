"""
compare.py end to end at a tiny size: every method fine-tuned on the shifted corpus through train.py,
the table, compare.json and the Pareto plot written, every number read back from the runs.

    python -m pytest -q test_compare.py
"""

import json
import os

import pytest

import compare
import prepare
from conftest import python_tree


@pytest.fixture(scope="module")
def tiny_comparison(tmp_path_factory, shakespeare_text):
    root = tmp_path_factory.mktemp("compare")
    python_tree(
        root / "lib", {f"mod{i}.py": f"def g{i}(x):\n    return x * {i} + 1\n" * 40 for i in range(60)}
    )
    prepare.prepare_python_stdlib(str(root / "data" / "python_stdlib"), input_path=str(root / "lib"))
    (root / "in.txt").write_text(shakespeare_text[:40_000], encoding="utf-8")
    prepare.prepare_shakespeare_bytes(
        str(root / "data" / "shakespeare_bytes"), input_path=str(root / "in.txt")
    )
    summary = compare.compare(tiny(root), environ={})
    return root, summary


def tiny(root, *more):
    return [
        "--size=tiny",
        "--grid=1",
        "--device=cpu",
        f"--data_root={root / 'data'}",
        f"--out_dir={root / 'out-compare'}",
        *more,
    ]


def test_every_method_runs_and_the_table_reads_its_runs(tiny_comparison):
    root, summary = tiny_comparison
    out = root / "out-compare"
    assert set(summary["best"]) == {"frozen", *compare.METHODS}
    on_disk = json.loads((out / "compare.json").read_text())
    assert on_disk["best"].keys() == summary["best"].keys()
    frozen, full = summary["best"]["frozen"]["val_loss"], summary["best"]["full"]["val_loss"]
    for method, r in summary["best"].items():  # each number is the run's own last eval, read independently
        rows = [json.loads(line) for line in open(out / "runs" / r["run"] / "metrics.jsonl")]
        val = [row["val_loss"] for row in rows if row["val_loss"] is not None][-1]
        assert r["val_loss"] == val
        assert r["gain_recovered"] == pytest.approx((frozen - val) / (frozen - full))
        if method not in ("frozen", "full"):
            assert (
                r["trainable_params"] < r["total_params"] / 2 and r["adapter_bytes"] < 4 * r["total_params"]
            )
            assert r["peak_mem_mb"] > 0 and r["step_ms"] > 0
    assert summary["best"]["frozen"]["trainable_params"] == summary["best"]["full"]["trainable_params"]
    sora = summary["best"]["sora"]
    assert sora["ranks_total"] == 8 * 9  # rank 8 on 4 Linears in each of 2 blocks and on the head
    assert sora["ranks_kept"] == sum(sora["effective_rank"].values()) and "dense_val_loss" in sora
    table = (out / "compare.md").read_text()
    assert all(f"| {m}" in table for m in summary["best"])
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_call_reuses_the_base_and_the_runs(tiny_comparison, capsys):
    root, summary = tiny_comparison
    again = compare.compare(tiny(root, "--methods=lora_r1"), environ={})
    assert "reusing the base" in capsys.readouterr().out
    assert again["best"]["lora_r1"]["val_loss"] == summary["best"]["lora_r1"]["val_loss"]


def test_bad_choices_are_one_line(tiny_comparison):
    with pytest.raises(compare.ConfigError, match="unknown method"):
        compare.compare(["--methods=lora,nope"], environ={})
    with pytest.raises(compare.ConfigError, match="size must be one of"):
        compare.compare(["--size=huge"], environ={})


def test_an_interrupted_rerun_is_not_reused(tiny_comparison, monkeypatch):
    """--overwrite=True stopped inside a run: that run's folder no longer claims to be finished, so the
    next call trains it again instead of reading its half-written metrics."""
    root, summary = tiny_comparison
    record = os.path.join(root, "out-compare", "runs", "lora_r1_lr1e-02", "run.json")
    assert os.path.isfile(record)

    real = compare.run_train

    def killed(args, out, log_path):  # the frozen base's eval runs; the LoRA run is stopped
        if out.endswith("lora_r1_lr1e-02"):
            raise KeyboardInterrupt
        return real(args, out, log_path)

    monkeypatch.setattr(compare, "run_train", killed)
    with pytest.raises(KeyboardInterrupt):
        compare.compare(tiny(root, "--methods=lora_r1", "--overwrite=True"), environ={})
    assert not os.path.isfile(record)
    monkeypatch.undo()
    again = compare.compare(tiny(root, "--methods=lora_r1"), environ={})
    assert os.path.isfile(record) and not again["best"]["lora_r1"]["reused"]
    assert again["best"]["lora_r1"]["val_loss"] == pytest.approx(
        summary["best"]["lora_r1"]["val_loss"], abs=1e-6
    )
