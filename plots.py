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


def plot_effective_ranks(out_dir):
    """SoRA: effective rank (non-zero gates) of every layer over training as a heatmap, and the
    adapter parameters that remain with the λ schedule below it."""
    rows = [r for r in read_metrics(out_dir) if r.get("effective_rank")]
    if not rows:
        raise ValueError(f"{out_dir}/metrics.jsonl has no effective_rank rows (not a SoRA run)")
    names = list(rows[0]["effective_rank"])
    ranks = [[r["effective_rank"].get(n, 0) for r in rows] for n in names]  # (layers, logged iterations)
    iters = [r["iter"] for r in rows]
    fig, (ax, ax_params) = plt.subplots(2, 1, figsize=(10, 3 + 0.28 * len(names)), sharex=True,
                                        height_ratios=(len(names), 6))
    step = iters[1] - iters[0] if len(iters) > 1 else 1
    im = ax.imshow(ranks, aspect="auto", interpolation="nearest", cmap="viridis",
                   extent=(iters[0] - step / 2, iters[-1] + step / 2, len(names) - 0.5, -0.5))
    ax.set_yticks(range(len(names)), [n.removeprefix("transformer.") for n in names], fontsize=7)
    ax.set_title(f"SoRA effective rank per layer (non-zero gates): {out_dir}")
    fig.colorbar(im, ax=ax, label="effective rank", pad=0.01)
    ax_params.plot(iters, [r["adapter_params_remaining"] for r in rows], color="C0")
    ax_params.set_ylabel("adapter params", color="C0")
    ax_params.set_xlabel("iteration")
    ax_lambda = ax_params.twinx()
    ax_lambda.step(iters, [r.get("sora_lambda", 0) for r in rows], where="post", color="k", lw=1)
    ax_lambda.set_ylabel("λ")
    fig.tight_layout()
    path = os.path.join(out_dir, "sora_effective_rank.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    for d in sys.argv[1:] or ["out"]:
        print(f"wrote {plot_effective_ranks(d)}")
