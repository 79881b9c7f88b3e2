"""Self-contained GOLD demo (nothing from a hub): 2-digit addition, teacher and student with different tokenizers.

1. Byte-level BPE tokenizers trained here (:data:`PAIRS`). The demo's pair is the hard case: the teacher writes
   numbers digit by digit (like Qwen), the student's tokenizer merges digit runs into multi-digit tokens (like
   Llama-3); no token has the same id in both and their EOS tokens differ, so the teacher reaches the student
   only through the byte alignment, and the logit loss must project the student onto the teacher's digits by
   bytes (``--gold.logit_projection bytes``, the default; docs/signals.md).
2. A tiny Llama teacher is fine-tuned on the training sums to high held-out accuracy (cached in the run dir).
3. A tiny Llama student is fine-tuned briefly (stopped at 25% accuracy), then trained on-policy with GOLD,
   reward-free.
4. A table of held-out greedy accuracy (student before, student after, teacher) and a plot of the student's
   accuracy at every evaluation against the teacher's (``<run_dir>/demo_accuracy.png``).

The demo prints the table, the plot's path and one progress bar, nothing else (:func:`quiet`: no Ray, DeepSpeed
or transformers messages, no warnings; only while the demo runs), and pins what makes its figures move between
runs (:func:`pinned`: one torch thread, seeds, torch's deterministic algorithms).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gold_plugin.local.modeling import accuracy, resolve_device, sft, tiny_llama
from gold_plugin.local.task import AdditionTask, build_tokenizer, is_correct, write_jsonl

# Demo values for options whose general defaults suit large models: the parser's defaults under --demo
# (:func:`demo_defaults`), so an option given on the command line always wins.
DEMO_DEFAULTS = {  # the signal is the general default's: the byte-projected logit loss
    "gold.teacher.topk": 8,
    "actor.adam.lr": 1e-3,
    "actor.lr_warmup_ratio": 0.0,
    "actor.min_lr_ratio": 1.0,
    "rollout.batch_size": 32,
    "rollout.n_samples_per_prompt": 4,
    "rollout.max_new_tokens": 6,
    "train.micro_batch_size": 128,
    "local.max_steps": 200,
    "eval.steps": 25,
    "gold.teacher.num_gpus_per_replica": 0.0,
    "gold.teacher.micro_batch_size": 128,
    # Not a model-size default: one torch thread, so the demo's figures do not move with the core count
    # (:func:`pinned`; --local.num_threads N trains with N).
    "local.num_threads": 1,
}


@dataclass(frozen=True)
class TokenizerPair:
    """The tokenizers of the demo's teacher and student (``build_tokenizer`` kinds)."""

    teacher_kind: str
    student_kind: str
    description: str


PAIRS = {
    "digits": TokenizerPair(
        "digits", "student_digits", "both write numbers digit by digit (different ids and EOS)"
    ),
    "merged_student": TokenizerPair(
        "digits",
        "merged",
        "the student merges digit runs, the teacher writes single digits (Llama-3 vs Qwen)",
    ),
    "merged_teacher": TokenizerPair(
        "merged", "student_digits", "the teacher merges digit runs, the student writes single digits"
    ),
}
"""Tokenizer pairs of the demo and the experiment (docs/local.md)."""

DEMO_PAIR = "merged_student"
TEACHER_STEPS = {"digits": 1000, "merged": 3000}
"""SFT steps of a teacher per tokenizer kind: the tiny model needs three times as long with merged digit runs to
reach the single-digit teacher's held-out accuracy (0.972 vs 0.990 measured here)."""


@dataclass
class DemoModels:
    """Paths and held-out accuracies of the prepared demo models."""

    run_dir: Path
    teacher: Path
    student_init: Path
    train_data: Path
    eval_data: Path
    teacher_accuracy: float
    student_init_accuracy: float
    pair: str = DEMO_PAIR


