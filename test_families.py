"""
A family is one object: a new one, defined in this file alone and registered, trains, resumes,
samples, exports to PEFT and is bounded through the scripts, with no other file changed. And runs
written before families were objects (testdata/runs_v1, made at tiny size by the earlier code) still
load, sample and resume.

    python -m pytest -q test_families.py
"""

import json
import os
import shutil

import pytest
import torch
import torch.nn as nn

import adapters
import eval_bounds
import hf
import plots
import sample
import train
from adapters import Family, LoRALinear, register
from checkpoint import build_model, load_adapter, load_checkpoint
from conftest import run_args

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS_V1 = os.path.join(HERE, "testdata", "runs_v1")


class GainLoRALinear(LoRALinear):
    """A toy family: LoRA whose update has one trained gain, ΔW = s · g · B A (g starts at gain_init)."""

    def __init__(self, base, gain_init=1.0, **settings):
        super().__init__(base, **settings)
        self.gain = nn.Parameter(
            torch.full((), gain_init, device=base.weight.device, dtype=base.weight.dtype)
        )

    def factors(self):
        return self.full_B() * self.gain, self.lora_A, self.scaling


class GainLoRA(Family):
    kind, layer = "gainlora", GainLoRALinear
    keys = {
        "gain_init": (1.0, "(0, inf)", "the gain g at the start"),
        "gain_log_every": (2, "[1, inf)", "iterations between two checks of the gain"),
    }
    schedule_keys = ("gain_log_every",)

    def layer_settings(self):
        return dict(super().layer_settings(), gain_init=self.c["gain_init"])

    def after_step(self, model, it):  # something tracked across steps, saved and resumed
        self.steps = getattr(self, "steps", 0) + 1

    def stats(self, model):
        return {
            "mean_gain": sum(float(m.gain.detach()) for m in adapters.adapter_layers(model).values())
            / len(adapters.adapter_layers(model)),
            "steps_seen": getattr(self, "steps", 0),
        }

    def state_dict(self):
        return {"steps": getattr(self, "steps", 0)}

    def load_state_dict(self, state):
        self.steps = state["steps"]


@pytest.fixture
def gainlora(monkeypatch):
    """GainLoRA registered for one test (register(GainLoRA) is all a user writes)."""
    monkeypatch.setitem(adapters.FAMILIES, "gainlora", None)  # restored (removed) after the test
    register(GainLoRA)


def short_run(data_dir, out_dir, **kw):
    """run_args at 8 iterations of a 32-wide model, evaluated every 4."""
    keys = dict(n_embd=32, eval_interval=4, learning_rate=1e-2, warmup_iters=1, lr_decay_iters=8, min_lr=1e-3)
    return run_args(data_dir, out_dir, **{**keys, "max_iters": 8, **kw})


def steps(out_dir):
    return {r["iter"]: r for r in plots.read_metrics(str(out_dir)) if r["train_loss"] is not None}


