"""
Which adapter should I use? Every method fine-tuned on the same domain shift with the same budget:
a baby GPT pretrained on Tiny Shakespeare, then fine-tuned on the source of Python's standard
library (both as UTF-8 bytes, one 256-symbol vocabulary), each method's learning rate picked on a
small grid, with full fine-tuning and the frozen base as the two ends. Writes a table (val loss,
share of full fine-tuning's gain recovered, trainable parameters, adapter bytes, step time, peak
memory), compare.json and a plot of val loss against trainable parameters.

    python compare.py                                             # CPU size: about 45 minutes on 2 cores
    python compare.py --methods=full,lora_r1,sora --grid=1        # some methods, one learning rate each
    python compare.py --size=gpu --device=cuda --out_dir=out-compare-gpu   # larger base, longer budget
    python compare.py --base_dataset=python_stdlib --target_dataset=shakespeare_bytes --out_dir=out-compare-rev   # the other way round

The data is prepared on first use (data/python_stdlib from this Python's standard library,
data/shakespeare_bytes from --shakespeare or the download), the base is trained once into
out_dir/base/ and reused, and every run is a train.py process in out_dir/runs/ (its log beside it).
"""

import functools
import json
import os
import platform
import subprocess
import sys
import time

import torch

from configurator import ConfigError, check_device, check_ranges, cli, config_defaults, configure
from files import atomic_write
from plots import read_metrics
from prepare import DATASETS, read_meta

out_dir = "out-compare"  # the base, every run, the table, compare.json and the plot
size = "cpu"  # 'cpu' (about 45 minutes on 2 cores) | 'gpu' (larger base and budget) | 'tiny' (seconds)
methods = ""  # ','-separated names of METHODS below ('' = all; frozen always)
grid = 3  # learning rates tried per method, odd: 1 (its centre), 3 (centre / 3, centre, centre x 3), 5...
base_dataset = "shakespeare_bytes"  # the base is pretrained on data/<base_dataset>
target_dataset = "python_stdlib"  # every method is fine-tuned on data/<target_dataset>
data_root = "data"  # the folder holding <base_dataset>/ and <target_dataset>/ (prepared there on first use)
shakespeare = ""  # Tiny Shakespeare for shakespeare_bytes ('' = testdata/ if present, else download)
device = "cuda" if torch.cuda.is_available() else "cpu"  # passed to every train.py run
overwrite = False  # rerun the runs already in out_dir/runs (the base is kept: delete it to retrain)
DEFAULTS = config_defaults(globals())

HERE = os.path.dirname(os.path.abspath(__file__))
# the model and the budget of each size: base pretraining, the same fine-tuning budget for every method, and
# the keys whose value depends on the size (`sized`: SubLoRA's intrinsic_dim, VeRA's rank)
SIZES = {
    "cpu": dict(
        model=dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
        base=dict(batch_size=32, max_iters=1500, learning_rate=2e-3, warmup_iters=50, min_lr=2e-4),
        tune=dict(batch_size=16, max_iters=300, warmup_iters=20, eval_interval=100, eval_iters=20),
        sized=dict(sublora=dict(intrinsic_dim=2000), vera=dict(vera_rank=64)),
    ),
    "gpu": dict(
        model=dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
        base=dict(batch_size=64, max_iters=5000, learning_rate=1e-3, warmup_iters=100, min_lr=1e-4),
        tune=dict(batch_size=64, max_iters=2000, warmup_iters=100, eval_interval=500, eval_iters=100),
        sized=dict(sublora=dict(intrinsic_dim=20000), vera=dict(vera_rank=256)),
    ),
    "tiny": dict(
        model=dict(n_layer=2, n_head=2, n_embd=32, block_size=32),
        base=dict(batch_size=8, max_iters=20, learning_rate=3e-3, warmup_iters=2, min_lr=3e-4),
        tune=dict(batch_size=4, max_iters=6, warmup_iters=1, eval_interval=6, eval_iters=2),
        sized=dict(sublora=dict(intrinsic_dim=200), vera=dict(vera_rank=16)),
    ),
}
# AdaLoRA's and AdaDoRA's budget schedule over the 300 fine-tuning iterations
ADALORA = dict(
    lora_rank=4, lora_alpha=8.0, adalora_target_r=2, adalora_tinit=30, adalora_tfinal=60, adalora_deltaT=10
)
# method -> (centre learning rate, train.py keys). The grid multiplies the centre by 3^k.
METHODS = {
    "full": (3e-3, dict(adapter="none")),
    "lora_r1": (1e-2, dict(adapter="lora", lora_rank=1, lora_alpha=2.0)),
    "lora_r1_h8": (3e-2, dict(adapter="lora", lora_rank=1, lora_alpha=2.0, lora_rank_pattern="lm_head=8")),
    "lora_r2": (1e-2, dict(adapter="lora", lora_rank=2, lora_alpha=4.0)),
    "lora_r4": (1e-2, dict(adapter="lora", lora_rank=4, lora_alpha=8.0)),
    "dora_r4": (1e-2, dict(adapter="dora", lora_rank=4, lora_alpha=8.0)),
    # λ rises over the first half, then the kept ranks tune with λ = 0 (sora_tune_iters) for the second
    "sora": (
        3e-3,
        dict(
            adapter="sora",
            lora_rank=8,
            lora_alpha=16.0,
            sora_lambda=0.5,
            sora_lambda_max=5.0,
            sora_lambda_levels=4,
            sora_lambda_every=38,
            sora_tune_iters=150,
        ),
    ),
    "adalora": (1e-2, dict(ADALORA, adapter="adalora")),
    "adadora": (1e-2, dict(ADALORA, adapter="adadora")),
    "lora_r4_plus": (3e-3, dict(adapter="lora", lora_rank=4, lora_alpha=8.0, loraplus=True)),  # B at 16x
    "loraga_r4": (1e-2, dict(adapter="loraga", lora_rank=4, lora_alpha=8.0)),
    "pissa_r4": (1e-2, dict(adapter="pissa", lora_rank=4, lora_alpha=4.0, pissa_method="way0")),
    "milora_r4": (
        1e-2,
        dict(adapter="pissa", lora_rank=4, lora_alpha=4.0, pissa_method="way0", pissa_components="minor"),
    ),
    "vera": (3e-2, dict(adapter="vera")),  # vera_rank: the size's
    "sublora": (
        3e-2,
        dict(adapter="sublora", lora_rank=4, lora_alpha=32.0, allocation_mode="fixed", allocation_ratio=0.5),
    ),  # intrinsic_dim: the size's (SIZES' `sized`)
}
SCHEDULE = (
    "sora_lambda_every",
    "sora_tune_iters",
    "adalora_tinit",
    "adalora_tfinal",
)  # iterations: scaled with the budget


