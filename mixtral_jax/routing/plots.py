"""PNG figures of a routing report: the layer x expert load heatmap and co-activation matrices.

matplotlib runs headless here (the Agg backend), so the figures render on servers and in CI.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def plot_load_heatmap(report: dict, path: str) -> None:
    """Share of each layer's assignments per expert; uniform is 1/E, flagged experts are boxed."""
    share = np.array([layer["load_share"] for layer in report["layers"]])  # [L, E]
    num_layers, num_experts = share.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * num_experts, 1.2 + 0.3 * num_layers))
    image = ax.imshow(
        share,
        cmap="viridis",
        aspect="auto",
        vmin=0.0,
        vmax=max(float(share.max()), 2.0 / num_experts),
    )
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(num_layers))
    ax.set_title(f"load share per expert (uniform = {1 / num_experts:.3f})")
    for layer in report["layers"]:
        for e in layer["dead_experts"] + layer["overloaded_experts"]:
            ax.add_patch(
                plt.Rectangle(
                    (e - 0.5, layer["layer"] - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2
                )
            )
    if num_experts * num_layers <= 256:
        for i in range(num_layers):
            for j in range(num_experts):
                ax.text(
                    j,
                    i,
                    f"{share[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if share[i, j] < share.max() / 2 else "black",
                )
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_coactivation(report: dict, path: str) -> None:
    """One E x E matrix per layer: share of tokens that chose both experts."""
    co = np.array(report["coactivation"])  # [L, E, E]
    num_layers, num_experts = co.shape[0], co.shape[1]
    cols = min(num_layers, 8)
    rows = math.ceil(num_layers / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows + 0.6), squeeze=False)
    vmax = float(co.max()) or 1.0
    for index, ax in enumerate(axes.flat):
        if index >= num_layers:
            ax.axis("off")
            continue
        image = ax.imshow(co[index], cmap="magma", vmin=0.0, vmax=vmax)
        ax.set_title(f"layer {index}", fontsize=9)
        ax.set_xticks(range(num_experts))
        ax.set_yticks(range(num_experts))
        ax.tick_params(labelsize=6)
    fig.suptitle("expert co-activation (share of tokens choosing both)")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