def test_a_family_defined_here_runs_through_every_script(gainlora, char_data, tmp_path):
    import prepare

    base, data = tmp_path / "base", str(tmp_path / "parts")  # the base on one part, the runs on the other
    shutil.copytree(char_data, data)
    prepare.split_parts(data, 0.5)
    base_kw = dict(max_iters=30, eval_interval=30, learning_rate=3e-3, data_part="prior")
    train.train(short_run(data, base, **base_kw), environ={})
    kw = dict(adapter="gainlora", init_from=str(base), gain_init=0.5, lora_rank=2, data_part="bound")
    train.train(short_run(data, tmp_path / "full", **kw), environ={})
    full = steps(tmp_path / "full")
    assert full[7]["steps_seen"] == 8 and full[7]["mean_gain"] != 0.5  # its hooks ran; its gain trained
    model = build_model(load_checkpoint(str(tmp_path / "full")))
    assert all(isinstance(m, GainLoRALinear) for m in adapters.adapter_layers(model).values())

    # resume: stopped at 4 (its own key, rescaled with max_iters, and its state come back), continued to 8
    train.train(short_run(data, tmp_path / "part", **dict(kw, max_iters=4, lr_decay_iters=8)), environ={})
    train.train(short_run(data, tmp_path / "part", **dict(kw, init_from="resume")), environ={})
    part = steps(tmp_path / "part")
    assert sorted(part) == list(range(8))
    for it in range(8):
        assert part[it]["train_loss"] == pytest.approx(full[it]["train_loss"], abs=1e-6), it
        assert part[it]["steps_seen"] == full[it]["steps_seen"]

    texts = sample.sample(
        [
            f"--out_dir={tmp_path / 'full'}",
            "--start=ROMEO:",
            "--num_samples=1",
            "--max_new_tokens=20",
            "--device=cpu",
        ],
        environ={},
    )
    assert texts[0].startswith("ROMEO:") and len(texts[0]) == len("ROMEO:") + 20

    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    export = tmp_path / "export"
    hf.main([f"--out_dir={tmp_path / 'full'}", f"--export_dir={export}"])
    peft_model = PeftModel.from_pretrained(
        GPT2LMHeadModel.from_pretrained(str(export / "base")), str(export)
    ).eval()
    idx = torch.randint(0, 65, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval()(idx, idx)[0]
        got = peft_model(input_ids=idx).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    eval_bounds.main(
        [
            f"--out_dir={tmp_path / 'full'}",
            "--eval_blocks=16",
            "--eval_docs=8",
            "--exact_max_tokens=0",
            "--device=cpu",
        ]
    )
    bounds = json.loads((tmp_path / "full" / "bounds.json").read_text())
    assert bounds["kind"] == "gainlora" and bounds["d"] == sum(
        v.numel() for v in adapters.adapter_state_dict(model).values()
    )


def test_a_family_key_is_a_config_key(gainlora, char_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.train(["--help"], environ={})
    assert "--gain_init=1.0" in capsys.readouterr().out
    from configurator import ConfigError

    with pytest.raises(ConfigError, match=r"gain_init must be in \(0, inf\)"):
        train.train(short_run(char_data, tmp_path / "bad", adapter="gainlora", gain_init=-1.0), environ={})


def copy_run(name, tmp_path):
    out = tmp_path / name
    shutil.copytree(os.path.join(RUNS_V1, name), out)
    return out


def test_runs_written_before_families_load_sample_and_resume(char_data, tmp_path):
    """testdata/runs_v1: a base, a LoRA and an AdaLoRA run (1 x 16 GPT) written by the code before the
    family objects. Each builds; the adapter files load onto the base; sampling works from the
    checkpoint alone; the LoRA run, resumed from iteration 6 to 9, gives the losses its uninterrupted
    9-iteration run gave under the old code."""
    for name in ("lora", "adalora"):
        model = build_model(load_checkpoint(os.path.join(RUNS_V1, name))).eval()
        idx = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(0))
        for file in ("adapter.safetensors", "adapter_pruned.safetensors"):
            if os.path.exists(os.path.join(RUNS_V1, name, file)):
                loaded = load_adapter(
                    build_model(load_checkpoint(os.path.join(RUNS_V1, "base"))),
                    os.path.join(RUNS_V1, name, file),
                ).eval()
                with torch.no_grad():
                    torch.testing.assert_close(loaded(idx, idx)[0], model(idx, idx)[0], rtol=1e-5, atol=1e-5)
        texts = sample.sample(
            [
                f"--out_dir={os.path.join(RUNS_V1, name)}",
                "--start=ROMEO:",
                "--num_samples=1",
                "--max_new_tokens=10",
                "--device=cpu",
            ],
            environ={},
        )
        assert texts[0].startswith("ROMEO:")
    run = copy_run("lora", tmp_path)
    ckpt = load_checkpoint(str(run))
    old = ckpt["config"]
    args = [
        f"--{k}={old[k]}"
        for k in (
            "n_layer",
            "n_head",
            "n_embd",
            "block_size",
            "batch_size",
            "eval_iters",
            "eval_interval",
            "log_interval",
            "warmup_iters",
            "lr_decay_iters",
            "dropout",
            "lora_rank",
            "adapter",
        )
    ]
    train.train(
        [
            *args,
            f"--data_dir={char_data}",
            f"--out_dir={run}",
            "--init_from=resume",
            "--max_iters=9",
            "--device=cpu",
        ],
        environ={},
    )
    with open(os.path.join(RUNS_V1, "lora", "metrics_uninterrupted_9.jsonl")) as f:
        want = {r["iter"]: r for r in map(json.loads, f) if r["train_loss"] is not None}
    got = steps(run)
    assert sorted(got) == sorted(want) == list(range(9))
    for it in range(9):
        assert got[it]["train_loss"] == pytest.approx(want[it]["train_loss"], abs=1e-6), it


def test_a_registered_family_gets_every_per_family_test(tmp_path):
    """GainLoRA, registered with its (default) example before the suite is collected, joins the family
    table: the device, compile, fused-path, resume, export and rebuild tests run it and pass, with no
    test file edited. The family reaches the run as a pytest plugin built from this file's source."""
    import inspect
    import subprocess
    import sys

    plugin = tmp_path / "gainlora_plugin.py"
    plugin.write_text(
        "import torch\nimport torch.nn as nn\n\nimport adapters\nfrom adapters import Family, LoRALinear, register\n\n\n"
        + inspect.getsource(GainLoRALinear)
        + "\n\n"
        + inspect.getsource(GainLoRA)
        + "\n\nregister(GainLoRA)\n"
    )
    files = ["test_device.py", "test_adapters.py", "test_faults.py", "test_hf.py", "test_bounds.py"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), HERE]))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "gainlora_plugin", "-k", "gainlora", "-rA", *files],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    passed = [line for line in done.stdout.splitlines() if line.startswith("PASSED") and "gainlora" in line]
    for test in (
        "test_every_family_trains_on_a_non_cpu_device",
        "test_compile_traces_one_graph_and_never_recompiles",
        "test_fused_path_equals_the_plain_forward",
        "test_every_family_resumes_bit_for_bit_mid_schedule",
        "test_every_family_exports_to_peft_and_back",
        "test_the_prior_and_the_decoded_message_rebuild_the_scored_model",
    ):
        assert any(test in line for line in passed), test


