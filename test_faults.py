"""
Nothing a user has is lost: every user mistake of every script ends in one line (exit status 1, no
traceback) and leaves the files in its way byte-identical; a nan, a crash or a full disk never costs
the last good checkpoint, and a resumed run continues as if nothing had happened.

    python -m pytest -q test_faults.py
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import bench
import checkpoint
import compare
import eval_bounds
import hf
import plots
import prepare
import sample
import sweep
import train
from checkpoint import load_checkpoint
from configurator import ConfigError, cli
from conftest import HERE, case_run_keys, run_args
from files import WriteError
from model import GPT

TIMING = (
    "tokens_per_s",
    "mean_tokens_per_s",
    "peak_mem_mb",
)  # what differs between two runs of the same computation


def snapshot(folder):
    """{relative path: bytes} of every file below folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


@pytest.fixture(scope="module")
def world(char_data, tmp_path_factory):
    """A folder with what a user has: a small dataset (val of 40 tokens), another character set, a
    base trained on one part of the data, a LoRA run on the other with its bounds, a file where a folder
    is expected."""
    root = tmp_path_factory.mktemp("world")
    text = root / "small.txt"
    text.write_text("to be, or not to be: that is the question.\n" * 12)
    prepare.main(["shakespeare_char", f"--input={text}", f"--out_dir={root / 'small'}"])
    other = root / "other.txt"
    other.write_text("ZZZ qqq 123 456 789 !!! " * 400)
    prepare.main(["shakespeare_char", f"--input={other}", f"--out_dir={root / 'digits'}"])
    shutil.copytree(char_data, root / "parts")  # the base on one part, the LoRA on the other: boundable
    prepare.split_parts(str(root / "parts"), 0.5)
    parts = str(root / "parts")
    train.train(run_args(parts, root / "base", max_iters=4, eval_interval=4, data_part="prior"), environ={})
    train.train(
        run_args(
            parts,
            root / "lora",
            adapter="lora",
            lora_rank=2,
            init_from=str(root / "base"),
            max_iters=4,
            eval_interval=4,
            data_part="bound",
        ),
        environ={},
    )
    eval_bounds.main(
        [
            f"--out_dir={root / 'lora'}",
            "--eval_blocks=20",
            "--eval_docs=10",
            "--exact_max_tokens=0",
            "--device=cpu",
        ]
    )
    os.makedirs(root / "only_adapter")
    (root / "only_adapter" / "adapter.safetensors").write_bytes(
        (root / "lora" / "adapter.safetensors").read_bytes()
    )
    (root / "a_file").write_text("not a folder")
    hf.main([f"--out_dir={root / 'lora'}", f"--export_dir={root / 'peft_ok'}"])
    for name, edit in (
        ("list", lambda cfg: [cfg]),
        ("alpha_str", lambda cfg: dict(cfg, lora_alpha="16")),
        ("r0", lambda cfg: dict(cfg, r=0)),
        ("noalpha", lambda cfg: {k: v for k, v in cfg.items() if k != "lora_alpha"}),
        ("cut", None),
        ("nan", None),
    ):
        shutil.copytree(root / "peft_ok", root / f"peft_{name}", ignore=shutil.ignore_patterns("base"))
        cfg = json.loads((root / "peft_ok" / "adapter_config.json").read_text())
        (root / f"peft_{name}" / "adapter_config.json").write_text(json.dumps(edit(cfg) if edit else cfg))
    weights = root / "peft_cut" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    from safetensors.torch import load_file, save_file

    tensors = load_file(root / "peft_nan" / "adapter_model.safetensors")
    next(iter(tensors.values()))[0] = float("nan")
    save_file(tensors, root / "peft_nan" / "adapter_model.safetensors")
    hf.main(
        [f"--import_from={root / 'peft_ok'}", f"--out_dir={root / 'imported'}", f"--data_dir={char_data}"]
    )
    shutil.copytree(char_data, root / "bigids", ignore=shutil.ignore_patterns("meta.json"))
    ids = np.fromfile(root / "bigids" / "val.bin", dtype=np.uint16)
    ids[7] = 300  # an id the 65-character base has no row for
    ids.tofile(root / "bigids" / "val.bin")
    shutil.copytree(char_data, root / "cutmeta")
    (root / "cutmeta" / "meta.json").write_text((root / "small" / "meta.json").read_text()[:40])
    (root / "latin1.txt").write_bytes("café, naïve\n".encode("latin-1") * 50)
    (root / "wide.txt").write_text(
        "".join(chr(i) for i in [*range(0x20, 0xD800), *range(0xE000, 0xE000 + 12000)]), encoding="utf-8"
    )
    return root


