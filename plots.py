"""
A run's metrics.jsonl: read, summed up in one line per run, and plotted as PNG next to it. train.py
calls the plots that fit the run at its end (loss.png always); by hand:

    python plots.py out-shakespeare-sora                    # a summary line and every plot the run's metrics allow
    python plots.py out-demo-base out-demo-lora             # and both losses on one figure: out-demo-lora/loss_comparison.png
"""

import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from configurator import ConfigError, cli  # noqa: E402
from files import atomic_write  # noqa: E402


def read_metrics(out_dir):
    """The rows of out_dir/metrics.jsonl. A last line cut short (a kill or a full disk during its
    write) is dropped with a note; a bad line before it is an error naming the file and the line."""
    path = os.path.join(out_dir, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            if i < len(lines) - 1:
                raise ValueError(
                    f"{path} line {i + 1} is not JSON; the file is damaged: delete that line"
                ) from None
            print(f"note: {path} ends in a cut line (an interrupted write), dropped")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("iter"), int):
            raise ValueError(
                f"{path} line {i + 1} is not a metrics row (a JSON object with an integer 'iter'); the file is "
                "damaged: delete that line"
            )
        rows.append(row)
    return rows


def summary(out_dirs):
    """One row per run, as printed: iterations, val loss at its first and last eval, trainable share,
    speed (the run's mean, evals excluded; the median logged step for runs from before it was
    recorded)."""
    out = []
    for d in out_dirs:
        rows = read_metrics(d)
        evals = [r for r in rows if r["val_loss"] is not None]
        speed = [r["tokens_per_s"] for r in rows if r["tokens_per_s"]]
        speed = [rows[-1]["mean_tokens_per_s"]] if "mean_tokens_per_s" in rows[-1] else speed
        share = 100 * rows[-1]["trainable_params"] / rows[-1]["total_params"]
        out.append(
            dict(
                run=d,
                iters=str(rows[-1]["iter"]),
                val_first=f"{evals[0]['val_loss']:.4f}",
                val_last=f"{evals[-1]['val_loss']:.4f}",
                trainable=f"{rows[-1]['trainable_params']:,} ({share:.2f}%)",
                tokens_per_s=f"{sorted(speed)[len(speed) // 2] if speed else 0:,.0f}",
            )
        )
    return out


def report(out_dirs):
    """The summary lines (summary), printed, and as a markdown table in the last run's folder
    (summary.md). Returns its path."""
    rows = summary(out_dirs)
    print(f"{'run':<28} {'iters':>6} {'val first':>10} {'val last':>9} {'trainable':>22} {'tok/s':>8}")
    for r in rows:
        print(
            f"{r['run']:<28} {r['iters']:>6} {r['val_first']:>10} {r['val_last']:>9} {r['trainable']:>22} "
            f"{r['tokens_per_s']:>8}"
        )
    table = [
        "| run | iters | val loss first → last | trainable | tokens/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    table += [
        f"| {r['run']} | {r['iters']} | {r['val_first']} → {r['val_last']} | {r['trainable']} | {r['tokens_per_s']} |"
        for r in rows
    ]
    path = os.path.join(out_dirs[-1], "summary.md")
    atomic_write(path, "\n".join(table) + "\n")
    return path


