"""Writing benchmark results: Markdown and JSON files, and bar charts."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path


def write_tables(folder: Path, stem: str, markdown: str, json_text: str, announce: str | None = None) -> None:
    """``stem.md`` and ``stem.json`` in ``folder``; with ``announce`` (the
    command's name) the files are named on stderr."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.md").write_text(markdown)
    (folder / f"{stem}.json").write_text(json_text)
    if announce is not None:
        print(f"{announce}: wrote {folder / (stem + '.md')} and {folder / (stem + '.json')}", file=sys.stderr)


def write_bar_chart(path: Path, labels: Sequence[str], series: dict[str, list[float]], ylabel: str,
                    log: bool = False) -> bool:
    """Grouped bars, one group per label and one bar per series, as PNG; False
    when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels)), 4.0))
    width = 0.8 / len(series)
    for k, (name, heights) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(labels))], heights, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