def T(char_data, root, **kw):
    """train.py's argv for a tiny run in root/new unless out_dir is given."""
    kw.setdefault("out_dir", root / "new")
    return run_args(char_data, kw.pop("out_dir"), **kw)


CASES = [
    # (script, argv builder, words the one line must hold)
    ("train", lambda d, r: T(d, r, learning_rate=-1e-3), "learning_rate must be in (0, inf), got -0.001"),
    ("train", lambda d, r: T(d, r, learning_rate="1e999"), "learning_rate must be in (0, inf), got inf"),
    ("train", lambda d, r: T(d, r, lora_rank=0, adapter="lora"), "lora_rank must be in [1, inf)"),
    ("train", lambda d, r: T(d, r, dropout=1.0), "dropout must be in [0, 1)"),
    (
        "train",
        lambda d, r: T(d, r, adapter="sublora", allocation_ratio=1.5),
        "allocation_ratio must be in [0, 1]",
    ),
    (
        "train",
        lambda d, r: T(str(r / "small"), r, block_size=64),
        "small/val.bin holds 52 tokens, not more than block_size 64",
    ),
    (
        "train",
        lambda d, r: T(str(r / "small"), r, block_size=100000),
        "small/train.bin holds 464 tokens, not more than block_size 100000",
    ),
    ("train", lambda d, r: T(d, r, out_dir=r / "a_file" / "run"), "is a file; choose another --out_dir"),
    ("train", lambda d, r: T(d, r, out_dir=r / "only_adapter"), "already holds a run (adapter.safetensors)"),
    (
        "train",
        lambda d, r: T(d, r, out_dir=r / "lora", init_from="resume", adapter="lora", n_layer=4),
        "a resumed run keeps its model; drop --n_layer",
    ),
    (
        "train",
        lambda d, r: T(str(r / "digits"), r, adapter="lora", init_from=str(r / "base")),
        "characters the base never saw: '12456789'",
    ),
    ("train", lambda d, r: T(d, r) + ["--dataset=nope", "--data_dir="], "prepare it with prepare.py"),
    ("train", lambda d, r: T(d, r, adapter="sora", sora_lambda=-1.0), "sora_lambda must be in [0, inf)"),
    ("train", lambda d, r: T(d, r, nonfinite="maybe"), "nonfinite must be one of 'stop', 'skip'"),
    ("train", lambda d, r: T(d, r, dtype="float16"), "dtype='float16' needs a CUDA device"),
    (
        "prepare",
        lambda d, r: ["shakespeare_char", f"--input={r / 'empty.txt'}", f"--out_dir={r / 'small'}"],
        "too few for a train and a val split",
    ),
    (
        "prepare",
        lambda d, r: ["shakespeare_char", f"--input={r / 'other.txt'}", f"--out_dir={r / 'small'}"],
        "already holds another prepared dataset (train.bin, val.bin, meta.json differ): pass --overwrite=True",
    ),
    (
        "prepare",
        lambda d, r: [
            "shakespeare_char",
            f"--input={r / 'small.txt'}",
            f"--out_dir={r / 'x'}",
            "--val_fraction=1.5",
        ],
        "--val_fraction must be in (0, 1)",
    ),
    (
        "prepare",
        lambda d, r: [
            "shakespeare_char",
            f"--input={r / 'other.txt'}",
            f"--out_dir={r / 'x'}",
            f"--vocab_from={r / 'small'}",
        ],
        "outside the vocabulary",
    ),
    (
        "prepare",
        lambda d, r: ["shakespeare_char", f"--input={r / 'small.txt'}", f"--out_dir={r / 'a_file'}"],
        "is a file",
    ),
    (
        "sample",
        lambda d, r: [f"--out_dir={r / 'lora'}", "--num_samples=0", "--device=cpu"],
        "num_samples must be in [1, inf)",
    ),
    (
        "sample",
        lambda d, r: [f"--out_dir={r / 'lora'}", "--temperature=-1", "--device=cpu"],
        "temperature must be in [0, inf)",
    ),
    (
        "sample",
        lambda d, r: [f"--out_dir={r / 'lora'}", "--device=gpu"],
        "device must be 'cpu', 'cuda', 'cuda:N' or 'mps'",
    ),
    (
        "eval_bounds",
        lambda d, r: [f"--out_dir={r / 'lora'}", "--confidence=1.5", "--device=cpu"],
        "confidence must be in (0, 1)",
    ),
    ("eval_bounds", lambda d, r: [f"--out_dir={r / 'lora'}", "--device=cpu"], "already holds bounds.json"),
    (
        "eval_bounds",
        lambda d, r: [f"--out_dir={r / 'lora'}", "--alphas=0,0.5", "--device=cpu"],
        "every α in --alphas",
    ),
    ("bench", lambda d, r: ["--reps=0", "--device=cpu"], "reps must be in [1, inf)"),
    ("sweep", lambda d, r: ["--allocations=fixed:x", f"--sweep_dir={r / 'sw'}"], "cannot be read"),
    (
        "compare",
        lambda d, r: ["--methods=lora,nope", f"--out_dir={r / 'cmp'}"],
        "unknown method(s) ['lora', 'nope']",
    ),
    ("compare", lambda d, r: ["--grid=2", f"--out_dir={r / 'cmp'}"], "grid is the odd number"),
    ("hf", lambda d, r: [f"--out_dir={r / 'base'}"], "holds no adapter (adapter='none')"),
    ("hf", lambda d, r: [f"--out_dir={r / 'lora'}", f"--export_dir={r / 'lora'}"], "is not empty"),
    ("hf", lambda d, r: [f"--import_from={r / 'lora'}", f"--out_dir={r / 'x'}"], "not a PEFT adapter folder"),
    (
        "hf",
        lambda d, r: [f"--import_from={r / 'lora'}", f"--out_dir={r / 'lora'}"],
        "already holds a run (ckpt.pt",
    ),
    (
        "hf",
        lambda d, r: [f"--import_from={r / 'peft_list'}", f"--out_dir={r / 'x'}"],
        "holds a JSON list, not the object",
    ),
    (
        "hf",
        lambda d, r: [f"--import_from={r / 'peft_alpha_str'}", f"--out_dir={r / 'x'}"],
        "lora_alpha must be a finite number > 0",
    ),
    (
        "hf",
        lambda d, r: [f"--import_from={r / 'peft_r0'}", f"--out_dir={r / 'x'}"],
        "r must be a finite number > 0, got 0",
    ),
    (
        "hf",
        lambda d, r: [f"--import_from={r / 'peft_cut'}", f"--out_dir={r / 'x'}"],
        "is not a readable safetensors file",
    ),
    (
        "hf",
        lambda d, r: [f"--import_from={r / 'peft_nan'}", f"--out_dir={r / 'x'}"],
        "hold nan or inf values",
    ),
    (
        "hf",
        lambda d, r: [f"--import_from={r / 'peft_ok'}", f"--out_dir={r / 'only_adapter'}"],
        "already holds a run (adapter.safetensors)",
    ),
    (
        "train",
        lambda d, r: T(d, r, out_dir=r / "imported", init_from="resume", adapter="lora"),
        "holds no training state (an imported adapter): fine-tune on top of it with --init_from=",
    ),
    ("train", lambda d, r: T(str(r / "cutmeta"), r), "meta.json is not readable JSON"),
    (
        "train",
        lambda d, r: T(str(r / "bigids"), r, adapter="lora", init_from=str(r / "base")),
        "bigids/val.bin holds token id 300, beyond the model's vocabulary of 65",
    ),
    (
        "prepare",
        lambda d, r: ["shakespeare_char", f"--input={r / 'latin1.txt'}", f"--out_dir={r / 'x'}"],
        "latin1.txt is not UTF-8 text",
    ),
    (
        "prepare",
        lambda d, r: ["shakespeare_char", f"--input={r / 'wide.txt'}", f"--out_dir={r / 'x'}"],
        "distinct characters, more than the 65,536 ids",
    ),
    (
        "eval_bounds",
        lambda d, r: [f"--out_dir={r / 'lora'}", "--topk=0", "--device=cpu"],
        "every k in --topk must be",
    ),
    (
        "eval_bounds",
        lambda d, r: [f"--out_dir={r / 'lora'}", "--choices=seed", "--device=cpu"],
        "--choices item 'seed' is not name=count",
    ),
]
MAINS = {
    "train": train.train,
    "prepare": prepare.main,
    "sample": sample.sample,
    "eval_bounds": eval_bounds.main,
    "bench": bench.main,
    "sweep": sweep.sweep,
    "hf": hf.main,
    "compare": compare.compare,
}


