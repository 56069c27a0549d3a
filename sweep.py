"""
The SubLoRA experiment grid: intrinsic dimensions × allocations × seeds, one train.py run each,
then a summary table, summary.json, summary.md (val loss, mean over seeds) and the plots (learned γ
per block and seed, A/B gradient norms).

    python sweep.py                                   # the CPU grid on Tiny Shakespeare (2 cores: ~16 min)
    python sweep.py --seeds=0 --intrinsic_dims=1000   # a smaller grid
    python sweep.py --train_args="--device=cuda --n_layer=6 --n_head=6 --n_embd=384 --max_iters=5000"  # a GPU
    python eval_bounds.py --sweep_dir=out-sublora-sweep                        # then the bounds of every run

A run whose out_dir already holds a finished run is kept, so an interrupted sweep continues where
it stopped.
"""

import json
import os
import shlex
import sys

from configurator import ConfigError, check_ranges, cli, config_defaults, configure
from files import atomic_write

sweep_dir = "out-sublora-sweep"  # one run per folder below it, then summary.json and plots
base_config = "config/train_shakespeare_sublora.py"  # the train.py config every run starts from
intrinsic_dims = "1000,2000"  # comma-separated d values
allocations = "uniform,fixed:0.2,fixed:0.5,fixed:0.8,learned"  # fixed:ρ with ρ = d_B / d
seeds = "0,1,2"  # each seeds both the random base model and θ₀ / P
max_iters = 200  # iterations per run
warmup_iters = 20  # learning-rate warmup of every run (given, so a shorter max_iters does not rescale it)
train_args = ""  # more --key=value overrides for every run
DEFAULTS = config_defaults(globals())


def grid(c):
    for d in (int(x) for x in c["intrinsic_dims"].split(",")):
        for alloc in c["allocations"].split(","):
            mode, _, ratio = alloc.partition(":")
            for seed in (int(s) for s in c["seeds"].split(",")):
                name = f"d{d}-{mode}{ratio}-s{seed}"
                args = [
                    f"--intrinsic_dim={d}",
                    f"--allocation_mode={mode}",
                    f"--sublora_seed={seed}",
                    f"--seed={seed}",
                    f"--max_iters={c['max_iters']}",
                    f"--lr_decay_iters={c['max_iters']}",
                    f"--warmup_iters={c['warmup_iters']}",
                ]
                args += [f"--allocation_ratio={float(ratio)}"] if ratio else []
                yield (
                    name,
                    dict(
                        intrinsic_dim=d, allocation_mode=mode, allocation_ratio=float(ratio or 0.5), seed=seed
                    ),
                    args,
                )


def finished(out_dir, iters):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path) or not os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        return False
    from plots import read_metrics

    return any(r["iter"] == iters and r["val_loss"] is not None for r in read_metrics(out_dir))


def allocation_of(run):
    """An allocation as --allocations spells it: uniform, learned or fixed:RATIO."""
    mode = run["allocation_mode"]
    return f"fixed:{run['allocation_ratio']:g}" if mode == "fixed" else mode


def mean_table(summary):
    """Markdown: the final val loss averaged over seeds, a row per intrinsic dimension and a column per
    allocation, the best of each row in bold."""
    allocations = list(dict.fromkeys(allocation_of(s) for s in summary))
    lines = [
        "| d | " + " | ".join(allocations) + " | seeds |",
        "| --- |" + " --- |" * (len(allocations) + 1),
    ]
    for d in sorted({s["intrinsic_dim"] for s in summary}):
        runs = [
            [s["val_loss"] for s in summary if s["intrinsic_dim"] == d and allocation_of(s) == a]
            for a in allocations
        ]
        means = [sum(r) / len(r) for r in runs]
        cells = [f"**{m:.3f}**" if m == min(means) else f"{m:.3f}" for m in means]
        lines.append(f"| {d} | " + " | ".join(cells) + f" | {len(runs[0])} |")
    return "\n".join(lines) + "\n"


def sweep(argv=()):
    import plots
    import train  # noqa: E402  (torch is imported only when a sweep runs)

    c = configure(DEFAULTS, list(argv), {})
    check_ranges(c, {"max_iters": "[1, inf)"})
    try:
        runs = list(grid(c))
    except ValueError as e:
        raise ConfigError(
            f"--intrinsic_dims, --allocations (uniform, learned, fixed:RATIO) or --seeds cannot be read: {e}"
        ) from None
    summary = []
    for k, (name, params, args) in enumerate(runs):
        out_dir = os.path.join(c["sweep_dir"], name)
        if finished(out_dir, c["max_iters"]):
            print(f"[{k + 1}/{len(runs)}] {name}: done already")
        else:
            print(f"[{k + 1}/{len(runs)}] {name}")
            train.train(
                [
                    c["base_config"],
                    f"--out_dir={out_dir}",
                    "--overwrite=True",
                    *args,
                    *shlex.split(c["train_args"]),
                ]
            )
        rows = plots.read_metrics(out_dir)
        evals = [r for r in rows if r["val_loss"] is not None]
        steps = [r for r in rows if r["train_loss"] is not None]
        summary.append(
            dict(
                params,
                name=name,
                out_dir=out_dir,
                val_loss=evals[-1]["val_loss"],
                init_val_loss=evals[0]["val_loss"],
                train_loss=evals[-1]["eval_train_loss"],
                gamma=steps[-1].get("gamma", {}),
            )
        )
    atomic_write(os.path.join(c["sweep_dir"], "summary.json"), json.dumps(summary, indent=1))
    print(f"{'run':<24} {'val loss':>9} {'(init)':>8}")
    for s in summary:
        print(f"{s['name']:<24} {s['val_loss']:>9.4f} {s['init_val_loss']:>8.4f}")
    table = os.path.join(c["sweep_dir"], "summary.md")
    atomic_write(table, mean_table(summary))
    print(f"val loss, mean over seeds:\n{mean_table(summary)}", end="")
    print(
        f"wrote {c['sweep_dir']}/summary.json, {table}, {plots.plot_gammas(c['sweep_dir'], summary)}, "
        f"{plots.plot_grad_norms(c['sweep_dir'], summary)}"
    )
    return summary


if __name__ == "__main__":
    cli(sweep, sys.argv[1:])