def test_the_readme_family_reaches_the_command_line(char_data, tmp_path):
    """The README's "Adding a family" code, saved as gainlora.py in the working directory, works from the
    command line exactly as the README says: train.py --plugins=gainlora --adapter=gainlora
    --gain_init=0.5 trains it (the gain starts at 0.5), and sample.py and eval_bounds.py read the run
    with the same --plugins; without it, a reader says which --plugins to pass."""
    import re
    import subprocess
    import sys

    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## Adding a family") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "gainlora.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=HERE)

    def run(script, *args):
        return subprocess.run(
            [sys.executable, os.path.join(HERE, script), *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )

    out = tmp_path / "run"
    args = run_args(char_data, out, max_iters=4, eval_interval=4, init_from="scratch")
    done = run("train.py", "--plugins=gainlora", "--adapter=gainlora", "--gain_init=0.5", *args)
    assert done.returncode == 0, done.stderr
    assert "adapter gainlora:" in done.stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # this process has not imported gainlora
    assert ckpt["config"]["gain_init"] == 0.5 and ckpt["config"]["plugins"] == "gainlora"
    gains = [v for k, v in ckpt["model"].items() if k.endswith(".gain")]
    assert gains and all(abs(float(g) - 0.5) < 0.1 for g in gains)  # from 0.5, a few steps moved
    sampled = run("sample.py", "--plugins=gainlora", f"--out_dir={out}", "--device=cpu", "--max_new_tokens=5")
    assert sampled.returncode == 0, sampled.stderr
    refused = run("sample.py", f"--out_dir={out}", "--device=cpu", "--max_new_tokens=5")
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        f"error: {out}/ckpt.pt was trained with adapter 'gainlora', which no loaded module registers: pass "
        "--plugins=gainlora (the module that registers it)"
    ]
    missing = run("train.py", "--plugins=nothere", *args)
    assert "--plugins: no module 'nothere' in the working directory" in missing.stderr
