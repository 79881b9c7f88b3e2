"""The demo's results: the accuracy table (printed and written) and the plot of held-out accuracy per evaluation."""

from __future__ import annotations

from pathlib import Path

PLOT_NAME = "demo_accuracy.png"
TABLE_NAME = "demo_table.md"


def plot_accuracy(
    evaluations: list[tuple[int, float]], teacher_accuracy: float, path: Path, teacher_label: str
) -> Path | None:
    """The student's held-out accuracy at each evaluation (``(step, accuracy)``) against the teacher's, as a PNG
    at ``path``; None when matplotlib is not installed. Uses matplotlib's ``Figure`` and Agg canvas directly, so
    no pyplot state or interactive backend is touched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    steps, values = zip(*evaluations)
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.axhline(teacher_accuracy, color="tab:gray", linestyle="--", label=teacher_label)
    ax.annotate(
        f"{teacher_accuracy:.3f}",
        (1.0, teacher_accuracy),
        xycoords=("axes fraction", "data"),
        textcoords="offset points",
        xytext=(-4, 5),
        ha="right",
        va="bottom",
        color="tab:gray",
    )
    ax.plot(steps, values, marker="o", color="tab:blue", label="student (merged digit runs), during GOLD")
    for step, value in ((steps[0], values[0]), (steps[-1], values[-1])):
        ax.annotate(f"{value:.3f}", (step, value), textcoords="offset points", xytext=(0, 8), ha="center")
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("GOLD step")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title(
        "GOLD demo (2-digit addition): the student's held-out accuracy vs the teacher's", fontsize=10
    )
    ax.grid(alpha=0.3)
    figure.legend(loc="outside lower center", ncols=2, frameon=False, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'model':<{width}} | held-out accuracy |", f"|{'-' * (width + 2)}|-------------------|"]
    lines += [f"| {name:<{width}} | {value:>17} |" for name, value in rows]
    return "\n".join(lines)


def report(history: list[dict], teacher_accuracy: float, run_dir: Path) -> dict[str, float]:
    """The demo's results from a training history (records with ``step`` and, at evaluations,
    ``eval/accuracy``): prints the table and the plot's path (nothing else), writes the table to
    ``run_dir/demo_table.md`` and the plot to ``run_dir/demo_accuracy.png``; returns the three accuracies."""
    evaluations = [(int(h["step"]), float(h["eval/accuracy"])) for h in history if "eval/accuracy" in h]
    if not evaluations:
        raise ValueError("The run logged no held-out accuracy (eval/accuracy): nothing to report.")
    (_, before), (last_step, after) = evaluations[0], evaluations[-1]
    teacher_label = "teacher (single-digit tokenizer)"
    table = format_table(
        [
            ("student before GOLD (brief SFT; its tokenizer merges digit runs)", f"{before:.3f}"),
            (f"student after GOLD ({last_step} steps)", f"{after:.3f}"),
            (teacher_label, f"{teacher_accuracy:.3f}"),
        ]
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / TABLE_NAME).write_text(table + "\n")
    plot = plot_accuracy(evaluations, teacher_accuracy, run_dir / PLOT_NAME, teacher_label)
    print(table)
    if plot is None:
        print("No plot: matplotlib is not installed (pip install matplotlib).")
    else:
        print(f"Held-out accuracy per evaluation: {plot}")
    return {"before": before, "after": after, "teacher": teacher_accuracy}
