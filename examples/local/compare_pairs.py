"""Distillation across tokenizers that segment numbers differently: every signal on three tokenizer pairs, seeds.

    python examples/local/compare_pairs.py --run_dir runs/pairs --seeds 0 1 2 --steps 200

Pairs (:data:`gold_plugin.demo.tokenizers.PAIRS`): ``digits`` (both write single digits; the demo pair of
``compare_methods.py``), ``merged_student`` (the student merges digit runs, the teacher writes single digits: a
Llama-3-like student and a Qwen-like teacher) and ``merged_teacher`` (the other way round); ``real``, run only when
named (``--pairs real``), uses the real tokenizers and their full vocabularies: a GPT-2 student and a Qwen teacher
(teacher top-k 64, the default). For each pair every
method starts from the same briefly fine-tuned student, trains the same number of steps with the same optimiser
and rollout settings, and only the learning signal differs. The **same-tokenizer reference** distils from a
teacher that uses the student's own tokenizer, with held-out accuracy within 3 points of the cross-tokenizer
teacher (:func:`gold_plugin.demo.prepare.same_tokenizer_teacher`). Writes ``results_pairs.md`` (other pairs than the
three toy ones: ``results_pairs_<pairs>.md``; held-out accuracy,
mean ± std over seeds; the share of the reference's start→end gain each method closes; the lowest accuracy seen
during training relative to the start) and ``accuracy_<pair>.png`` into ``--run_dir``; ``--report_name NAME``
writes a report of the ``--methods`` given to ``results_pairs_NAME.md`` and ``accuracy_<pair>_NAME.png`` instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_methods import SHARED, accuracy_curve, mean_std, plot, run_one  # noqa: E402

from gold_plugin.demo.prepare import prepare_models, same_tokenizer_teacher  # noqa: E402
from gold_plugin.demo.run import demo_argv  # noqa: E402
from gold_plugin.demo.tokenizers import PAIRS  # noqa: E402

LOGIT = ["--gold.signal", "logit", "--gold.teacher.topk", "8"]
BYTES = [*LOGIT, "--gold.logit_projection", "bytes"]
ADVANTAGE = ["--gold.signal", "advantage", "--gold.teacher.topk", "0"]
HIDDEN = ["--gold.signal", "hidden", "--gold.teacher.topk", "0"]
REFERENCE = "same-tokenizer reference"
# name -> (run folder prefix, options)
METHODS: dict[str, tuple[str, list[str]]] = {
    "byte projection": ("bytes", BYTES),
    "GOLD hybrid (vocabulary map, TRL)": ("vocab", [*LOGIT, "--gold.logit_projection", "vocab"]),
    "ULD (positional + sorted)": ("uld", [*LOGIT, "--gold.alignment", "positional"]),
    "sampled-KL advantages": ("advantages", ADVANTAGE),
    "GRPO (task reward only)": ("grpo", ["--gold.alpha", "0"]),
    # OPRD across tokenizers: the hidden-state loss alone (no teacher top-k), and added to the byte projection.
    "hidden-state loss alone": ("hidden", HIDDEN),
    "byte projection + hidden-state loss": ("bytes_hidden", [*BYTES, "--gold.hidden_state_coef", "1"]),
    "byte projection + hidden-state loss (coef 0.1)": (
        "bytes_hidden01",
        [*BYTES, "--gold.hidden_state_coef", "0.1"],
    ),
    # The same two with the cosine form of the hidden-state loss (--gold.hidden_state_loss cosine).
    "hidden-state loss alone, cosine": ("hidden_cos", [*HIDDEN, "--gold.hidden_state_loss", "cosine"]),
    "byte projection + hidden-state loss (coef 0.1), cosine": (
        "bytes_hidden01_cos",
        [*BYTES, "--gold.hidden_state_coef", "0.1", "--gold.hidden_state_loss", "cosine"],
    ),
    # The hidden-state loss alone with other bridges than the default (2 layer pairs, the teacher's states sketched to
    # rank 64 of its 128 dimensions, a ridge map fitted on the first batch and frozen): rank 16; rank 128, the
    # teacher's whole state (the sketch is the identity: what any teacher-side basis, PCA included, can at most
    # keep); the last layers only; the map refitted on every step's states (what a learned map tends to).
    "hidden-state loss alone, rank 16": (
        "hidden_rank16",
        [*HIDDEN, "--gold.teacher.hidden_state_rank", "16"],
    ),
    "hidden-state loss alone, rank 128 (no sketch)": (
        "hidden_rank128",
        [*HIDDEN, "--gold.teacher.hidden_state_rank", "128"],
    ),
    "hidden-state loss alone, last layers only": (
        "hidden_last",
        [*HIDDEN, "--gold.teacher.hidden_state_layers", "1"],
    ),
    "hidden-state loss alone, bridge refitted every step": (
        "hidden_refit",
        [*HIDDEN, "--gold.hidden_state_bridge", "refit"],
    ),
    # GKD's lmbda with the off-policy half written by the teacher (TRL's seq_kd).
    "byte projection, lmbda 0.5, teacher-written": (
        "bytes_teacher_lmbda",
        [*BYTES, "--gold.lmbda", "0.5", "--gold.off_policy_source", "teacher"],
    ),
    # The discount alone (the sum of the remaining groups' d): separates the normalisation from the discount below.
    "sampled-KL advantages, discount 1": ("advantages_discount1", [*ADVANTAGE, "--gold.kl_discount", "1"]),
    # MiniLLM's length-normalised long-term reward: the mean of the remaining groups' d (needs kl_discount > 0).
    "sampled-KL advantages, length-normalised (discount 1)": (
        "advantages_lennorm",
        [*ADVANTAGE, "--gold.kl_discount", "1", "--gold.kl_length_normalised", "true"],
    ),
    REFERENCE: ("reference", BYTES),
}
LEARNING_RATE = {"digits": "2e-4", "merged_student": "1e-3", "merged_teacher": "2e-4", "real": "1e-3"}
"""The demo's 2e-4, except where the student merges digit runs: there every signal, the same-tokenizer reference
included, moves the tiny student little in 200 steps at 2e-4 (0.18 -> 0.25-0.29 for all, seed 0), so 1e-3."""
TOY_PAIRS = [pair for pair in PAIRS if pair != "real"]
"""The pairs run by default and reported in ``results_pairs.md``; ``real`` runs only when named."""
TEACHER_TOPK = {"real": "64"}
"""The teacher's top-k of the logit losses where it is not the toy pairs' 8: the real pair uses the default, 64."""


def pair_options(pair: str, method: list[str]) -> list[str]:
    """The shared options and a method's, with the pair's learning rate and, for a logit loss, its teacher top-k."""
    options = [*SHARED, *method]
    options[options.index("--actor.adam.lr") + 1] = LEARNING_RATE[pair]
    if pair in TEACHER_TOPK and "--gold.teacher.topk" in options:
        at = options.index("--gold.teacher.topk") + 1
        options[at] = options[at] if options[at] == "0" else TEACHER_TOPK[pair]
    return options


def _finished(metrics: Path, steps: int) -> bool:
    return metrics.exists() and max(accuracy_curve(metrics), default=-1) == steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run_dir", default="runs/pairs")
    p.add_argument(
        "--pairs", nargs="+", default=TOY_PAIRS, choices=list(PAIRS),
        help="Tokenizer pairs; 'real' (GPT-2 student, Qwen teacher, full vocabularies) is run only when named.",
    )  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval_steps", type=int, default=25)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--report_only", action="store_true", help="Rebuild the tables and plots from finished runs."
    )
    p.add_argument("--rerun", action="store_true", help="Run again the runs that already finished.")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="Run only these methods (folder prefixes, e.g. bytes vocab).",
    )
    p.add_argument(
        "--report_name",
        default=None,
        help="Write the report (only the --methods given, or every finished one) to results_pairs_<name>.md and "
        "accuracy_<pair>_<name>.png instead of the default files.",
    )
    args = p.parse_args()
    run_dir = Path(args.run_dir).resolve()
    start = time.perf_counter()
    jobs, setups = [], {}
    for pair in args.pairs:
        models = prepare_models(run_dir, pair=pair)
        reference, reference_accuracy = same_tokenizer_teacher(models)
        setups[pair] = (models, reference_accuracy)
        for name, (slug, extra) in METHODS.items():
            for seed in args.seeds:
                out = run_dir / "runs" / pair / f"{slug}_seed{seed}"
                out.mkdir(parents=True, exist_ok=True)
                argv = demo_argv(models, pair_options(pair, extra))
                if name == REFERENCE:
                    argv[argv.index("--gold.teacher.model_name_or_path") + 1] = str(reference)
                argv += [
                    "--train.seed", str(seed), "--local.max_steps", str(args.steps),
                    "--eval.steps", str(args.eval_steps), "--ckpt.path", str(out / "ckpt"),
                    "--local.metrics_path", str(out / "metrics.jsonl"),
                ]  # fmt: skip
                jobs.append((pair, name, seed, out, argv))
    if not args.report_only:
        todo = [job for job in jobs if args.rerun or not _finished(job[3] / "metrics.jsonl", args.steps)]
        if args.methods:
            todo = [job for job in todo if METHODS[job[1]][0] in args.methods]
        # Whole methods first (every seed of a method, each seed on all pairs), so that a run cut short still
        # leaves complete rows for the methods it reached.
        order = list(METHODS)
        todo.sort(key=lambda job: (order.index(job[1]), job[2], list(PAIRS).index(job[0])))
        for *_, out, _argv in todo:
            (out / "metrics.jsonl").unlink(missing_ok=True)
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(lambda job: run_one(job[4], job[3] / "train.log"), todo))

    lines = [
        f"Held-out greedy accuracy after {args.steps} steps (32 prompts x 4 samples per step), seeds {args.seeds}.",
        "Gain closed = (after - start) / (reference after - reference start), per seed; lowest = the lowest",
        "held-out accuracy during training minus the start.",
    ]
    for pair in args.pairs:
        models, reference_accuracy = setups[pair]
        finished: dict[str, dict[int, dict[int, float]]] = {}  # method -> seed -> curve
        for job_pair, name, seed, out, _argv in jobs:
            if job_pair == pair and _finished(out / "metrics.jsonl", args.steps):
                finished.setdefault(name, {})[seed] = accuracy_curve(out / "metrics.jsonl")
        reference_gain = {seed: c[max(c)] - c[0] for seed, c in finished.get(REFERENCE, {}).items()}
        by_seed = {  # the reported methods
            name: runs
            for name, runs in finished.items()
            if args.report_name is None or not args.methods or METHODS[name][0] in args.methods
        }
        curves = {name: list(runs.values()) for name, runs in by_seed.items()}
        lines += [
            "",
            f"**{pair}**: {PAIRS[pair].description}; teacher {models.teacher_accuracy:.3f}, same-tokenizer "
            f"reference teacher {reference_accuracy:.3f}, student start {models.student_init_accuracy:.3f}, "
            f"lr {LEARNING_RATE[pair]}.",
            "",
            "| method | start | after | gain closed | lowest - start |",
            "|---|---|---|---|---|",
        ]
        for name, seeded in by_seed.items():
            runs = list(seeded.values())
            before = [c[0] for c in runs]
            after = [c[max(c)] for c in runs]
            closed = [  # per seed, against the reference run of the same seed (where it finished)
                (c[max(c)] - c[0]) / reference_gain[seed] if reference_gain[seed] > 0 else float("nan")
                for seed, c in seeded.items()
                if seed in reference_gain
            ] or [float("nan")]
            lowest = [min(c.values()) - c[0] for c in runs]
            lines.append(
                f"| {name} | {mean_std(before)} | {mean_std(after)} | {mean_std(closed)} | {mean_std(lowest)} |"
            )
        suffix = f"_{args.report_name}" if args.report_name else ""
        plot(
            curves,
            models.teacher_accuracy,
            run_dir / f"accuracy_{pair}{suffix}.png",
            title=f"tokenizer pair {pair}",
        )
    if not args.report_only:
        lines += ["", f"Total time {time.perf_counter() - start:.0f} s."]
    toy = set(args.pairs) == set(TOY_PAIRS)
    results = "results_pairs.md" if toy else f"results_pairs_{'_'.join(args.pairs)}.md"
    if args.report_name:
        results = f"{results.removesuffix('.md')}_{args.report_name}.md"
    (run_dir / results).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