@pytest.mark.parametrize("script, argv, words", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_a_mistake_ends_in_one_line_and_changes_no_file(script, argv, words, char_data, world):
    (world / "empty.txt").write_text("")
    before = snapshot(world)
    with pytest.raises(SystemExit) as exit_info:
        cli(MAINS[script], [str(a) for a in argv(char_data, world)])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
    assert words in message, message
    assert snapshot(world) == before  # nothing in the way was written, moved or removed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_a_missing_gpu_is_one_line(char_data, world):
    with pytest.raises(SystemExit, match="torch sees no CUDA GPU here"):
        cli(train.train, T(char_data, world, device="cuda"))


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch):
    def broken(argv):
        raise OSError("disk on fire")

    with pytest.raises(
        SystemExit, match=r"^error: OSError: disk on fire \(LOWRANK_DEBUG=1 shows the traceback\)$"
    ):
        cli(broken, [])
    monkeypatch.setenv("LOWRANK_DEBUG", "1")
    with pytest.raises(OSError, match="disk on fire"):
        cli(broken, [])


def rows_without_timing(out_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in plots.read_metrics(out_dir)]


def crash_at(monkeypatch, iteration, error):
    """Make train.py fail when it reaches `iteration` (the learning rate is asked for first thing)."""
    real = train.get_lr

    def get_lr(it, c):
        if it == iteration:
            error(it)
        return real(it, c)

    monkeypatch.setattr(train, "get_lr", get_lr)