def _train_or_load(
    folder: Path,
    kind: str,
    tokenizer_dir: Path,
    task: AdditionTask,
    steps: int,
    seed: int,
    hidden: int,
    stop_at_accuracy: float | None = None,
    progress: bool = False,
) -> float:
    """Fine-tune a tiny Llama on the training sums into ``folder`` unless it is already there; held-out accuracy.

    With ``stop_at_accuracy`` training stops once accuracy on 200 *training* prompts reaches it (checked every 25
    steps): small models learn this task in a sudden jump whose step varies with the hardware's float rounding,
    so a step count alone would not give the same weak student everywhere. Training prints one line at the end,
    or with ``progress`` (the demo) shows a progress bar that is cleared when it ends.
    """
    tokenizer = build_tokenizer(kind, tokenizer_dir, task)
    info = folder / "demo_model.json"
    if info.exists():
        return json.loads(info.read_text())["heldout_accuracy"]
    train, held = task.split()
    model = tiny_llama(len(tokenizer), tokenizer, hidden_size=hidden, seed=seed).to(resolve_device())
    dev_rows = task.records(train[:200])

    def reached(_step: int) -> bool:
        return accuracy(model, tokenizer, dev_rows, is_correct, max_new_tokens=6) >= stop_at_accuracy

    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        until = f" until {stop_at_accuracy:.0%} accuracy" if stop_at_accuracy is not None else ""
        bar = tqdm(total=steps, leave=False, desc=f"{folder.name}: SFT{until} (once, cached)")
    taken = sft(
        model,
        tokenizer,
        task.records(train),
        steps=steps,
        batch_size=64,
        lr=3e-3,
        seed=seed,
        stop=reached if stop_at_accuracy is not None else None,
        constant_lr=stop_at_accuracy is not None,
        log=(lambda _step, _loss: bar.update(1)) if bar is not None else None,
    )
    acc = accuracy(model, tokenizer, task.records(held), is_correct, max_new_tokens=6)
    if bar is not None:
        bar.close()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    seconds = time.perf_counter() - start
    record = {"kind": kind, "sft_steps": taken, "seed": seed, "heldout_accuracy": acc, "seconds": seconds}
    info.write_text(json.dumps(record))
    if not progress:
        print(f"  {folder.name}: {taken} SFT steps, held-out accuracy {acc:.3f} ({seconds:.0f} s)")
    return acc


def with_teacher_tokenizer(student: Path, teacher: Path, out: Path) -> Path:
    """The model in ``student`` re-indexed to the tokenizer in ``teacher`` (the same function under the other
    tokenizer's ids). Every token of that tokenizer must have a token with the same canonical bytes in the model's
    (true for the demo's two single-digit tokenizers); the EOS and pad tokens are paired by role."""
    from transformers import AutoModelForCausalLM

    from gold_plugin.alignment import VocabMap, token_table
    from gold_plugin.teacher.tokenizer import load_tokenizer

    if (out / "config.json").exists():
        return out
    s_tok, t_tok = load_tokenizer(str(student)), load_tokenizer(str(teacher))
    mapping = torch.tensor(VocabMap(s_tok, t_tok).teacher_to_student)
    mapping[t_tok.eos_token_id], mapping[t_tok.pad_token_id] = s_tok.eos_token_id, s_tok.pad_token_id
    # Other special tokens of the target tokenizer (a BOS the demo never uses) get the pad row.
    unused = torch.from_numpy(token_table(t_tok).special) & (mapping < 0)
    mapping[unused] = s_tok.pad_token_id
    if (mapping < 0).any():
        raise ValueError(
            f"{int((mapping < 0).sum())} teacher tokens have no student token with the same bytes."
        )
    model = AutoModelForCausalLM.from_pretrained(student)
    embeddings = model.get_input_embeddings().weight.data[mapping].clone()  # tied with the output layer
    model.resize_token_embeddings(len(t_tok))
    model.get_input_embeddings().weight.data.copy_(embeddings)
    model.config.eos_token_id, model.config.pad_token_id = t_tok.eos_token_id, t_tok.pad_token_id
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = (
        t_tok.eos_token_id,
        t_tok.pad_token_id,
    )
    model.save_pretrained(out)
    t_tok.save_pretrained(out)
    return out


def _teacher_folder(run_dir: Path, kind: str) -> Path:
    return run_dir / f"teacher_{kind}_sft{TEACHER_STEPS[kind]}"


