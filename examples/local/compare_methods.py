"""GOLD vs ULD vs GRPO vs GOLD+GRPO vs same-tokenizer distillation (and GKD's lmbda) on the demo task, seeds.

    python examples/local/compare_methods.py --run_dir runs/compare --seeds 0 1 2 --steps 200
    python examples/local/compare_methods.py --run_dir runs/compare --study normalisation   # --gold.advantage_norm

Every method starts from the same briefly fine-tuned student and the same teacher (both from
:func:`gold_plugin.demo.prepare.prepare_models`) and trains for the same number of steps with the same optimiser
and rollout settings; only the learning signal differs. Writes ``results.md`` (held-out accuracy, mean ± std over
seeds, and the share of the teacher's accuracy gap recovered) and ``accuracy.png`` (accuracy vs step) into
``--run_dir`` (``results_normalisation.md`` / ``accuracy_normalisation.png`` for ``--study normalisation``: the
distillation-advantage signal under each ``--gold.advantage_norm``, in the settings of the OpenRLHF examples).
Runs go two at a time as subprocesses of ``launchers/train_gold.py --backend local``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gold_plugin.demo.prepare import prepare_models, with_teacher_tokenizer  # noqa: E402
from gold_plugin.demo.run import demo_argv  # noqa: E402

# GOLD's hybrid logit loss at group starts (same-bytes tokens: JSD, the rest: ULD), whatever the default projection.
LOGIT = ["--gold.signal", "logit", "--gold.teacher.topk", "8", "--gold.logit_projection", "vocab"]
OFF_POLICY = ["--data.output_key", "output"]  # the demo data's reference completions (the answers)
# name -> (run folder prefix, options)
METHODS: dict[str, tuple[str, list[str]]] = {
    "GOLD (spans + byte vocabulary map)": ("gold", [*LOGIT, "--gold.alignment", "spans"]),
    "ULD (positional + sorted)": ("uld", [*LOGIT, "--gold.alignment", "positional"]),
    "GRPO (task reward only)": ("grpo", ["--gold.alpha", "0"]),
    "GOLD + GRPO (alpha 0.5)": ("gold_grpo", [*LOGIT, "--gold.alpha", "0.5"]),
    "same-tokenizer distillation": ("same_tokenizer", LOGIT),
    "GOLD, lmbda 0.5 (half the prompts off-policy)": (
        "gold_lmbda0.5",
        [*LOGIT, "--gold.lmbda", "0.5", *OFF_POLICY],
    ),
    "GOLD, lmbda 0.25 (TRL's GOLD recipe)": ("gold_lmbda0.25", [*LOGIT, "--gold.lmbda", "0.25", *OFF_POLICY]),
}
# The distillation advantages under each --gold.advantage_norm, in the OpenRLHF examples' settings: advantages
# alone (reward-free, examples/gold_countdown_*.sh), with the logit loss (examples/gold_same_tokenizer_*.sh), mixed
# with GRPO at alpha 0.5 (examples/gold_grpo_countdown_mix.sh).
NORMALISATION: dict[str, tuple[str, list[str]]] = {}
for _norm in ("none", "mean", "whiten"):
    _option = ["--gold.advantage_norm", _norm]
    NORMALISATION[f"advantages, norm {_norm}"] = (f"adv_{_norm}", ["--gold.signal", "advantage", *_option])
    NORMALISATION[f"advantages + logit loss, norm {_norm}"] = (
        f"both_{_norm}",
        ["--gold.signal", "both", "--gold.teacher.topk", "8", "--gold.logit_projection", "vocab", *_option],
    )
    NORMALISATION[f"advantages + GRPO (alpha 0.5), norm {_norm}"] = (
        f"adv_grpo_{_norm}",
        ["--gold.signal", "advantage", "--gold.alpha", "0.5", *_option],
    )
STUDIES = {
    "methods": (METHODS, "results.md", "accuracy.png"),
    "normalisation": (NORMALISATION, "results_normalisation.md", "accuracy_normalisation.png"),
}
SHARED = [
    "--actor.adam.lr", "2e-4", "--actor.lr_warmup_ratio", "0", "--actor.min_lr_ratio", "1",
    "--rollout.batch_size", "32", "--rollout.n_samples_per_prompt", "4", "--rollout.max_new_tokens", "6",
    "--train.micro_batch_size", "128", "--gold.teacher.micro_batch_size", "128",
    "--local.teacher_in_process", "--local.num_threads", "1", "--local.no_progress",
]  # fmt: skip


def run_one(argv: list[str], log: Path) -> None:
    with log.open("w") as out:
        cmd = [sys.executable, str(REPO / "launchers" / "train_gold.py"), "--backend", "local", *argv]
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True)


def accuracy_curve(metrics: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def _check_reference_completions(train_data: Path) -> None:
    first = json.loads(train_data.read_text().splitlines()[0])
    if "output" not in first:
        raise SystemExit(
            f"{train_data} was written before the task had reference completions (no 'output' field): delete "
            f"{train_data.parent} and run again (the models are kept; the data is rewritten identically)."
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run_dir", default="runs/compare")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval_steps", type=int, default=25)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--study", choices=sorted(STUDIES), default="methods")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="Run only these methods (run-folder prefixes, e.g. gold uld).",
    )
    p.add_argument(
        "--report_only", action="store_true", help="Rebuild the table and plot from finished runs."
    )
    args = p.parse_args()
    methods, results_name, plot_name = STUDIES[args.study]
    if args.methods:
        unknown = sorted(set(args.methods) - {slug for slug, _ in methods.values()})
        if unknown:
            raise SystemExit(f"Unknown methods {unknown}; choose from {[s for s, _ in methods.values()]}.")
        methods = {name: m for name, m in methods.items() if m[0] in args.methods}
    run_dir = Path(args.run_dir).resolve()
    start = time.perf_counter()
    models = prepare_models(run_dir, pair="digits")
    _check_reference_completions(models.train_data)
    same_tok = with_teacher_tokenizer(
        models.student_init, models.teacher, run_dir / "student_teacher_tokenizer"
    )

    jobs = []
    for name, (slug, extra) in methods.items():
        for seed in args.seeds:
            out = run_dir / "runs" / f"{slug}_seed{seed}"
            out.mkdir(parents=True, exist_ok=True)
            argv = demo_argv(models, [*SHARED, *extra])
            if slug == "same_tokenizer":
                argv[argv.index("--actor.model_name_or_path") + 1] = str(same_tok)
            argv += [
                "--train.seed", str(seed), "--local.max_steps", str(args.steps),
                "--eval.steps", str(args.eval_steps), "--ckpt.path", str(out / "ckpt"),
                "--local.metrics_path", str(out / "metrics.jsonl"),
            ]  # fmt: skip
            jobs.append((name, seed, out, argv))
    if not args.report_only:
        for *_, out, _argv in jobs:
            (out / "metrics.jsonl").unlink(missing_ok=True)
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(lambda job: run_one(job[3], job[2] / "train.log"), jobs))

    curves: dict[str, list[dict[int, float]]] = {}
    for name, _seed, out, _argv in jobs:
        curves.setdefault(name, []).append(accuracy_curve(out / "metrics.jsonl"))
    teacher = models.teacher_accuracy
    lines = [
        f"Held-out greedy accuracy on {len(models.eval_data.read_text().splitlines())} unseen sums after "
        f"{args.steps} steps (32 prompts x 4 samples per step), seeds {args.seeds}; teacher {teacher:.3f}.",
        "",
        "| method | start | after | after / teacher | share of the start→teacher gap closed |",
        "|---|---|---|---|---|",
    ]
    for name, runs in curves.items():
        before = [c[0] for c in runs]
        after = [c[max(c)] for c in runs]
        recovered = [(a - b) / (teacher - b) for a, b in zip(after, before)]
        share = [a / teacher for a in after]
        lines.append(
            f"| {name} | {mean_std(before)} | {mean_std(after)} | {mean_std(share)} | {mean_std(recovered)} |"
        )
    if not args.report_only:
        lines += ["", f"Total time {time.perf_counter() - start:.0f} s."]
    (run_dir / results_name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(curves, teacher, run_dir / plot_name)


def plot(
    curves: dict[str, list[dict[int, float]]],
    teacher: float,
    path: Path,
    title: str = "student and teacher tokenizers differ",
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in curves.items():
        steps = sorted(set.intersection(*(set(c) for c in runs)))
        mean = [statistics.mean(c[s] for c in runs) for s in steps]
        std = [statistics.stdev(c[s] for c in runs) if len(runs) > 1 else 0.0 for s in steps]
        ax.plot(steps, mean, marker="o", label=name)
        ax.fill_between(
            steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15
        )
    ax.axhline(teacher, color="black", linestyle="--", label="teacher")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title(f"2-digit addition; {title} (mean ± std over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