def test_a_crash_then_resume_gives_the_uninterrupted_run_and_its_metrics(char_data, tmp_path, monkeypatch):
    kw = dict(max_iters=20, eval_interval=5, log_interval=1, always_save_checkpoint=True)
    train.train(run_args(char_data, tmp_path / "clean", **kw), environ={})

    def crash(it):
        raise KeyboardInterrupt  # a kill between two checkpoints

    crash_at(monkeypatch, 13, crash)
    with pytest.raises(KeyboardInterrupt):
        train.train(run_args(char_data, tmp_path / "crashed", **kw), environ={})
    assert load_checkpoint(str(tmp_path / "crashed"))["iter_num"] == 10
    (tmp_path / "crashed" / "ckpt.pt.tmp.99999").write_bytes(b"x" * 1000)  # a save killed before its rename
    monkeypatch.undo()
    train.train(run_args(char_data, tmp_path / "crashed", init_from="resume", **kw), environ={})
    assert rows_without_timing(tmp_path / "crashed") == rows_without_timing(tmp_path / "clean")
    assert not (tmp_path / "crashed" / "ckpt.pt.tmp.99999").exists()
    a, b = (load_checkpoint(str(tmp_path / d))["model"] for d in ("clean", "crashed"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_nan_stops_the_run_and_keeps_the_last_good_checkpoint(char_data, tmp_path, monkeypatch):
    kw = dict(max_iters=20, eval_interval=5, log_interval=1, always_save_checkpoint=True)
    train.train(run_args(char_data, tmp_path / "clean", **kw), environ={})

    real = train.get_lr  # a learning rate of nan at iteration 12: the weights, then the loss, become nan
    monkeypatch.setattr(train, "get_lr", lambda it, c: float("nan") if it == 12 else real(it, c))
    with pytest.raises(SystemExit) as exit_info:
        cli(train.train, run_args(char_data, tmp_path / "nan", **kw))
    message = str(exit_info.value.code)
    assert "the training loss became nan at iteration 13" in message and "still holds iteration 10" in message
    good = load_checkpoint(str(tmp_path / "nan"))
    assert good["iter_num"] == 10 and all(
        torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point()
    )
    monkeypatch.undo()
    train.train(run_args(char_data, tmp_path / "nan", init_from="resume", **kw), environ={})
    assert rows_without_timing(tmp_path / "nan") == rows_without_timing(tmp_path / "clean")


def test_skip_mode_steps_over_a_nan_gradient(char_data, tmp_path, monkeypatch, capsys):
    kw = dict(max_iters=8, eval_interval=8, log_interval=1, nonfinite="skip")
    model_forward = GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None):
        logits, loss = model_forward(self, idx, targets)
        calls["n"] += self.training
        if self.training and calls["n"] == 4:  # one poisoned training step: its loss times nan
            loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
    last = train.train(run_args(char_data, tmp_path / "skip", **kw), environ={})
    out = capsys.readouterr().out
    assert "non-finite gradient, step skipped (1 so far)" in out
    assert np.isfinite(last["val_loss"])
    ckpt = load_checkpoint(str(tmp_path / "skip"))
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_a_full_disk_keeps_the_previous_checkpoint_in_one_line(char_data, tmp_path):
    out = tmp_path / "run"
    train.train(run_args(char_data, out, max_iters=4, eval_interval=4), environ={})
    before = (out / "ckpt.pt").read_bytes()
    limit = len(before) // 2  # files may grow to half a checkpoint: the next save cannot fit

    def small_disk():
        signal.signal(
            signal.SIGXFSZ, signal.SIG_IGN
        )  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = run_args(char_data, out, init_from="resume", max_iters=8, eval_interval=4)
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "train.py"), *args],
        capture_output=True,
        text=True,
        preexec_fn=small_disk,
        cwd=HERE,
        timeout=300,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "could not write" in lines[0] and "the previous file is untouched" in lines[0]
    ), proc.stderr
    assert (out / "ckpt.pt").read_bytes() == before
    assert not [f for f in os.listdir(out) if ".tmp." in f]  # the failed temp file is gone
    assert load_checkpoint(str(out))["iter_num"] == 4


