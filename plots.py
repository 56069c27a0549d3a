"""
Plots from a run's metrics.jsonl, saved as PNG next to it. train.py calls the one that fits the
adapter at the end of a run; by hand:

    python plots.py out-shakespeare-sora        # every plot the run's metrics allow
"""

import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from train import read_metrics  # noqa: E402


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
    fig, (ax, ax_params) = plt.subplots(2, 1, figsize=(10, 3 + 0.28 * len(names)), sharex=True,
                                        height_ratios=(len(names), 6))
    step = iters[1] - iters[0] if len(iters) > 1 else 1
    im = ax.imshow(ranks, aspect="auto", interpolation="nearest", cmap="viridis",
                   extent=(iters[0] - step / 2, iters[-1] + step / 2, len(names) - 0.5, -0.5))
    ax.set_yticks(range(len(names)), [n.removeprefix("transformer.") for n in names], fontsize=7)
    ax.set_title(f"effective rank per layer (non-zero gates / E): {out_dir}")
    fig.colorbar(im, ax=ax, label="effective rank", pad=0.01)
    ax_params.plot(iters, [r["adapter_params_remaining"] for r in rows], color="C0")
    ax_params.set_ylabel("adapter params", color="C0")
    ax_params.set_xlabel("iteration")
    key, label = ("sora_lambda", "λ") if "sora_lambda" in rows[-1] else ("rank_budget", "rank budget")
    ax_right = ax_params.twinx()
    ax_right.step(iters, [r.get(key, 0) for r in rows], where="post", color="k", lw=1)
    ax_right.set_ylabel(label)
    fig.tight_layout()
    path = os.path.join(out_dir, "effective_rank.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
                ax.text(j, i, str(int(v)), ha="center", va="center", color="w" if v < max(final.values()) / 2 else "k")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(blocks)), [f"block {b}" if b.isdigit() else b for b in blocks], fontsize=8)
    ax.set_title(f"final rank per layer and matrix ({sum(final.values())} ranks)", fontsize=9)
    fig.colorbar(im, ax=ax, label="rank")
    fig.tight_layout()
    path = os.path.join(out_dir, "rank_allocation.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    for d in sys.argv[1:] or ["out"]:
        print(f"wrote {plot_effective_ranks(d)} and {plot_rank_allocation(d)}")
