"""PNG of hit rate against capacity, one line per policy (matplotlib, Agg backend)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from moe_rt.errors import MoeRtError

if TYPE_CHECKING:  # the simulator imports torch-free code only, but keep plots import-light
    from expert_cache.simulator import HitRateCurve


def check_plot_path(path: str) -> None:
    """Raise MoeRtError unless `path` is a .png in an existing folder."""
    if not path.lower().endswith(".png"):
        raise MoeRtError(f"plot file {path} must end in .png")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise MoeRtError(f"cannot write plot {path}: folder {parent} does not exist")


def plot_hit_rate_curve(curve: "HitRateCurve", path: str, title: str = "") -> None:
    """Write `path`. Belady is drawn dashed: it is the demand-paging bound, not a runnable policy."""
    check_plot_path(path)
    # A bare Figure on the Agg canvas: no pyplot global state, never needs a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for policy in curve.results:
        style = "--" if policy == "belady" else "-"
        label = "belady (bound)" if policy == "belady" else policy
        ax.plot(curve.capacities, curve.hit_rates(policy), style, marker="o", markersize=3,
                label=label)
    ax.set_xlabel("capacity (slots per layer" + (", shared pool)" if curve.scope == "global" else ")"))
    ax.set_ylabel("hit rate")
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