def test_a_kill_during_a_save_leaves_a_whole_checkpoint(tmp_path):
    """kill -9 at random moments of a loop of atomic saves: the file always loads whole (one version,
    never a torn mix), and the temp files the kills leave are removed at the next start."""
    path = tmp_path / "ckpt.pt"
    # each saver starts at its own version (1000 k) and says "ready" after its first save
    saver = (
        "import sys, torch, checkpoint\nv = int(sys.argv[1])\nwhile True:\n"
        f"    checkpoint.save_checkpoint({{'v': v, 't': torch.full((400_000,), float(v))}}, {str(path)!r})\n"
        "    if v % 1000 == 0:\n        print('ready', flush=True)\n    v += 1\n"
    )
    rng = np.random.default_rng(0)
    versions = set()
    for k in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", saver, str(1000 * k)], cwd=HERE, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline() == "ready\n"
        time.sleep(float(rng.uniform(0.0, 0.3)))  # a random moment of the saving loop
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        blob = torch.load(path, weights_only=True)
        assert torch.equal(blob["t"], torch.full((400_000,), float(blob["v"])))  # whole, one version
        assert blob["v"] // 1000 == k  # this saver's, written after its first save
        versions.add(blob["v"])
    assert len(versions) > 1  # the saves went on between kills
    checkpoint.lock_run_folder(str(tmp_path), "test").close()  # whatever temp files the kills left
    assert sorted(os.listdir(tmp_path)) == [".lock", "ckpt.pt"]


def test_a_run_folder_has_one_writer(char_data, tmp_path):
    """A second train.py into a folder another process is training in gets one line naming that
    process, and writes nothing; once that process is killed (kill -9) the folder is free again."""
    out = tmp_path / "busy"
    first = subprocess.Popen(
        [
            sys.executable,
            os.path.join(HERE, "train.py"),
            *run_args(char_data, out, max_iters=100000, eval_interval=100000),
        ],
        cwd=HERE,
        stdout=subprocess.PIPE,
        text=True,
    )
    for line in first.stdout:  # training is under way (iteration 0's row written): the folder is held
        if line.startswith("iter 1/"):
            break
    (out / f"ckpt.pt.tmp.{first.pid}").write_bytes(b"a save in progress")  # the running run's
    before = sorted(os.listdir(out))
    second = subprocess.run(
        [sys.executable, os.path.join(HERE, "train.py"), *run_args(char_data, out, overwrite=True)],
        capture_output=True,
        text=True,
        cwd=HERE,
    )
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 1 and len(lines) == 1, second.stderr
    assert f"is in use by pid {first.pid}" in lines[0] and "train.py" in lines[0]
    assert sorted(os.listdir(out)) == before
    first.send_signal(signal.SIGKILL)
    first.wait()
    train.train(run_args(char_data, out, overwrite=True, max_iters=2, eval_interval=2), environ={})
    assert plots.read_metrics(str(out))[-1]["iter"] == 2


