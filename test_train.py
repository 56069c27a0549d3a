"""
train.py and sample.py end to end on Tiny Shakespeare with tiny models: pretrain, LoRA fine-tune,
sample, resume, torchrun, bad input, atomic checkpoints, environment variables, wandb offline.

    python -m pytest -q test_train.py
"""

import glob
import os
import subprocess
import sys
import time

import pytest
import torch

import adapters
import checkpoint
import plots
import train
from adapters import AdapterError, adapter_layers
from checkpoint import CheckpointError, load_checkpoint
from configurator import ConfigError
from conftest import run_args
from prepare import read_meta
from sample import sample

HERE = os.path.dirname(os.path.abspath(__file__))


def evals(out_dir):
    return [r["val_loss"] for r in plots.read_metrics(out_dir) if r["val_loss"] is not None]


def step_losses(out_dir):
    return {r["iter"]: r["train_loss"] for r in plots.read_metrics(out_dir) if r["train_loss"] is not None}


@pytest.fixture(scope="module")
def pretrained(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    train.train(run_args(char_data, out, max_iters=60, eval_interval=30), environ={})
    return str(out)


def test_pretrain_lowers_val_loss(pretrained):
    v = evals(pretrained)
    assert len(v) == 3 and v[-1] < v[0] - 1.0  # from ~ln 65 = 4.17 to well below


def test_every_run_writes_its_loss_curve_and_runs_compare_on_one(pretrained, tmp_path):
    import matplotlib.pyplot as plt

    import plots

    assert open(os.path.join(pretrained, "loss.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    drawn = {}
    real_save = plots.save
    plots.save = lambda fig, folder, name: (
        drawn.setdefault("lines", [line.get_ydata().tolist() for line in fig.axes[0].lines])
        and real_save(fig, folder, name)
    )
    try:
        path = plots.plot_losses([pretrained, pretrained], str(tmp_path / "both.png"))
    finally:
        plots.save = real_save
    assert os.path.isfile(path)
    rows = plots.read_metrics(pretrained)
    train_losses = [r["train_loss"] for r in rows if r["train_loss"] is not None]
    assert drawn["lines"] == [train_losses, evals(pretrained)] * 2  # each run's train and val curves
    plt.close("all")


def test_lora_finetune_and_sample(pretrained, char_data, tmp_path):
    out = tmp_path / "lora"
    last = train.train(
        run_args(
            char_data,
            out,
            init_from=pretrained,
            adapter="lora",
            lora_rank=2,
            max_iters=30,
            eval_interval=15,
            learning_rate=3e-3,
            weight_decay=0.0,
        ),
        environ={},
    )
    v = evals(out)
    assert v[0] == pytest.approx(evals(pretrained)[-1], abs=1e-6)  # starts exactly at the base model
    assert v[-1] < v[0]
    assert last["trainable_params"] / last["total_params"] < 0.05
    ckpt = load_checkpoint(str(out))
    base = load_checkpoint(pretrained)
    for name, layer_state in ckpt["model"].items():  # the frozen base is the pretrained model, untouched
        if ".base." in name:
            assert torch.equal(layer_state, base["model"][name.replace(".base.", ".")])
    assert os.path.getsize(out / "adapter.safetensors") < os.path.getsize(out / "ckpt.pt") / 5

    vocab = set(read_meta(char_data)["stoi"])
    for merge in (False, True):
        texts = sample(
            [
                f"--out_dir={out}",
                "--num_samples=2",
                "--max_new_tokens=50",
                "--start=ROMEO:",
                "--device=cpu",
                f"--merge={merge}",
            ],
            environ={},
        )
        assert len(texts) == 2
        for t in texts:
            assert t.startswith("ROMEO:") and len(t) == len("ROMEO:") + 50 and set(t) <= vocab


def test_rank_pattern_run_rebuilds_from_its_checkpoint_and_adapter_file(pretrained, char_data, tmp_path):
    """--lora_rank_pattern: the layers it names get their ranks (scaling alpha / rank), the trainable
    count is the closed form, and the checkpoint and adapter file rebuild the same model."""
    out = tmp_path / "rp"
    last = train.train(
        run_args(
            char_data,
            out,
            init_from=pretrained,
            adapter="lora",
            lora_rank=1,
            lora_alpha=2.0,
            lora_rank_pattern="lm_head=6; h.1.mlp.c_fc=3",
            max_iters=6,
            eval_interval=6,
        ),
        environ={},
    )
    model = checkpoint.build_model(load_checkpoint(str(out)))
    layers = adapter_layers(model)
    ranks = {n: m.rank for n, m in layers.items()}
    assert (
        ranks.pop("lm_head") == 6
        and ranks.pop("transformer.h.1.mlp.c_fc") == 3
        and set(ranks.values()) == {1}
    )
    assert layers["lm_head"].scaling == pytest.approx(2.0 / 6)
    assert last["trainable_params"] == sum(m.rank * (m.in_features + m.out_features) for m in layers.values())
    base = checkpoint.build_model(load_checkpoint(pretrained))
    checkpoint.load_adapter(base, str(out / "adapter.safetensors"))
    idx = torch.randint(0, 65, (2, 16))
    with torch.no_grad():
        assert torch.allclose(base.eval()(idx, idx)[0], model.eval()(idx, idx)[0], atol=1e-6)


@pytest.mark.parametrize("adapter", ["none", "lora", "sora", "adadora"])
def test_resume_reproduces_the_uninterrupted_run(char_data, tmp_path, adapter, monkeypatch):
    # dropout on, so the restored RNG state matters too
    kw = dict(adapter=adapter, dropout=0.1, lora_dropout=0.1, eval_interval=4, lr_decay_iters=8)
    train.train(run_args(char_data, tmp_path / "full", max_iters=8, **kw), environ={})
    with (
        monkeypatch.context() as m
    ):  # stopped, not finished: an interrupted run never finalizes AdaLoRA's mask
        m.setattr(adapters.RankAllocator, "finalize", lambda self: None)
        train.train(run_args(char_data, tmp_path / "part", max_iters=4, **kw), environ={})
    train.train(run_args(char_data, tmp_path / "part", max_iters=8, init_from="resume", **kw), environ={})
    full, part = step_losses(tmp_path / "full"), step_losses(tmp_path / "part")
    assert sorted(part) == list(range(8))
    for it in range(8):
        assert part[it] == pytest.approx(full[it], abs=1e-5), it
    assert evals(tmp_path / "part")[-1] == pytest.approx(evals(tmp_path / "full")[-1], abs=1e-5)


def test_torchrun_two_processes_match_one(char_data, tmp_path):
    kw = dict(max_iters=6, eval_interval=3, gradient_accumulation_steps=2, adapter="lora")
    train.train(run_args(char_data, tmp_path / "one", **kw), environ={})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(HERE, "train.py"),
        *run_args(char_data, tmp_path / "two", **kw),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert sorted(two) == list(range(6))  # rank 0 alone wrote the metrics: one row per step
    for it in range(6):
        assert two[it] == pytest.approx(one[it], abs=1e-4), it
    assert evals(tmp_path / "two") == pytest.approx(evals(tmp_path / "one"), abs=1e-4)


def test_torchrun_accumulation_is_raised_and_errors_print_once(char_data, tmp_path):
    """The README's torchrun line with the default accumulation of 1 runs (raised to one micro-batch
    per process, with a note); a config mistake prints one line, not one per process."""
    base = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(HERE, "train.py"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = run_args(char_data, tmp_path / "acc", max_iters=2, eval_interval=2, gradient_accumulation_steps=1)
    proc = subprocess.run(base + args, capture_output=True, text=True, env=env, cwd=HERE, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gradient_accumulation_steps=1 raised to 2" in proc.stdout
    assert plots.read_metrics(str(tmp_path / "acc"))[-1]["iter"] == 2
    proc = subprocess.run(
        base + args + ["--lora_rnak=4"], capture_output=True, text=True, env=env, cwd=HERE, timeout=300
    )
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("error: unknown config key 'lora_rnak'") == 1


def test_a_shorter_max_iters_scales_the_schedules(char_data, tmp_path, capsys):
    """AdaLoRA's config (300 iterations, tinit 30, tfinal 60, warmup 20) shortened to 50: the schedules
    keep their shape instead of failing (tinit >= total - tfinal) or leaving the LR at its peak."""
    cfg = os.path.join(HERE, "config", "finetune_shakespeare_adadora.py")
    train.train(
        run_args(char_data, tmp_path / "b", max_iters=2, eval_interval=2), environ={}
    )  # a base to fine-tune
    short = [
        cfg,
        f"--data_dir={char_data}",
        f"--out_dir={tmp_path / 'ada'}",
        f"--init_from={tmp_path / 'b'}",
        "--device=cpu",
        "--max_iters=50",
        "--eval_interval=50",
        "--eval_iters=2",
        "--batch_size=4",
        "--block_size=32",
    ]
    capsys.readouterr()
    train.train(short, environ={})
    rows = [r for r in plots.read_metrics(str(tmp_path / "ada")) if r["train_loss"] is not None]
    out = capsys.readouterr().out
    assert (
        "max_iters 300 -> 50" in out and "adalora_tinit 30 -> 5" in out and "lr_decay_iters 300 -> 50" in out
    )
    assert rows[-1]["lr"] == pytest.approx(
        train.get_lr(
            rows[-1]["iter"],
            dict(train.DEFAULTS, learning_rate=2e-3, min_lr=2e-4, warmup_iters=3, lr_decay_iters=50),
        )
    )
    assert rows[-1]["lr"] < 0.5 * 2e-3  # the cosine has come down, not stayed at the peak
    assert rows[-1]["rank_budget"] < rows[0]["rank_budget"]  # the budget fell within the shorter run


def test_an_adapter_without_a_base_finds_the_trained_one_or_says_what_to_run(
    char_data, tmp_path, monkeypatch, capsys
):
    """USE_LORA=True python train.py (init_from='auto'): the trained base the pretraining config or the
    demo wrote, its context taken when block_size exceeds it; none there: one line saying what to run."""
    monkeypatch.setattr(checkpoint, "AUTO_BASES", (str(tmp_path / "none"), str(tmp_path / "base")))
    with pytest.raises(ConfigError, match="needs a trained base and none is in .*run `make demo`"):
        train.train(run_args(char_data, tmp_path / "a", adapter="lora", init_from="auto"), environ={})
    train.train(
        run_args(char_data, tmp_path / "base", max_iters=2, eval_interval=2, block_size=16, init_from="auto"),
        environ={},
    )
    assert (
        load_checkpoint(str(tmp_path / "base"))["config"]["init_from"] == "scratch"
    )  # pretraining: a new model
    lora = run_args(char_data, tmp_path / "a", adapter="lora", init_from="auto", max_iters=6, eval_interval=6)
    with pytest.raises(
        ConfigError, match="--block_size=32 exceeds the model's context 16"
    ):  # asked for: refused
        train.train(lora, environ={})
    capsys.readouterr()
    t0 = time.time()
    last = train.train(
        [a for a in lora if not a.startswith("--block_size")], environ={}
    )  # the default 256: lowered
    wall = time.time() - t0
    out = capsys.readouterr().out
    assert (
        f"fine-tunes the trained base in {tmp_path / 'base'}/" in out
        and "block_size 256 -> 16, the context" in out
    )
    ckpt = load_checkpoint(str(tmp_path / "a"))
    assert ckpt["config"]["init_from"] == str(tmp_path / "base") and ckpt["model_args"]["block_size"] == 16
    # the run's mean speed leaves evals and saves out: above the naive tokens / wall time of the call
    assert last["mean_tokens_per_s"] > 6 * 8 * 16 / wall
    assert f"{last['mean_tokens_per_s']:,.0f} tok/s on average" in out


def test_env_vars_select_lora(char_data, tmp_path):
    env = {
        "USE_LORA": "True",
        "LORA_RANK": "2",
        "LORA_ALPHA": "4",
        "LORA_DROPOUT": "0.05",
        "TEST_MODE": "True",
    }
    last = train.train([f"--data_dir={char_data}", f"--out_dir={tmp_path}", "--device=cpu"], environ=env)
    assert last["iter"] == train.TEST_MODE["max_iters"]
    info = load_checkpoint(str(tmp_path))["adapter"]
    assert info["kind"] == "lora"
    assert info["settings"] == dict(rank=2, alpha=4.0, dropout=0.05, use_rslora=False)


def test_gpt2_folder_as_base_with_bpe_data(tmp_path, shakespeare_text):
    """A GPT-2 folder fine-tuned on GPT-2 tokens: cut to the run's block, its dropout inherited as for a
    base trained here; the loss falls."""
    from conftest import write_hf_gpt2
    from model import GPT, GPTConfig
    from prepare import prepare_shakespeare

    data = tmp_path / "bpe"
    data.mkdir()
    (tmp_path / "in.txt").write_text(shakespeare_text[:30000])
    prepare_shakespeare(str(data), input_path=str(tmp_path / "in.txt"))
    torch.manual_seed(0)
    hf = tmp_path / "gpt2-tiny"
    hf.mkdir()
    write_hf_gpt2(
        GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=50257, bias=True)), hf
    )
    kw = dict(
        init_from=str(hf), adapter="lora", lora_rank=2, max_iters=10, eval_interval=10, learning_rate=1e-2
    )
    args = [a for a in run_args(str(data), tmp_path / "out", **kw) if not a.startswith("--dropout=")]
    train.train(args, environ={})
    ckpt = load_checkpoint(str(tmp_path / "out"))
    assert ckpt["model_args"]["vocab_size"] == 50257 and ckpt["model_args"]["block_size"] == 32  # cropped
    assert ckpt["model_args"]["dropout"] == 0.1  # the folder's (GPT-2's resid_pdrop, unset: 0.1), not 0.2
    v = evals(tmp_path / "out")
    assert v[-1] < v[0]


# -----------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "argv, error, message",
    [
        (["--lora_rnak=4"], ConfigError, "unknown config key 'lora_rnak'"),
        (["--max_iters=ten"], ConfigError, "max_iters must be int"),
        (["--adapter=lorax"], ConfigError, "adapter must be one of"),
        (["--data_dir=/nonexistent/dir"], train.DataError, "no train.bin: run `python prepare.py"),
        (["--FORMAT=x"], ConfigError, "unknown config key 'FORMAT'"),
        (["--init_from=/nonexistent/ckpt.pt"], ConfigError, "not 'scratch'"),
        (["--compile_mode=fast"], ConfigError, "compile_mode must be one of"),
        (
            ["--adapter=sublora", "--allocation_mode=learned", "--sublora_gate_grad_width=2"],
            AdapterError,
            "gate_grad_width",
        ),
        (
            ["--adapter=lora", "--init_from=scratch", "--lora_rank_pattern=lm_head:8"],
            ConfigError,
            "item 'lm_head:8' is not 'pattern=rank'",
        ),
        (
            ["--adapter=lora", "--init_from=scratch", "--lora_rank_pattern=lm_head=0"],
            ConfigError,
            "with a rank >= 1",
        ),
        (
            ["--adapter=adalora", "--init_from=scratch", "--lora_rank_pattern=lm_head=8"],
            ConfigError,
            "not adalora .its ranks come from lora_rank and",
        ),
        (
            ["--adapter=lora", "--init_from=scratch", "--lora_rank_pattern=mlp.c_fcx=8"],
            AdapterError,
            "rank pattern 'mlp.c_fcx' matches no adapted layer",
        ),
    ],
)
def test_bad_config(argv, error, message, char_data, tmp_path):
    with pytest.raises(error, match=message):
        train.train([f"--out_dir={tmp_path}", "--device=cpu", f"--data_dir={char_data}", *argv], environ={})


def test_cli_prints_a_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "train.py"), "--lora_rnak=4"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith(
        "error: unknown config key 'lora_rnak'"
    )


def test_corrupt_and_foreign_checkpoints(pretrained, char_data, tmp_path):
    good = os.path.join(pretrained, "ckpt.pt")
    with open(good, "rb") as f:
        blob = f.read()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name, message in (
        ("cut.pt", "not a readable checkpoint"),
        ("text.pt", "not a readable checkpoint"),
        ("foreign.pt", "not a checkpoint of this repo"),
    ):
        with pytest.raises(CheckpointError, match=message):
            train.train(run_args(char_data, tmp_path / "o", init_from=str(tmp_path / name)), environ={})
        with pytest.raises(CheckpointError, match=message):
            sample([f"--out_dir={tmp_path / name}"], environ={})


def test_resume_with_another_adapter_kind_and_overwrite_guard(pretrained, char_data, tmp_path):
    out = tmp_path / "run"
    train.train(run_args(char_data, out, max_iters=2, eval_interval=2), environ={})
    with pytest.raises(
        CheckpointError,
        match="adapter='lora' \\(command line\\) but the checkpoint being resumed has adapter='none'.*drop --adapter",
    ):
        train.train(run_args(char_data, out, init_from="resume", adapter="lora"), environ={})
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        train.train(run_args(char_data, out, max_iters=2), environ={})
    assert (out / "ckpt.pt").read_bytes() == before


def test_checkpoint_is_never_half_written(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint({"format": checkpoint.FORMAT, "x": torch.ones(3)}, path)
    before = open(path, "rb").read()

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # the process dies while writing

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint({"x": torch.zeros(3)}, path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind


def test_wandb_offline(char_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    train.train(run_args(char_data, tmp_path / "o", max_iters=2, eval_interval=2, wandb_log=True), environ={})
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(runs) == 1 and os.path.getsize(runs[0]) > 0


def test_eval_only_on_resume_repeats_the_last_eval(pretrained, char_data, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(pretrained, out)
    before = (out / "ckpt.pt").read_bytes()
    train.train(run_args(char_data, out, init_from="resume", eval_only=True, max_iters=60), environ={})
    v = evals(out)
    assert v[-1] == pytest.approx(v[-2], abs=1e-6)  # the same fixed eval batches, the same weights
    assert (out / "ckpt.pt").read_bytes() == before  # an eval-only run writes no checkpoint


def test_a_fine_tune_computes_as_its_base_did(char_data, tmp_path, capsys):
    """A base pretrained with dropout 0.0 (the Shakespeare config) fine-tuned without a dropout setting
    (train.py's default is 0.2): the run takes the base's 0.0, with a note, and its first step's loss
    is the base's own eval loss (dropout 0.2 on the frozen base made it far worse). An explicit
    --dropout wins."""
    train.train(
        run_args(char_data, tmp_path / "base", max_iters=40, eval_interval=40, dropout=0.0), environ={}
    )
    base_val = evals(tmp_path / "base")[-1]
    args = [
        a
        for a in run_args(
            char_data,
            tmp_path / "lora",
            adapter="lora",
            init_from=str(tmp_path / "base"),
            max_iters=10,
            eval_interval=10,
        )
        if not a.startswith("--dropout")
    ]
    capsys.readouterr()
    train.train(args, environ={})
    assert "dropout 0.2 -> 0.0, the base's" in capsys.readouterr().out
    assert load_checkpoint(str(tmp_path / "lora"))["model_args"]["dropout"] == 0.0
    first = evals(tmp_path / "lora")
    assert first[0] == pytest.approx(base_val, abs=1e-5) and first[-1] < first[0]
    assert step_losses(tmp_path / "lora")[0] == pytest.approx(base_val, abs=0.15)
    train.train(args + [f"--out_dir={tmp_path / 'explicit'}", "--dropout=0.1"], environ={})
    assert load_checkpoint(str(tmp_path / "explicit"))["model_args"]["dropout"] == 0.1


def test_a_resume_keeps_the_adapter_it_trained(pretrained, char_data, tmp_path):
    """Resuming a rank-2 LoRA with --lora_rank=16 (or another alpha or targets) is refused in one line
    naming the keys; resumed without them, the run keeps rank 2 and its saved config says so."""
    out = tmp_path / "r2"
    kw = dict(init_from=pretrained, adapter="lora", lora_rank=2, lora_alpha=4.0, max_iters=4, eval_interval=4)
    train.train(run_args(char_data, out, **kw), environ={})
    for bad in (dict(lora_rank=16), dict(lora_alpha=8.0, lora_targets="lm_head")):
        with pytest.raises(
            CheckpointError,
            match="the checkpoint being resumed has .*drop " + ", ".join(f"--{k}" for k in bad),
        ):
            train.train(
                run_args(char_data, out, **dict(kw, init_from="resume", max_iters=8, **bad)), environ={}
            )
    with pytest.raises(
        CheckpointError,
        match=r"lora_dropout=0.3 \(LORA_DROPOUT\) but .*keeps its model; unset LORA_DROPOUT, or start",
    ):
        train.train(
            run_args(char_data, out, **dict(kw, init_from="resume", max_iters=8)),
            environ={"LORA_DROPOUT": "0.3"},
        )
    plain = [
        a for a in run_args(char_data, out, adapter="lora", init_from="resume", max_iters=8, eval_interval=4)
    ]
    train.train(plain, environ={})  # lora_rank and lora_alpha left at train.py's defaults (8, 16.0)
    ckpt = load_checkpoint(str(out))
    assert ckpt["iter_num"] == 8 and (ckpt["config"]["lora_rank"], ckpt["config"]["lora_alpha"]) == (2, 4.0)
    assert {m.rank for m in adapter_layers(checkpoint.build_model(ckpt)).values()} == {2}


def test_a_fine_tune_of_a_fine_tune_keeps_its_untied_head(char_data, pretrained, tmp_path):
    """Fine-tuning a run whose LM head was adapted merges that adapter into the head only, untying it
    from the token embedding. The new run's checkpoint holds the two tensors, and build_model gives
    back each one bit for bit (tying them again would overwrite one with the other)."""
    first, second = tmp_path / "first", tmp_path / "second"
    train.train(
        run_args(
            char_data,
            first,
            adapter="lora",
            lora_rank=2,
            init_from=pretrained,
            learning_rate=5e-2,
            max_iters=4,
            eval_interval=4,
        ),
        environ={},
    )
    train.train(
        run_args(
            char_data, second, adapter="lora", lora_rank=2, init_from=str(first), max_iters=4, eval_interval=4
        ),
        environ={},
    )
    ckpt = checkpoint.load_checkpoint(str(second))
    assert ckpt["model_args"]["tie_word_embeddings"] is False
    assert not torch.equal(ckpt["model"]["transformer.wte.weight"], ckpt["model"]["lm_head.base.weight"])
    state = checkpoint.build_model(ckpt).state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt["model"].items())
    del ckpt["model_args"][
        "tie_word_embeddings"
    ]  # as a checkpoint written before the flag: the tensors decide
    state = checkpoint.build_model(ckpt).state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt["model"].items())


def test_the_config_is_resolved_once_and_read_only(char_data, tmp_path):
    """resolve_config settles every value a run uses (here the accumulation raised to a multiple of
    the processes, and a fine-tune's dropout and block_size taken from its base) and returns a
    read-only mapping: the model set-up cannot change what the checkpoint will record."""
    base = tmp_path / "base"
    train.train(
        run_args(char_data, base, max_iters=2, eval_interval=2, dropout=0.1, block_size=16), environ={}
    )
    argv = run_args(
        char_data, tmp_path / "ft", init_from=str(base), adapter="lora", gradient_accumulation_steps=3
    )
    argv = [a for a in argv if not a.startswith(("--dropout", "--block_size"))]
    c, given, resumed, loaded = train.resolve_config(argv, {}, world=2)
    assert c["gradient_accumulation_steps"] == 4 and c["dropout"] == 0.1 and c["block_size"] == 16
    assert resumed is None and loaded["model_args"]["block_size"] == 16
    with pytest.raises(TypeError):
        c["max_iters"] = 1


def test_bfloat16_on_the_cpu_trains_in_bfloat16(char_data, tmp_path):
    """--dtype=bfloat16 on the CPU autocasts (it used to train in float32 without a word): the losses
    differ from the float32 run's, and stay close to them."""
    kw = dict(max_iters=6, eval_interval=6, log_interval=1)
    train.train(run_args(char_data, tmp_path / "fp32", **kw), environ={})
    train.train(run_args(char_data, tmp_path / "bf16", dtype="bfloat16", **kw), environ={})
    fp32, bf16 = step_losses(tmp_path / "fp32"), step_losses(tmp_path / "bf16")
    assert all(fp32[i] != bf16[i] for i in range(6)) and all(abs(fp32[i] - bf16[i]) < 0.05 for i in range(6))


def test_a_long_eval_shows_its_progress(char_data, monkeypatch):
    """An eval whose batches take 10 seconds each prints where it is every 15 seconds (split, batch,
    share of the whole eval, ETA from the time so far), so a CPU run's long eval is not silent; the
    losses are the ones a silent eval gives."""
    from contextlib import nullcontext

    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=65))
    c = dict(seed=1, block_size=16, eval_iters=4, batch_size=2)
    args = (model, c, (char_data, 65, [0, train.num_tokens(char_data, "train")]), "cpu", nullcontext(), 0, 1)
    silent = train.estimate_loss(*args)
    clock = iter(range(0, 10_000, 10))  # every call to time.time() is 10 seconds later
    monkeypatch.setattr(train.time, "time", lambda: next(clock))
    lines = []
    assert train.estimate_loss(*args, say=lines.append) == silent
    assert lines[0] == "  eval train: batch 2/4, 25% of the eval, eta 0:02:00"  # 40 s for a quarter
    assert lines[-1].startswith("  eval val: batch 4/4, 100% of the eval, eta 0:00:00")