def prepare_data(name, c):
    data_dir = os.path.join(c["data_root"], name)
    if read_meta(data_dir):
        return data_dir
    if name not in ("python_stdlib", "shakespeare_bytes"):
        raise ConfigError(
            f"{data_dir} is not prepared; run python prepare.py {name} first (a bytes dataset: its "
            "vocabulary must be the other corpus's)"
        )
    local = c["shakespeare"] or os.path.join(HERE, "testdata", "tinyshakespeare.txt")
    input_path = local if name == "shakespeare_bytes" and os.path.isfile(local) else None
    os.makedirs(data_dir, exist_ok=True)
    DATASETS[name](data_dir, input_path=input_path)
    return data_dir


def lr_grid(centre, points):
    half = points // 2
    return [centre * 3.0**k for k in range(-half, half + 1)]


def scaled_keys(keys, budget):
    """A method's keys with the schedule keys it sets rescaled from the CPU budget (300 iterations) to
    this size's budget, so every size keeps the same shape of schedule."""
    scale = budget / SIZES["cpu"]["tune"]["max_iters"]
    return {k: max(1, round(v * scale)) if k in SCHEDULE else v for k, v in keys.items()}


def run_train(args, out, log_path):
    """python train.py ARGS in its own process (its peak memory is its own), output to log_path; the
    final metrics row, or a ConfigError naming the log."""
    os.makedirs(out, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "train.py"), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, WANDB_MODE="offline"),
        )
    if proc.returncode != 0:
        tail = open(log_path).read().strip().splitlines()[-1:] or ["(no output)"]
        raise ConfigError(f"train.py failed in {out} ({tail[0][:200]}); see {log_path}")
    return read_metrics(out)


def adapter_bytes(run_dir, row):
    """What a user keeps of the run: the pruned adapter file if there is one, else the adapter file, else
    (full fine-tuning) the model's weights in fp32."""
    for name in ("adapter_pruned.safetensors", "adapter.safetensors"):
        if os.path.isfile(os.path.join(run_dir, name)):
            return os.path.getsize(os.path.join(run_dir, name))
    return 4 * row["total_params"]


def check(c):
    """The methods the config asks for, every setting checked before any work."""
    check_ranges(c, {"grid": "[1, 9]"})
    if c["grid"] % 2 == 0:
        raise ConfigError(
            f"grid is the odd number of learning rates around each method's centre (1, 3, 5...), got {c['grid']}"
        )
    check_device(c["device"])
    if c["size"] not in SIZES:
        raise ConfigError(f"size must be one of {sorted(SIZES)}, got {c['size']!r}")
    chosen = [m for m in c["methods"].split(",") if m] or list(METHODS)
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose among {', '.join(METHODS)}")
    return chosen