@pytest.mark.parametrize("row", ["[1, 2]", '{"train_loss": 3.1}', '{"iter": "5"}'])
def test_a_damaged_metrics_row_is_one_line_before_a_resume(char_data, tmp_path, row):
    out = tmp_path / "run"
    train.train(run_args(char_data, out, max_iters=4, eval_interval=2), environ={})
    with open(out / "metrics.jsonl", "a") as f:
        f.write(row + "\n" + '{"iter": 4}\n')
    before = snapshot(out)
    with pytest.raises(SystemExit) as exit_info:
        cli(train.train, run_args(char_data, out, max_iters=6, eval_interval=2, init_from="resume"))
    message = str(exit_info.value.code)
    assert "\n" not in message and "metrics.jsonl line" in message and "is not a metrics row" in message
    assert snapshot(out) == before


def test_a_token_id_beyond_meta_vocabulary_is_one_line(char_data, tmp_path):
    """train.bin holding ids beyond its meta.json's 65 characters (written with another tokenizer): one
    line naming the file and the id, where an IndexError came from the embedding before."""
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    ids = np.fromfile(data / "train.bin", dtype=np.uint16)
    ids[::50] = 300
    ids.tofile(data / "train.bin")
    with pytest.raises(SystemExit) as exit_info:
        cli(train.train, run_args(str(data), tmp_path / "run", max_iters=2, eval_interval=2))
    message = str(exit_info.value.code)
    assert "\n" not in message and "train.bin holds token id 300, beyond the vocabulary of 65" in message


def test_the_folder_is_checked_under_its_lock(char_data, tmp_path, monkeypatch):
    """A run that finished in the folder between this run's first look and its lock (two runs started
    together) is seen under the lock: refused, its files untouched. A .lock that is a link is refused
    without writing through it."""
    out = tmp_path / "raced"
    real = checkpoint.lock_folder

    def lock_after_another_run(folder, what):
        (out / "ckpt.pt").write_bytes(b"the other run's")
        return real(folder, what)

    monkeypatch.setattr(checkpoint, "lock_folder", lock_after_another_run)
    with pytest.raises(ConfigError, match="already holds a run"):
        train.train(run_args(char_data, out, max_iters=2, eval_interval=2), environ={})
    assert (out / "ckpt.pt").read_bytes() == b"the other run's"
    monkeypatch.undo()
    target, linked = tmp_path / "precious.txt", tmp_path / "linked"
    target.write_text("keep me")
    linked.mkdir()
    (linked / ".lock").symlink_to(target)
    with pytest.raises(WriteError, match=r"\.lock cannot be the lock file \(a link\): remove it"):
        train.train(run_args(char_data, linked, max_iters=2, eval_interval=2), environ={})
    assert target.read_text() == "keep me"


def test_ctrl_c_ends_in_one_line_and_the_run_resumes(char_data, tmp_path, monkeypatch):
    kw = dict(max_iters=8, eval_interval=4, log_interval=1)
    train.train(run_args(char_data, tmp_path / "clean", **kw), environ={})

    def interrupt(it):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        crash_at(m, 6, interrupt)
        with pytest.raises(SystemExit) as exit_info:
            cli(train.train, run_args(char_data, tmp_path / "ctrl_c", **kw))
    message = str(exit_info.value.code)
    assert (
        message.startswith("error: interrupted (Ctrl-C)")
        and "\n" not in message
        and "--init_from=resume" in message
    )
    with open(
        tmp_path / "ctrl_c" / "metrics.jsonl", "a"
    ) as f:  # a kill during a write: the last line cut short
        f.write('{"iter": 5, "train_lo')
    train.train(run_args(char_data, tmp_path / "ctrl_c", init_from="resume", **kw), environ={})
    assert rows_without_timing(tmp_path / "ctrl_c") == rows_without_timing(tmp_path / "clean")