def save(fig, folder, name):
    fig.tight_layout()
    path = os.path.join(folder, name)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def plot_losses(out_dirs, path=None):
    """Train loss (every logged step) and val loss (every eval) against the iteration, one colour per
    run. One run: out_dir/loss.png; several: `path` (default: loss_comparison.png in the last run's folder)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, d in enumerate(out_dirs):
        rows = read_metrics(d)
        steps = [(r["iter"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
        evals = [(r["iter"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        name = os.path.basename(os.path.normpath(d))
        if steps:
            ax.plot(*zip(*steps), color=f"C{k}", lw=0.8, alpha=0.6, label=f"{name} train")
        if evals:
            ax.plot(*zip(*evals), color=f"C{k}", marker="o", ms=3, lw=1.5, label=f"{name} val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats per token)")
    ax.legend(fontsize=7)
    if len(out_dirs) == 1:
        return save(fig, out_dirs[0], "loss.png")
    path = path or os.path.join(out_dirs[-1], "loss_comparison.png")
    return save(fig, os.path.dirname(path) or ".", os.path.basename(path))


def rank_rows(out_dir):
    rows = [r for r in read_metrics(out_dir) if r.get("effective_rank")]
    if not rows:
        raise ValueError(f"{out_dir}/metrics.jsonl has no effective_rank rows (not a SoRA / AdaLoRA run)")
    return rows


def plot_effective_ranks(out_dir):
    """SoRA / AdaLoRA: effective rank (non-zero gates or E) of every layer over training as a heatmap;
    below it the adapter parameters in use, with λ (SoRA) or the rank budget (AdaLoRA)."""
    rows = rank_rows(out_dir)
    names = list(rows[0]["effective_rank"])
    ranks = [[r["effective_rank"].get(n, 0) for r in rows] for n in names]  # (layers, logged iterations)
    iters = [r["iter"] for r in rows]
    fig, (ax, ax_params) = plt.subplots(
        2, 1, figsize=(10, 3 + 0.28 * len(names)), sharex=True, height_ratios=(len(names), 6)
    )
    step = iters[1] - iters[0] if len(iters) > 1 else 1
    im = ax.imshow(
        ranks,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        extent=(iters[0] - step / 2, iters[-1] + step / 2, len(names) - 0.5, -0.5),
    )
    ax.set_yticks(range(len(names)), [n.removeprefix("transformer.") for n in names], fontsize=7)
    ax.set_title(f"effective rank per layer (non-zero gates / E): {out_dir}")
    fig.colorbar(im, ax=ax, label="effective rank", pad=0.01)
    ax_params.plot(iters, [r["adapter_params_remaining"] for r in rows], color="C0")
    ax_params.set_ylabel("adapter params", color="C0")
    ax_params.set_xlabel("iteration")
    key, label = ("sora_lambda", "λ") if "sora_lambda" in rows[-1] else ("rank_budget", "rank budget")
    ax_right = ax_params.twinx()
    values = []  # an eval row (the final state) holds the ranks but not λ / the budget: carry it forward
    for r in rows:
        values.append(r.get(key, values[-1] if values else 0))
    ax_right.step(iters, values, where="post", color="k", lw=1)
    ax_right.set_ylabel(label)
    return save(fig, out_dir, "effective_rank.png")


def plot_rank_allocation(out_dir):
    """The final rank of every adapted matrix: blocks down, matrices across (others in a last row)."""
    final = rank_rows(out_dir)[-1]["effective_rank"]
    blocks, kinds, cells = [], [], {}
    for name, rank in final.items():
        parts = name.split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        block, kind = (parts[index], ".".join(parts[index + 1 :])) if index is not None else ("other", name)
        blocks += [block] if block not in blocks else []
        kinds += [kind] if kind not in kinds else []
        cells[block, kind] = rank
    grid = [[cells.get((b, k), float("nan")) for k in kinds] for b in blocks]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(kinds), 1.4 + 0.45 * len(blocks)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v == v:  # not nan
                ax.text(
                    j,
                    i,
                    str(int(v)),
                    ha="center",
                    va="center",
                    color="w" if v < max(final.values()) / 2 else "k",
                )
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(blocks)), [f"block {b}" if b.isdigit() else b for b in blocks], fontsize=8)
    ax.set_title(f"final rank per layer and matrix ({sum(final.values())} ranks)", fontsize=9)
    fig.colorbar(im, ax=ax, label="rank")
    return save(fig, out_dir, "rank_allocation.png")


def plot_gammas(sweep_dir, summary):
    """SubLoRA learned mode: γ (share of each block's coordinates routed to B) per block, one row per
    (d, seed) run."""
    runs = [s for s in summary if s["gamma"]]
    if not runs:
        return None
    blocks = list(runs[0]["gamma"])
    grid = [[s["gamma"][b] for b in blocks] for s in runs]
    fig, ax = plt.subplots(figsize=(2 + 1.2 * len(blocks), 1.2 + 0.4 * len(runs)))
    im = ax.imshow(grid, cmap="coolwarm", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(blocks)), [b.removeprefix("transformer.") for b in blocks], fontsize=8)
    ax.set_yticks(range(len(runs)), [f"d={s['intrinsic_dim']} seed {s['seed']}" for s in runs], fontsize=8)
    ax.set_title("learned allocation: γ = share of w routed to B, per block", fontsize=9)
    fig.colorbar(im, ax=ax, label="γ")
    return save(fig, sweep_dir, "gamma_heatmap.png")


def plot_grad_norms(sweep_dir, summary):
    """‖∂L/∂w‖ through the A factors and through the B factors over training, per allocation (mean
    over seeds), one panel per intrinsic dimension."""
    dims = sorted({s["intrinsic_dim"] for s in summary})
    fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 4), squeeze=False)
    for ax, d in zip(axes[0], dims):
        groups = {}
        for s in summary:
            if s["intrinsic_dim"] == d:
                label = s["allocation_mode"] + (
                    f" {s['allocation_ratio']}" if s["allocation_mode"] == "fixed" else ""
                )
                groups.setdefault(label, []).append(
                    [r for r in read_metrics(s["out_dir"]) if r.get("grad_norm_A") is not None]
                )
        for k, (label, runs) in enumerate(groups.items()):
            iters = [r["iter"] for r in runs[0]]
            for part, style in (("A", "--"), ("B", "-")):
                values = [
                    sum(run[i][f"grad_norm_{part}"] for run in runs) / len(runs) for i in range(len(iters))
                ]
                ax.plot(iters, values, style, color=f"C{k}", label=f"{label}: through {part}")
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("‖∂L/∂w‖")
        ax.set_title(f"d = {d}", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    return save(fig, sweep_dir, "grad_norms.png")


def plot_bound_vs_alpha(run_dir, results):
    """The token-level bits bounds (both methods), the document-level one and the smoothed empirical BPD
    against α."""
    alphas, metrics = results["alphas"], results["metrics"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, color in (("token_bpd_hoeffding", "C0"), ("token_bpd_bernstein", "C2"), ("document_bpd", "C1")):
        ax.plot(
            alphas, metrics[name]["per_alpha"], "o-", color=color, label=f"{name.replace('_bpd', '')} bound"
        )
    for level, color in (("token", "C0"), ("document", "C1")):
        ax.plot(
            alphas,
            metrics[f"{level}_bpd"]["empirical_per_alpha"],
            "x--",
            color=color,
            label=f"{level}-level empirical",
        )
    ax.axhline(
        math.log2(results["vocab"]), color="k", lw=1, ls=":", label=f"random guess log₂ {results['vocab']}"
    )
    ax.set_xscale("log")
    ax.set_xlabel("prediction smoothing α")
    ax.set_ylabel("bits per token")
    ax.set_title(
        f"{os.path.basename(os.path.normpath(run_dir))}: K = {results['message']['total_bits']:.0f} bits",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    return save(fig, run_dir, "bound_vs_alpha.png")


def plot_bound_parts(run_dir, results):
    """Each token-level bits-per-token bound (Azuma–Hoeffding, empirical Bernstein) as a stacked bar: the
    unquantised training loss, then what quantisation, smoothing, the complexity term and the sampling
    term each add, beside random guessing."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for x, (method, parts) in enumerate(results["token_bpd_parts"].items()):
        bottom = 0.0
        for k, (name, value) in enumerate(parts.items()):
            ax.bar(x, value, bottom=bottom, color=f"C{k}", width=0.5, label=name if x == 0 else None)
            bottom += value
        ax.annotate(f"{bottom:.3f}", (x, bottom), ha="center", va="bottom", fontsize=8)
    ax.axhline(
        math.log2(results["vocab"]),
        color="k",
        lw=1,
        ls=":",
        label=f"random guess {math.log2(results['vocab']):.2f}",
    )
    ax.set_xticks(range(len(results["token_bpd_parts"])), list(results["token_bpd_parts"]))
    ax.set_ylabel("bits per token")
    ax.set_title("token-level bounds, part by part", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return save(fig, run_dir, "bound_parts.png")


def pareto_front(points):
    """The (x, y) points that no point with a smaller or equal x beats in y (lower is better), by x."""
    frontier, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            frontier.append((x, y))
            best = y
    return frontier


def plot_comparison(summary, out_dir):
    """compare.py: each method's val loss (at its best learning rate) against its trainable parameters,
    the Pareto frontier through the methods no cheaper one beats, the frozen base and full fine-tuning
    as the two ends."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    best = summary["best"]
    points = [(r["trainable_params"], r["val_loss"], m) for m, r in best.items() if m != "frozen"]
    for k, (n, loss, m) in enumerate(sorted(points, key=lambda p: p[1])):  # labels alternate above and below
        ax.scatter(n, loss, color="C3" if m == "full" else "C0", zorder=3)
        ax.annotate(m, (n, loss), fontsize=7, xytext=(4, 4 if k % 2 else -10), textcoords="offset points")
    if len(points) > 1:
        ax.plot(
            *zip(*pareto_front([(n, loss) for n, loss, _ in points])),
            color="C0",
            lw=1,
            label="Pareto frontier",
        )
    losses, frozen = [loss for _, loss, _ in points], best["frozen"]["val_loss"]
    top = max(losses) + 0.25 * (max(losses) - min(losses) or 1)
    if frozen <= top:
        ax.axhline(frozen, color="k", lw=1, ls=":", label="frozen base")
    else:  # far above the methods: named, not drawn, so the methods keep the plot's height
        ax.plot([], [], " ", label=f"frozen base: {frozen:.3f} (above)")
        ax.set_ylim(top=top)
    if "full" in best:
        ax.axhline(best["full"]["val_loss"], color="C3", lw=1, ls="--", label="full fine-tuning")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"val loss on {summary['target_dataset']} (nats per token)")
    ax.set_title(
        f"{summary['base_dataset']} base fine-tuned on {summary['target_dataset']}: "
        f"{summary['budget']['max_iters']} iterations per method",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    return save(fig, out_dir, "compare.png")


def plot_pareto(sweep_dir, results):
    """Complexity (message bits) against empirical BPD and its token-level bound, over a sweep's runs;
    the Pareto frontier of the bound drawn through the runs no other run beats on both axes."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = sorted((r["message"]["total_bits"], r["metrics"]["token_bpd"]["bound"], r) for r in results)
    for k, (bits, b, r) in enumerate(points):
        ax.scatter(
            bits,
            r["metrics"]["token_bpd"]["empirical"],
            marker="x",
            color="C0",
            label="empirical" if k == 0 else None,
        )
        ax.scatter(bits, b, marker="o", color="C1", label="token-level bound" if k == 0 else None)
        ax.annotate(os.path.basename(r["run"]), (bits, b), fontsize=5)
    ax.plot(*zip(*pareto_front([(bits, b) for bits, b, _ in points])), color="C1", lw=1)
    ax.axhline(math.log2(results[0]["vocab"]), color="k", lw=1, ls=":", label="random guess")
    ax.set_xlabel("complexity K (bits)")
    ax.set_ylabel("bits per token")
    ax.set_title("compression vs fit: the bound's Pareto frontier", fontsize=9)
    ax.legend(fontsize=7)
    return save(fig, sweep_dir, "pareto.png")


def main(out_dirs):
    """The summary lines, every plot each run's metrics allow, and the runs' losses on one figure when
    there are several."""
    print(f"wrote {report(out_dirs)}")
    for d in out_dirs:
        paths = [plot_losses([d])]
        if any(r.get("effective_rank") for r in read_metrics(d)):
            paths += [plot_effective_ranks(d), plot_rank_allocation(d)]
        print(f"wrote {', '.join(paths)}")
    if len(out_dirs) > 1:
        print(f"wrote {plot_losses(out_dirs)}")


def command(argv):
    """plots.py's command line: run folders (default: out), or --help."""
    if "--help" in argv or "-h" in argv:
        print(f"usage: python plots.py [RUN_DIR ...]   (default: out)\n{__doc__}")
        return
    flags = [a for a in argv if a.startswith("-")]
    if flags:
        raise ValueError(
            f"plots.py takes run folders, not {flags[0]!r}: python plots.py out-demo-base out-demo-lora"
        )
    missing = [d for d in argv or ["out"] if not os.path.isfile(os.path.join(d, "metrics.jsonl"))]
    if missing:
        raise ConfigError(f"{missing[0]!r} holds no metrics.jsonl: name a run folder train.py wrote")
    main(argv or ["out"])


if __name__ == "__main__":
    cli(command, sys.argv[1:])