def pretrain_base(spec, common, source, out):
    """The base every method fine-tunes: pretrained on `source` into out/base/, or reused from there."""
    base_dir = os.path.join(out, "base")
    if os.path.isfile(os.path.join(base_dir, "ckpt.pt")):
        print(f"reusing the base in {base_dir}/ (delete it to pretrain again)")
        return base_dir
    iters = spec["base"]["max_iters"]
    print(f"pretraining the base on {source} ({iters} iterations) -> {base_dir}/")
    base_args = dict(common, **spec["base"], data_dir=source, out_dir=base_dir, init_from="scratch")
    base_args.update(lr_decay_iters=iters, eval_interval=max(1, iters // 3), eval_iters=20, overwrite=True)
    t0 = time.time()
    run_train([f"--{k}={v}" for k, v in base_args.items()], base_dir, os.path.join(out, "base.log"))
    atomic_write(os.path.join(base_dir, "run.json"), json.dumps({"seconds": time.time() - t0}))
    return base_dir


def one_run(c, spec, common, target, base_dir, name, method, lr, keys):
    """A train.py fine-tuning run on the target data (reused when its folder holds the same one), as a row."""
    tune, run_dir = spec["tune"], os.path.join(c["out_dir"], "runs", name)
    args = dict(common, **tune, **scaled_keys(keys, tune["max_iters"]), data_dir=target, out_dir=run_dir)
    args.update(init_from=base_dir, lr_decay_iters=tune["max_iters"], overwrite=True)
    if lr is not None:
        args.update(learning_rate=lr, min_lr=lr / 10)
    argv = [f"--{k}={v}" for k, v in args.items()]
    record = os.path.join(run_dir, "run.json")  # the run's command and time: reused only for the same command
    reused = os.path.isfile(record) and json.load(open(record))["argv"] == argv and not c["overwrite"]
    t0 = time.time()
    if reused:
        rows = read_metrics(run_dir)
    else:
        if os.path.isfile(record):  # an interrupted rerun must not look finished afterwards
            os.remove(record)
        rows = run_train(argv, run_dir, run_dir + ".log")
        atomic_write(record, json.dumps({"argv": argv, "seconds": time.time() - t0}))
    evals, last = [r for r in rows if r.get("val_loss") is not None], rows[-1]
    tokens = tune["batch_size"] * spec["model"]["block_size"]
    return dict(
        method=method,
        lr=lr,
        run=name,
        val_loss=evals[-1]["val_loss"],
        train_loss=evals[-1]["train_loss"],
        trainable_params=last["trainable_params"],
        total_params=last["total_params"],
        adapter_bytes=None if lr is None else adapter_bytes(run_dir, last),
        step_ms=1000 * tokens / last["mean_tokens_per_s"] if last.get("mean_tokens_per_s") else None,
        peak_mem_mb=last.get("peak_mem_mb"),
        effective_rank=last.get("effective_rank"),
        seconds=json.load(open(record))["seconds"],
        reused=reused,
    )


def search(c, todo, run_one):
    """Every method's learning-rate grid run (run_one(name, method, lr, keys)); a best rate at the grid's
    edge extends it (twice at most), paid in grid time. Returns (every run, the best run per method)."""
    runs, results = [], {}
    planned, t_plan = sum(len(lrs) for _, lrs, _ in todo), time.time()
    for method, lrs, keys in todo:
        extended = 0
        while lrs:
            lr = lrs.pop(0)
            run = run_one(method if lr is None else f"{method}_lr{lr:.0e}", method, lr, keys)
            runs.append(run)
            if method not in results or run["val_loss"] < results[method]["val_loss"]:
                results[method] = run
            tried = [r["lr"] for r in runs if r["method"] == method]
            best = results[method]["lr"]
            at_edge = best is not None and best in (min(tried), max(tried))
            if not lrs and at_edge and c["grid"] > 1 and extended < 2:
                lrs, extended, planned = (
                    [best * 3 if best == max(tried) else best / 3],
                    extended + 1,
                    planned + 1,
                )
            eta = (time.time() - t_plan) / len(runs) * (planned - len(runs))
            print(
                f"[{len(runs)}/{planned}] {run['run']}: val loss {run['val_loss']:.4f}"
                + (" (reused)" if run["reused"] else f" in {run['seconds']:.0f} s")
                + f"; eta {eta / 60:.0f} min",
                flush=True,
            )
    return runs, results


def compare(argv=(), environ=None):
    c = configure(DEFAULTS, list(argv), environ)
    chosen = check(c)
    spec, out = SIZES[c["size"]], c["out_dir"]
    source, target = prepare_data(c["base_dataset"], c), prepare_data(c["target_dataset"], c)
    if (read_meta(source) or {}).get("tokenizer") != (read_meta(target) or {}).get("tokenizer"):
        raise ConfigError(
            f"{source} and {target} use different tokenizers; a base reads only its own vocabulary"
        )
    common = dict(
        spec["model"], device=c["device"], dropout=0.0, bias=False, weight_decay=0.0, log_interval=25
    )
    t_all = time.time()
    base_dir = pretrain_base(spec, common, source, out)
    run_one = functools.partial(one_run, c, spec, common, target, base_dir)
    todo = [("frozen", [None], dict(adapter="none", eval_only=True))]
    for m in chosen:
        keys = dict(METHODS[m][1], **spec["sized"].get(m, {}))
        todo.append((m, lr_grid(METHODS[m][0], c["grid"]), keys))
    runs, results = search(c, todo, run_one)

    if "sora" in results:  # SoRA's unpruned self: the same gated LoRA without the L1 push, at SoRA's rate
        sora = results["sora"]
        no_l1 = dict(METHODS["sora"][1], sora_lambda=0.0, sora_lambda_max=0.0, sora_tune_iters=0)
        dense = run_one("sora_dense", "sora_dense", sora["lr"], no_l1)
        runs.append(dense)
        sora["dense_val_loss"] = dense["val_loss"]
        sora["ranks_kept"] = sum((sora["effective_rank"] or {}).values())
        sora["ranks_total"] = METHODS["sora"][1]["lora_rank"] * len(sora["effective_rank"] or {})

    frozen, full = results["frozen"]["val_loss"], results.get("full", {}).get("val_loss")
    for r in results.values():
        r["gain_recovered"] = (
            (frozen - r["val_loss"]) / (frozen - full) if full is not None and frozen > full else None
        )
    # the comparison's cost as measured, over every invocation that made a part of it
    base_timing = os.path.join(base_dir, "run.json")
    seconds = sum(r["seconds"] for r in runs) + (
        json.load(open(base_timing))["seconds"] if os.path.isfile(base_timing) else 0
    )
    machine = dict(
        date=time.strftime("%Y-%m-%d"),
        python=platform.python_version(),
        torch=torch.__version__,
        cpus=os.cpu_count(),
        gpu=torch.cuda.get_device_name(c["device"]) if c["device"].startswith("cuda") else None,
    )
    summary = dict(
        size=c["size"],
        base_dataset=c["base_dataset"],
        target_dataset=c["target_dataset"],
        grid=c["grid"],
        budget=dict(spec["tune"], model=spec["model"]),
        device=c["device"],
        machine=machine,
        seconds=seconds,
        best=results,
        runs=runs,
        grid_seconds={m: sum(r["seconds"] for r in runs if r["method"] == m) for m in results},
    )
    atomic_write(os.path.join(out, "compare.json"), json.dumps(summary, indent=1))
    table = markdown_table(summary)
    atomic_write(os.path.join(out, "compare.md"), table + "\n")
    print(table)
    import plots

    print(
        f"wrote {os.path.join(out, 'compare.md')}, compare.json and {plots.plot_comparison(summary, out)} "
        f"({(time.time() - t_all) / 60:.1f} min now, {seconds / 60:.1f} min for the whole comparison)"
    )
    return summary


def markdown_table(summary):
    """The comparison as a Markdown table, best learning rate of each method, frozen base first."""
    lines = [
        "| method | lr | val loss | gain recovered | trainable params | adapter bytes | step ms | peak MB | grid s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = sorted(
        summary["best"].values(),
        key=lambda r: (r["method"] != "frozen", r["method"] != "full", r["val_loss"]),
    )
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    for r in order:
        share = 100 * r["trainable_params"] / r["total_params"]
        trainable = "0" if r["method"] == "frozen" else f"{r['trainable_params']:,} ({share:.2f}%)"
        extra = ""
        if "dense_val_loss" in r:
            extra = (
                f" (ranks kept {r['ranks_kept']}/{r['ranks_total']}; without L1 {r['dense_val_loss']:.4f})"
            )
        gain = "–" if r["gain_recovered"] is None else f"{100 * r['gain_recovered']:.1f}%"
        lines.append(
            f"| {r['method']}{extra} | {fmt(r['lr'], '.0e')} | {r['val_loss']:.4f} | {gain} | {trainable} | "
            f"{fmt(r['adapter_bytes'], ',')} | {fmt(r['step_ms'], '.0f')} | {fmt(r['peak_mem_mb'], '.0f')} | "
            f"{summary['grid_seconds'].get(r['method'], 0):.0f} |"
        )
    budget = summary["budget"]
    lines.append(
        f"\n{summary['size']} size: {summary['base_dataset']} base -> {summary['target_dataset']}, "
        f"{budget['max_iters']} iterations of {budget['batch_size']} x {budget['model']['block_size']} tokens "
        f"per method and learning rate, {summary['grid']} learning rate(s) each, on {summary['device']}; "
        f"{summary['seconds'] / 60:.1f} minutes in all"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    cli(compare, sys.argv[1:])