def test_a_folder_with_another_runs_artifacts_holds_a_run(char_data, tmp_path, capsys):
    """loss.png, bounds.json and a peft/ export with no checkpoint: refused without --overwrite, and
    cleared with it (no stale bound beside the new checkpoint)."""
    out = tmp_path / "old"
    (out / "peft").mkdir(parents=True)
    (out / "loss.png").write_bytes(b"png")
    (out / "bounds.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"already holds a run \(loss.png, bounds.json, peft\)"):
        train.train(run_args(char_data, out, max_iters=2, eval_interval=2), environ={})
    train.train(run_args(char_data, out, max_iters=2, eval_interval=2, overwrite=True), environ={})
    assert not (out / "bounds.json").exists() and not (out / "peft").exists() and (out / "loss.png").exists()


def test_every_family_resumes_bit_for_bit_mid_schedule(family_case, char_data, tmp_path, monkeypatch):
    """Killed at iteration 13 and resumed from its checkpoint at 10, with the same max_iters, a run of
    every family case (each mid-schedule at the crash) ends with the uninterrupted run's tensors (model,
    adapter files, the family's own state such as AdaLoRA's importance scores) and metrics rows, exactly."""
    kw = case_run_keys(
        family_case, dropout=0.1, max_iters=20, eval_interval=5, log_interval=1, lr_decay_iters=20
    )
    train.train(run_args(char_data, tmp_path / "clean", **kw), environ={})

    def crash(it):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        crash_at(m, 13, crash)
        with pytest.raises(KeyboardInterrupt):
            train.train(run_args(char_data, tmp_path / "crashed", **kw), environ={})
    # resumed without repeating a flag: the checkpoint holds the recipe (data, schedule, family keys)
    train.train([f"--out_dir={tmp_path / 'crashed'}", "--init_from=resume", "--device=cpu"], environ={})
    assert rows_without_timing(tmp_path / "crashed") == rows_without_timing(tmp_path / "clean")
    a, b = (load_checkpoint(str(tmp_path / d)) for d in ("clean", "crashed"))
    for key in ("model", "family"):
        flat_a, flat_b = (
            torch.utils._pytree.tree_flatten(a.get(key))[0],
            torch.utils._pytree.tree_flatten(b.get(key))[0],
        )
        assert len(flat_a) == len(flat_b) and all(
            torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(flat_a, flat_b)
        ), key
    for f in ("adapter.safetensors", "adapter_pruned.safetensors"):
        if (tmp_path / "clean" / f).exists():
            sa, sb = (
                checkpoint.read_adapter_file(str(tmp_path / d / f))["state"] for d in ("clean", "crashed")
            )
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), f


