"""``--backend local --demo``: the demo's option values, and its run (:func:`run_demo`): prepare the models, train
the student with GOLD on the local backend, report.

The local backend's command line (:mod:`gold_plugin.local.cli`) imports this module only when ``--demo`` is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gold_plugin.demo.environment import pinned, quiet
from gold_plugin.demo.prepare import DemoModels, model_paths, prepare_models
from gold_plugin.demo.report import report
from gold_plugin.local.config import configs_from_args

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


def run_demo(args: argparse.Namespace) -> dict[str, float]:
    """Prepare (or reuse) the models, run GOLD from the student, print and return the accuracy table (and
    plot it), quietly (:func:`quiet`) and pinned (:func:`pinned`: ``--train.seed``, ``--local.num_threads``).

    ``args`` is a command line parsed with :func:`demo_defaults` as defaults (:func:`gold_plugin.local.cli.parse_args`).
    """
    from gold_plugin.local.launch import train  # looked up at run time (tests replace it)

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