def model_paths(
    run_dir: str | Path,
    pair: str = DEMO_PAIR,
    student_seed: int = 0,
    student_start_accuracy: float = 0.25,
) -> tuple[Path, Path, Path, Path]:
    """Where :func:`prepare_models` puts the teacher, the student, the training and the held-out prompts."""
    run_dir = Path(run_dir)
    kinds = _pair(pair)
    return (
        _teacher_folder(run_dir, kinds.teacher_kind),
        run_dir / f"student_{kinds.student_kind}_seed{student_seed}_start{student_start_accuracy:g}",
        run_dir / "data" / "train.jsonl",
        run_dir / "data" / "heldout.jsonl",
    )


def _pair(name: str) -> TokenizerPair:
    if name not in PAIRS:
        raise ValueError(f"Unknown tokenizer pair {name!r}: use one of {sorted(PAIRS)}.")
    return PAIRS[name]


def _teacher(
    run_dir: Path, kind: str, task: AdditionTask, hidden: int, progress: bool = False
) -> tuple[Path, float]:
    folder = _teacher_folder(run_dir, kind)
    return folder, _train_or_load(
        folder, kind, run_dir / f"tok_{kind}", task, TEACHER_STEPS[kind], 1000, hidden, progress=progress
    )


def prepare_models(
    run_dir: str | Path,
    *,
    pair: str = DEMO_PAIR,
    student_max_steps: int = 4000,
    student_start_accuracy: float = 0.25,
    student_seed: int = 0,
    hidden: int = 128,
    task: AdditionTask | None = None,
    progress: bool = False,
) -> DemoModels:
    """Tokenizers, datasets, the teacher (SFT to high accuracy) and a briefly fine-tuned student (stopped once it
    reaches ``student_start_accuracy`` on training prompts), cached in ``run_dir``; ``pair`` names the tokenizers
    (:data:`PAIRS`). A model trained here prints one line, or with ``progress`` shows a passing progress bar."""
    task = task or AdditionTask()
    run_dir = Path(run_dir)
    kinds = _pair(pair)
    train, held = task.split()
    _, student, train_data, eval_data = model_paths(run_dir, pair, student_seed, student_start_accuracy)
    if not train_data.exists():
        write_jsonl(task.records(train), train_data)
        write_jsonl(task.records(held), eval_data)
    teacher, teacher_acc = _teacher(run_dir, kinds.teacher_kind, task, hidden, progress)
    student_acc = _train_or_load(
        student,
        kinds.student_kind,
        run_dir / f"tok_{kinds.student_kind}",
        task,
        student_max_steps,
        student_seed,
        hidden,
        stop_at_accuracy=student_start_accuracy,
        progress=progress,
    )
    return DemoModels(run_dir, teacher, student, train_data, eval_data, teacher_acc, student_acc, pair)


def same_tokenizer_teacher(
    models: DemoModels, hidden: int = 128, task: AdditionTask | None = None
) -> tuple[Path, float]:
    """The experiment's same-tokenizer reference: a teacher that uses the *student's* tokenizer, with the
    cross-tokenizer teacher's held-out accuracy within a few points. A single-digit student gets the single-digit
    teacher re-indexed to its ids (the same function); a merged-digit student gets a teacher trained with its
    tokenizer (:data:`TEACHER_STEPS`). Returns its folder and held-out accuracy (cached in the run dir)."""
    task = task or AdditionTask()
    student_kind = _pair(models.pair).student_kind
    if student_kind == "student_digits":
        digits, accuracy = _teacher(models.run_dir, "digits", task, hidden)
        return with_teacher_tokenizer(
            digits, models.student_init, models.run_dir / "teacher_digits_student_ids"
        ), accuracy
    return _teacher(models.run_dir, student_kind, task, hidden)


def _model_options(teacher: Path, student: Path, train_data: Path, eval_data: Path) -> dict[str, str]:
    """The options that point the local backend at the demo's models, data and reward."""
    return {
        "actor.model_name_or_path": str(student),
        "gold.teacher.model_name_or_path": str(teacher),
        "data.prompt_dataset": str(train_data),
        "eval.dataset": str(eval_data),
        "data.label_key": "label",
        "reward.remote_url": str(Path(__file__).with_name("task_reward.py")),
    }


