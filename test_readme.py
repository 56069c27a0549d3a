"""The README's command lines, run as written at a tiny size: every line of its shell code blocks that
needs neither a download nor a GPU, in the README's order, in a scratch folder that holds the repo's
scripts and configs (so the relative paths of the README resolve as they do in a clone)."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

import train
from checkpoint import load_checkpoint
from configurator import configure
from conftest import HERE, SHAKESPEARE

# appended to every train.py line (later --key=value wins): seconds per run instead of minutes
TINY = dict(
    device="cpu",
    compile=False,
    n_layer=2,
    n_head=2,
    n_embd=64,
    block_size=32,
    batch_size=4,
    eval_iters=2,
    eval_interval=4,
    log_interval=2,
    max_iters=4,
    warmup_iters=1,
    lr_decay_iters=4,
    intrinsic_dim=300,
)


def readme_commands(lines=None):
    """(env, argv) of every command line in the README's un-tagged code blocks (or in `lines`),
    comments dropped."""
    lines = lines or open(os.path.join(HERE, "README.md"), encoding="utf-8").read().splitlines()
    commands = []
    fence = None  # the open block's language tag ('' for a shell block), None outside blocks
    for line in lines:
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence != "" or not re.match(
            r"([A-Z_]+=\S* )*(python|torchrun|make) ", line
        ):  # prose, code, output
            continue
        words = shlex.split(line, comments=True)
        env = {}
        while re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        commands.append((env, words))
    return commands


def needs_download_or_gpu(words):
    return words[0] == "make" or any("gpt2" in w or "cuda" in w for w in words)


def tiny_args(words, keys):
    over = dict(TINY)
    if "--init_from=resume" in words:  # continue past the first run's last iteration
        over.update(max_iters=8, lr_decay_iters=8)
    return [f"--{k}={v}" for k, v in over.items() if k in keys]


def run_as_written(commands, tmp_path, monkeypatch):
    """Run each command in a scratch folder holding the repo's scripts; [(line, stdout)] of those run."""
    for name in os.listdir(HERE):
        if name.endswith(".py") or name in ("config", "testdata"):
            os.symlink(os.path.join(HERE, name), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    ran = []
    for env, words in commands:
        if needs_download_or_gpu(words):
            continue
        launcher = (
            [sys.executable, "-m", "torch.distributed.run"] if words[0] == "torchrun" else [sys.executable]
        )
        script = next(w for w in words if w.endswith(".py"))
        args = words[1:]
        if script == "prepare.py" and not any(a.startswith("--input") for a in args):
            args += [f"--input={SHAKESPEARE}"]  # the one download of the README: the same file, local
        elif script == "train.py":
            args += tiny_args(words, train.DEFAULTS)
        elif script == "sample.py":
            args += ["--max_new_tokens=16", "--num_samples=1", "--device=cpu"]
        elif script == "sweep.py":  # one run of the grid, tiny
            args += [
                "--intrinsic_dims=300",
                "--allocations=fixed:0.5",
                "--seeds=0",
                "--max_iters=4",
                "--train_args=" + " ".join(tiny_args(words, train.DEFAULTS)),
            ]
        elif script == "compare.py":  # one method, one learning rate, seconds
            args += ["--size=tiny", "--grid=1", "--methods=lora_r1", "--device=cpu"]
        elif script == "eval_bounds.py":
            args += [
                "--eval_blocks=8",
                "--eval_docs=8",
                "--batch_size=8",
                "--device=cpu",
                "--exact_max_tokens=0",
            ]
            args += ["--qat_steps=5"] if any(a.startswith("--qat_steps") for a in args) else []
        run_env = dict(os.environ, OMP_NUM_THREADS="1", **env)
        proc = subprocess.run(launcher + args, capture_output=True, text=True, env=run_env, timeout=300)
        shown = " ".join(words)
        assert proc.returncode == 0, f"{shown}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, shown
        if script == "train.py":  # the run reached the iteration asked for, in the folder the line names
            c = configure(train.DEFAULTS, args[args.index(script) + 1 :], env, train.TEST_MODE)
            rows = [json.loads(line) for line in open(os.path.join(c["out_dir"], "metrics.jsonl"))]
            assert rows[-1]["iter"] == c["max_iters"] and rows[-1]["val_loss"] is not None, shown
            evals = [r["val_loss"] for r in rows if r["val_loss"] is not None]
            if (
                load_checkpoint(c["out_dir"])["config"]["init_from"] != "scratch"
            ):  # a fine-tune improves its base
                assert evals[-1] < evals[0], (shown, evals)
        ran.append((shown, proc.stdout))
    return ran


def test_every_readme_command_runs_as_written(tmp_path, monkeypatch):
    ran = run_as_written(readme_commands(), tmp_path, monkeypatch)
    scripts = {next(w for w in shown.split() if w.endswith(".py")) for shown, _ in ran}
    assert scripts == {
        "prepare.py",
        "train.py",
        "sample.py",
        "sweep.py",
        "eval_bounds.py",
        "hf.py",
        "compare.py",
    }
    assert any(s.startswith("torchrun") for s, _ in ran) and any(
        s.startswith("python train.py --") for s, _ in ran
    )
    auto = next(out for s, out in ran if s == "python train.py --max_iters=300")
    assert "fine-tunes the trained base in out-shakespeare-char/" in auto  # USE_LORA=True found the base


def test_every_command_of_train_docstring_runs_as_written(tmp_path, monkeypatch):
    lines = ["```", *(line.strip() for line in train.__doc__.splitlines()), "```"]
    ran = run_as_written(readme_commands(lines), tmp_path, monkeypatch)
    assert len(ran) >= 6


@pytest.mark.parametrize(
    "name", ["train", "sample", "eval_bounds", "bench", "sweep", "prepare", "hf", "compare"]
)
def test_help_lists_every_key_with_its_default_and_meaning(name, capsys):
    """--help is generated from the globals the configurator reads (and the comments beside them), so
    a key cannot be missing from it; prepare.py lists its options."""
    import importlib

    module = importlib.import_module(name)
    main = {"train": "train", "sample": "sample", "sweep": "sweep", "compare": "compare"}.get(name, "main")
    with pytest.raises(SystemExit) as exit_info:
        getattr(module, main)(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    if name == "prepare":
        assert all(f"--{key}=" in text for key in module.OPTIONS)
        return
    lines = {line.split("=", 1)[0].strip(): line for line in text.splitlines() if line.startswith("  --")}
    assert set(lines) == {f"--{k}" for k in module.DEFAULTS}
    for key, value in module.DEFAULTS.items():
        line = lines[f"--{key}"]
        shown, _, meaning = line.strip().partition(" ")
        assert shown == f"--{key}={value!r}" and meaning.strip(), line


def test_after_the_demo_every_config_runs_as_written(char_data, tmp_path, monkeypatch):
    """With only the demo's base (out-demo-base/) in the working folder, every config in config/ that
    needs no download runs: the fine-tuning configs find that base (init_from='auto')."""
    for name in os.listdir(HERE):
        if name.endswith(".py") or name in ("config", "testdata"):
            os.symlink(os.path.join(HERE, name), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    import shutil

    import prepare

    shutil.copytree(char_data, "parts")  # the character data split into a prior and a bound part
    prepare.split_parts("parts", 0.5)
    tiny = [f"--{k}={v}" for k, v in TINY.items()] + ["--data_dir=parts", "--vera_rank=8"]
    train.train(["config/train_shakespeare_char.py", "--out_dir=out-demo-base", *tiny], environ={})
    train.train(["config/prior_shakespeare_char.py", *tiny], environ={})  # its out_dir is the next one's base
    done = ("train_shakespeare_char.py", "prior_shakespeare_char.py")
    for config in sorted(os.listdir(os.path.join(HERE, "config"))):
        if "gpt2" in config or config in done:
            continue
        last = train.train([f"config/{config}", "--out_dir=out-" + config[:-3], *tiny], environ={})
        assert last["iter"] == TINY["max_iters"] and last["val_loss"] is not None, config
        base = load_checkpoint("out-" + config[:-3])["config"]["init_from"]
        want = (
            "out-prior-char"
            if "prior" in config
            else "out-demo-base"
            if config.startswith("finetune")
            else "scratch"
        )
        assert base == want, config


def test_the_readme_api_line_is_adapters_all():
    """docs/methods.md's "Python API" paragraph (the README points to it) names exactly adapters.__all__,
    and each name exists."""
    import adapters

    text = open(os.path.join(HERE, "docs", "methods.md"), encoding="utf-8").read()
    paragraph = text[text.index("Python API (`adapters.__all__`):") :].split("\n\n")[0]
    named = set(re.findall(r"`(\w+)`", paragraph)) - {"__all__"}
    assert named == set(adapters.__all__)
    assert all(hasattr(adapters, name) for name in adapters.__all__)


RESULTS = ("bench", "compare")  # the folders of measured results: tables and JSON that commands wrote


def test_every_measured_number_in_the_readme_tables_is_in_a_results_file():
    """A number in a README table with a decimal point, a thousands separator or a percent sign is a
    measurement: it must appear, as printed, in a results file that a command wrote (bench/, compare/),
    so a refreshed run and the text cannot drift apart unnoticed."""
    text = ""
    for folder in RESULTS:
        for name in sorted(os.listdir(os.path.join(HERE, folder))):
            if name.endswith((".md", ".json")):
                text += open(os.path.join(HERE, folder, name), encoding="utf-8").read()
    rows = [line for line in open(os.path.join(HERE, "README.md"), encoding="utf-8") if line.startswith("| ")]
    numbers = [
        n for row in rows for n in re.findall(r"\d[\d,]*\.\d+%?|\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?%", row)
    ]
    assert len(numbers) > 20  # the tables are there and were read
    missing = [n for n in numbers if n not in text]
    assert not missing, f"README table numbers found in no results file: {missing}"
