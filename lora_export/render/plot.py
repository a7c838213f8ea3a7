"""bench's chart (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rendering needs no torch: `--help` and `package --check` import this module
    pass


def bench_plot(result: Any, path: Any) -> None:
    """Overhead vs base per shape, one bar per variant, with the bootstrap 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r.variant != "base"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(result.shapes) * max(1, len(rows)) / 3), 4))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        xs, ys, lo, hi = [], [], [], []
        for j, s in enumerate(result.shapes):
            c = row.cells.get(s)
            if c is None or c.ratio is None:
                continue
            xs.append(j + i * width)
            ys.append(100 * (c.ratio - 1))
            lo.append(100 * (c.ratio - c.ci_low))
            hi.append(100 * (c.ci_high - c.ratio))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=f"{row.variant} ({row.backend})")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(result.shapes))], [f"batch/seq {s}" for s in result.shapes])
    ax.set_ylabel("latency overhead vs base (%)")
    ax.set_title(
        f"{result.environment.get('model', '')} — {result.environment['device']}, {result.environment['dtype']}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