def test_the_readme_resume_pattern_continues_the_rescaled_schedule(char_data, tmp_path, monkeypatch, capsys):
    """A config file planned for 400 iterations, run with --max_iters=20 (warmup and decay rescaled),
    killed at 13, then resumed with the same command plus --init_from=resume: the learning rate of
    every iteration and the final weights equal the uninterrupted run's. A config file that now says
    another learning rate is overruled by the checkpoint, with a note; the command line's is taken, with
    a note."""
    config = tmp_path / "recipe.py"
    config.write_text(
        "adapter = 'lora'\nlora_rank = 2\nn_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 32\n"
        "batch_size = 8\neval_iters = 2\neval_interval = 5\nlog_interval = 1\ndropout = 0.1\n"
        "init_from = 'scratch'\nmax_iters = 400\nwarmup_iters = 40\nlr_decay_iters = 400\n"
    )
    command = [str(config), "--device=cpu", f"--data_dir={char_data}", "--max_iters=20"]
    train.train([*command, f"--out_dir={tmp_path / 'clean'}"], environ={})
    with monkeypatch.context() as m:
        crash_at(m, 13, lambda it: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            train.train([*command, f"--out_dir={tmp_path / 'crashed'}"], environ={})
    config.write_text(config.read_text() + "learning_rate = 0.5\n")  # edited since: the checkpoint wins
    capsys.readouterr()
    train.train([*command, f"--out_dir={tmp_path / 'crashed'}", "--init_from=resume"], environ={})
    assert "the checkpoint's learning_rate=0.001 (not 0.5 from " in capsys.readouterr().out
    assert rows_without_timing(tmp_path / "crashed") == rows_without_timing(tmp_path / "clean")
    lrs = {r["iter"]: r["lr"] for r in plots.read_metrics(tmp_path / "clean")}
    assert lrs[1] == pytest.approx(1e-3 * 2 / 3) and lrs[20] == pytest.approx(
        train.get_lr(
            20, dict(decay_lr=True, learning_rate=1e-3, min_lr=1e-4, warmup_iters=2, lr_decay_iters=20)
        )
    )
    a, b = (load_checkpoint(str(tmp_path / d))["model"] for d in ("clean", "crashed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    train.train([f"--out_dir={tmp_path / 'crashed'}", "--init_from=resume", "--max_iters=22"], environ={})
    assert "this resume changes max_iters 20 -> 22 (command line)" in capsys.readouterr().out
    assert load_checkpoint(str(tmp_path / "crashed"))["config"]["lr_decay_iters"] == 20


def test_a_kill_between_the_two_files_of_a_save_is_detected(char_data, tmp_path, monkeypatch, capsys):
    """Each file of a save records its iteration; killed after the adapter file and before the
    checkpoint, the pair disagrees, and the resume says so, continues from the checkpoint, and leaves a
    consistent pair."""
    kw = dict(adapter="lora", lora_rank=2, max_iters=10, eval_interval=5)
    out = tmp_path / "run"
    real, saves = train.save_checkpoint, []

    def killed_on_second(ckpt, path):
        saves.append(ckpt["iter_num"])
        if len(saves) == 2:
            raise KeyboardInterrupt
        real(ckpt, path)

    with monkeypatch.context() as m:
        m.setattr(train, "save_checkpoint", killed_on_second)
        with pytest.raises(KeyboardInterrupt):
            train.train(run_args(char_data, out, **kw), environ={})
    assert checkpoint.read_adapter_file(str(out / "adapter.safetensors"))["iter_num"] == 10
    assert load_checkpoint(str(out))["iter_num"] == 5
    capsys.readouterr()
    train.train(run_args(char_data, out, init_from="resume", **kw), environ={})
    assert "adapter.safetensors holds iteration 10 but ckpt.pt iteration 5" in capsys.readouterr().out
    assert (
        checkpoint.read_adapter_file(str(out / "adapter.safetensors"))["iter_num"]
        == load_checkpoint(str(out))["iter_num"]
    )


def test_sample_and_bounds_use_the_vocabulary_the_checkpoint_carries(char_data, tmp_path):
    """With its data folder gone, a run still samples (its checkpoint carries the vocabulary); with the
    folder re-prepared from another text, eval_bounds refuses in one line instead of scoring other ids."""
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    out = tmp_path / "run"
    train.train(run_args(str(data), out, max_iters=2, eval_interval=2), environ={})
    shutil.rmtree(data)
    texts = sample.sample(
        [f"--out_dir={out}", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=8", "--device=cpu"],
        environ={},
    )
    assert texts[0].startswith("ROMEO:")
    (tmp_path / "other.txt").write_text("ZZZ qqq 123 456 789 !!! " * 400)
    prepare.main(["shakespeare_char", f"--input={tmp_path / 'other.txt'}", f"--out_dir={data}"])
    with pytest.raises(SystemExit) as exit_info:
        cli(eval_bounds.main, [f"--out_dir={out}", "--eval_blocks=8", "--eval_docs=8", "--device=cpu"])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "was trained on a 65-character vocabulary" in message, message


def test_a_peft_adapter_without_lora_alpha_imports_with_peft_default(world):
    """PEFT's LoraConfig defaults lora_alpha to 8: an adapter_config.json without it imports as PEFT
    would load it, scaling 8 / r."""
    model, info, _ = hf.import_peft(str(world / "peft_noalpha"))
    r = json.loads((world / "peft_ok" / "adapter_config.json").read_text())["r"]
    assert {s["scaling"] for s in info["layers"].values()} == {8 / r}


def test_a_diverged_checkpoint_and_a_bad_path_say_what_they_are(char_data, tmp_path):
    """A checkpoint whose adapter holds nan is refused naming the adapter (not the base) and the
    tensors, by every reader; an OSError on a path the user gave says the path and what to do."""
    base, lora = tmp_path / "base", tmp_path / "lora"
    train.train(run_args(char_data, base, max_iters=2, eval_interval=2), environ={})
    train.train(
        run_args(char_data, lora, adapter="lora", init_from=str(base), max_iters=2, eval_interval=2),
        environ={},
    )
    ckpt = load_checkpoint(str(lora))
    ckpt["model"]["transformer.h.1.attn.c_attn.lora_B"][0, 0] = float("nan")
    checkpoint.save_checkpoint(ckpt, str(lora / "ckpt.pt"))
    for main, argv in (
        (sample.sample, [f"--out_dir={lora}", "--device=cpu", "--max_new_tokens=2"]),
        (train.train, run_args(char_data, tmp_path / "ft", adapter="lora", init_from=str(lora))),
        (hf.main, [f"--out_dir={lora}"]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli(main, argv)
        assert str(exit_info.value.code) == (
            f"error: {lora}/ckpt.pt holds nan or inf in its adapter (transformer.h.1.attn.c_attn.lora_B): the "
            "run diverged; use an earlier checkpoint or train again with a lower learning rate"
        )
    with pytest.raises(SystemExit) as exit_info:
        cli(sample.sample, [f"--out_dir={base}", "--device=cpu", f"--prompts={tmp_path}"])
    assert str(exit_info.value.code) == (
        f"error: {tmp_path}: Is a directory: a folder stands where a file is expected: name the file inside it"
    )