def demo_argv(models: DemoModels, extra: list[str] | None = None) -> list[str]:
    """The ``--backend local`` arguments that train the prepared student (add ``--gold.*`` etc. in ``extra``)."""
    options = _model_options(models.teacher, models.student_init, models.train_data, models.eval_data)
    return [*(item for name, value in options.items() for item in (f"--{name}", value)), *(extra or [])]


def demo_defaults(run_dir: str | Path) -> dict[str, object]:
    """The parser defaults under ``--demo`` (argparse ``dest`` names): the demo's models, data and reward in
    ``run_dir``, its training values (:data:`DEMO_DEFAULTS`), checkpoints in ``run_dir/gold_run``."""
    return {
        **_model_options(*model_paths(run_dir)),
        **DEMO_DEFAULTS,
        "ckpt.path": str(Path(run_dir) / "gold_run"),
    }


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'model':<{width}} | held-out accuracy |", f"|{'-' * (width + 2)}|-------------------|"]
    lines += [f"| {name:<{width}} | {value:>17} |" for name, value in rows]
    return "\n".join(lines)


QUIET_ENVIRONMENT = {"TOKENIZERS_PARALLELISM": "false"}
"""Set by :func:`quiet` where unset: no warning from the tokenizers library when Ray forks after a tokenizer ran
in parallel (it writes to the terminal itself, past Python's logging)."""


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` added where unset, restored on exit."""
    added = {name: value for name, value in values.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The demo's output is its table, its plot's path and one progress bar: inside this block no log record
    below ERROR is emitted (Ray, DeepSpeed, transformers), no ``warnings`` are shown, transformers' and the hub's
    progress bars ("Loading weights", "Writing model shards") are off, and :data:`QUIET_ENVIRONMENT` is set.
    Everything is restored on exit, so other runs and the tests in the same process keep their settings. (The
    Ray teacher's own output is kept out by ``train(..., quiet=True)``, :class:`~gold_plugin.local.launch.RayTeacher`.)
    """
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    disabled_below = logging.root.manager.disable
    verbosity = hf_logging.get_verbosity()
    bars_on, hub_bars_off = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    with _environment(QUIET_ENVIRONMENT), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            logging.disable(disabled_below)
            hf_logging.set_verbosity(verbosity)
            if bars_on:
                hf_logging.enable_progress_bar()
            if hub_bars_off:
                hub_utils.disable_progress_bars()
            else:
                hub_utils.enable_progress_bars()


@contextlib.contextmanager
def pinned(seed: int, num_threads: int = 1) -> Iterator[None]:
    """What makes the demo's figures move between runs on machines of one kind, fixed while the block runs:
    ``num_threads`` torch threads here and ``OMP_NUM_THREADS`` for the Ray teacher (a float sum's order follows
    the thread count), Python's, NumPy's and torch's RNGs seeded with ``seed``, and torch's deterministic
    algorithms (``warn_only``: an op without one still runs; ``CUBLAS_WORKSPACE_CONFIG`` for cuBLAS on a GPU).
    The thread count and the deterministic switch are restored on exit (the RNGs are left seeded).
    """
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    environment = {"OMP_NUM_THREADS": str(num_threads), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    with _environment(environment):
        torch.set_num_threads(num_threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


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


def run_demo(args: argparse.Namespace) -> dict[str, float]:
    """Prepare (or reuse) the models, run GOLD from the student, print and return the accuracy table (and
    plot it), quietly (:func:`quiet`) and pinned (:func:`pinned`: ``--train.seed``, ``--local.num_threads``).

    ``args`` is a command line parsed with :func:`demo_defaults` as defaults (``gold_plugin.local.cli``).
    """
    from gold_plugin.local.config import configs_from_args
    from gold_plugin.local.launch import train

    options = vars(args)
    run_dir = Path(options["local.run_dir"])
    with quiet(), pinned(options["train.seed"], options["local.num_threads"] or 1):
        models = prepare_models(run_dir, progress=True)
        config, gold = configs_from_args(args)
        metrics_path = Path(config.metrics_path) if config.metrics_path else None
        if metrics_path is not None and metrics_path.exists() and not config.load_checkpoint:
            metrics_path.unlink()
        history = train(config, gold, quiet=True)
        return report(history, models.teacher_accuracy, run_dir)
