"""``python launchers/train_gold.py --backend local ...``: GOLD on one machine (CPU or one GPU).

Options keep OpenRLHF 0.11.2's dotted names where OpenRLHF has them (``--actor.model_name_or_path``,
``--data.prompt_dataset``, ``--rollout.n_samples_per_prompt``, ``--actor.adam.lr``, ``--ckpt.path`` ...), the
same ``--gold.*`` options as the OpenRLHF backend, and a few ``--local.*`` options of this backend.
``--demo`` runs the self-contained demo (nothing from a hub): see :mod:`gold_plugin.local.demo`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from gold_plugin.config import GoldConfigError, add_gold_arguments, gold_config_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_gold.py --backend local",
        description="GOLD on-policy cross-tokenizer distillation on one machine (HF generate + AdamW).",
    )
    p.add_argument(
        "--demo", action="store_true", help="Run the self-contained demo (addition, two tokenizers)."
    )
    g = p.add_argument_group("model and data (OpenRLHF names)")
    g.add_argument("--actor.model_name_or_path", default=None, help="Student: HF folder or hub name.")
    g.add_argument(
        "--data.prompt_dataset", default=None, help="Prompts: a .jsonl/.json file or an HF dataset."
    )
    g.add_argument("--data.prompt_split", default="train")
    g.add_argument("--data.input_key", default="input")
    g.add_argument("--data.label_key", default=None)
    g.add_argument("--data.apply_chat_template", action="store_true", default=False)
    g.add_argument("--data.max_samples", type=int, default=int(1e8))
    g.add_argument("--eval.dataset", default=None, help="Held-out prompts for greedy accuracy.")
    g.add_argument("--eval.split", default="train")
    g.add_argument(
        "--eval.steps", type=int, default=-1, help="Evaluate every N steps (-1: only start and end)."
    )
    g = p.add_argument_group("optimisation (OpenRLHF names)")
    g.add_argument("--actor.adam.lr", type=float, default=1e-6)
    g.add_argument("--actor.adam.betas", type=float, nargs=2, default=(0.9, 0.95))
    g.add_argument("--actor.adam.weight_decay", type=float, default=0.0)
    g.add_argument("--actor.lr_warmup_ratio", type=float, default=0.03)
    g.add_argument("--actor.min_lr_ratio", type=float, default=0.1)
    g.add_argument("--actor.max_norm", type=float, default=1.0)
    g.add_argument("--actor.eps_clip", type=float, default=0.2)
    g.add_argument("--rollout.batch_size", type=int, default=8, help="Prompts per step.")
    g.add_argument("--rollout.n_samples_per_prompt", type=int, default=1)
    g.add_argument("--rollout.temperature", type=float, default=1.0)
    g.add_argument("--rollout.top_p", type=float, default=1.0)
    g.add_argument("--rollout.max_new_tokens", type=int, default=64)
    g.add_argument(
        "--train.batch_size", type=int, default=None, help="Samples per optimizer step (default: all)."
    )
    g.add_argument("--train.micro_batch_size", type=int, default=64)
    g.add_argument("--train.max_epochs", type=int, default=1)
    g.add_argument("--train.num_episodes", type=int, default=1)
    g.add_argument("--train.seed", type=int, default=42)
    g.add_argument(
        "--algo.advantage.estimator", default="group_norm", help="Task-reward estimator (alpha < 1)."
    )
    g.add_argument(
        "--algo.advantage.no_std_norm",
        action="store_true",
        default=False,
        help="Normalise the distillation advantages by their mean only (not the std).",
    )
    g.add_argument(
        "--reward.remote_url", default=None, help="A .py file defining reward_func(queries, prompts, labels)."
    )
    g = p.add_argument_group("checkpoints and logging (OpenRLHF names)")
    g.add_argument("--ckpt.path", default="./ckpt/checkpoints_gold_local")
    g.add_argument("--ckpt.save_steps", type=int, default=-1)
    g.add_argument("--ckpt.load_enable", action="store_true", default=False)
    g.add_argument("--ckpt.max_num", type=int, default=3)
    g.add_argument("--ckpt.output_dir", default=None, help="Final student (HF folder).")
    g.add_argument("--logger.logging_steps", type=int, default=1)
    g.add_argument("--logger.tensorboard_dir", default=None)
    g = p.add_argument_group("local backend (--local.*)")
    g.add_argument("--local.max_steps", type=int, default=None, help="Steps to run (default: from episodes).")
    g.add_argument("--local.device", default="auto", help="auto | cpu | cuda | cuda:N.")
    g.add_argument(
        "--local.advantage_norm",
        default="whiten",
        choices=["whiten", "mean", "none"],
        help="Normalisation of the distillation advantages over the rollout's tokens, as OpenRLHF normalises "
        "reinforce-type advantages (whiten: minus mean, over std; none: raw -d_g).",
    )
    g.add_argument(
        "--local.teacher_in_process",
        action="store_true",
        default=False,
        help="Score with an in-process teacher instead of a Ray TeacherGroup (no Ray needed).",
    )
    g.add_argument(
        "--local.metrics_path", default=None, help="Metrics jsonl (default: <ckpt.path>/metrics.jsonl)."
    )
    g.add_argument("--local.run_dir", default="./runs/gold_demo", help="Demo: where models and results go.")
    g.add_argument("--local.num_threads", type=int, default=None, help="torch CPU threads.")
    g.add_argument("--local.no_progress", action="store_true", default=False)
    add_gold_arguments(p)
    return p


def load_rows(source: str, split: str = "train", max_samples: int | None = None) -> list[dict]:
    """Rows of a .jsonl / .json file, or of an HF dataset (``datasets.load_dataset``)."""
    if os.path.isfile(source) and source.endswith((".jsonl", ".json")):
        with open(source) as f:
            if source.endswith(".jsonl"):
                rows = [json.loads(line) for line in f if line.strip()]
            else:
                rows = json.load(f)
    else:
        import datasets

        rows = list(datasets.load_dataset(source, split=split))
    return rows[:max_samples] if max_samples else rows


def train_config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`LocalTrainConfig` a parsed command line describes (datasets loaded, reward loaded)."""
    from gold_plugin.local.trainer import LocalTrainConfig, load_reward_func, prompt_rows

    a = vars(args)
    if not a["actor.model_name_or_path"] or not a["data.prompt_dataset"]:
        raise GoldConfigError("Set --actor.model_name_or_path and --data.prompt_dataset (or use --demo).")
    key = a["data.input_key"]
    ckpt = a["ckpt.path"]
    return LocalTrainConfig(
        student=a["actor.model_name_or_path"],
        prompts=prompt_rows(
            load_rows(a["data.prompt_dataset"], a["data.prompt_split"], a["data.max_samples"]), key
        ),
        eval_prompts=prompt_rows(load_rows(a["eval.dataset"], a["eval.split"]), key)
        if a["eval.dataset"]
        else [],
        input_key=key,
        label_key=a["data.label_key"],
        apply_chat_template=a["data.apply_chat_template"],
        learning_rate=a["actor.adam.lr"],
        adam_betas=tuple(a["actor.adam.betas"]),
        weight_decay=a["actor.adam.weight_decay"],
        lr_warmup_ratio=a["actor.lr_warmup_ratio"],
        min_lr_ratio=a["actor.min_lr_ratio"],
        max_norm=a["actor.max_norm"],
        eps_clip=a["actor.eps_clip"],
        rollout_batch_size=a["rollout.batch_size"],
        n_samples_per_prompt=a["rollout.n_samples_per_prompt"],
        temperature=a["rollout.temperature"],
        top_p=a["rollout.top_p"],
        max_new_tokens=a["rollout.max_new_tokens"],
        train_batch_size=a["train.batch_size"],
        micro_batch_size=a["train.micro_batch_size"],
        max_epochs=a["train.max_epochs"],
        num_episodes=a["train.num_episodes"],
        max_steps=a["local.max_steps"],
        seed=a["train.seed"],
        advantage_estimator=a["algo.advantage.estimator"],
        reward_func=load_reward_func(a["reward.remote_url"]) if a["reward.remote_url"] else None,
        ckpt_path=ckpt,
        save_steps=a["ckpt.save_steps"],
        load_checkpoint=a["ckpt.load_enable"],
        max_ckpt_num=a["ckpt.max_num"],
        output_dir=a["ckpt.output_dir"],
        eval_steps=a["eval.steps"],
        logging_steps=a["logger.logging_steps"],
        tensorboard_dir=a["logger.tensorboard_dir"],
        metrics_path=a["local.metrics_path"] or os.path.join(ckpt, "metrics.jsonl"),
        advantage_norm="mean" if a["algo.advantage.no_std_norm"] else a["local.advantage_norm"],
        device=a["local.device"],
        teacher_in_process=a["local.teacher_in_process"],
        progress=not a["local.no_progress"],
    )


class RayTeacher:
    """A Ray :class:`~gold_plugin.teacher.TeacherGroup` started on a local Ray instance."""

    def __init__(self, gold_config: Any, device: str) -> None:
        import ray

        from gold_plugin.teacher import TeacherGroup

        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)
        teacher = gold_config.teacher
        if device == "cpu":
            teacher.num_gpus_per_replica = 0.0
        self.group = TeacherGroup(teacher, scorer_overrides={"device": device})

    def score(self, requests):
        return self.group.score(requests)

    def close(self) -> None:
        import ray

        self.group.shutdown()
        if self._started_ray:
            ray.shutdown()


def make_teacher(gold_config: Any, in_process: bool, device: str) -> tuple[Any, Any]:
    """(scorer, teacher tokenizer): an in-process HFTeacher or a Ray TeacherGroup on a local Ray."""
    from transformers import AutoTokenizer

    from gold_plugin.teacher import build_teacher

    t = gold_config.teacher
    tokenizer = AutoTokenizer.from_pretrained(t.tokenizer_name_or_path or t.model_name_or_path)
    if in_process:
        return build_teacher(t, device=device), tokenizer
    return RayTeacher(gold_config, device), tokenizer


def run(args: argparse.Namespace) -> list[dict]:
    """Train as the parsed command line says; returns the metrics history."""
    from gold_plugin.local.modeling import resolve_device
    from gold_plugin.local.trainer import LocalTrainer

    gold = gold_config_from_args(args)
    if not gold.teacher.model_name_or_path:
        raise GoldConfigError("Set --gold.teacher.model_name_or_path (or use --demo).")
    config = train_config_from_args(args)
    device = str(resolve_device(config.device))
    teacher, teacher_tokenizer = (None, None)
    if gold.alpha > 0:
        teacher, teacher_tokenizer = make_teacher(gold, config.teacher_in_process, device)
    try:
        trainer = LocalTrainer(config, gold, teacher, teacher_tokenizer)
        history = trainer.fit()
        if config.ckpt_path:
            trainer.save_checkpoint()
    finally:
        if teacher is not None and hasattr(teacher, "close"):
            teacher.close()
    return history


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``--backend local`` (``argv`` without ``--backend local``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if vars(args)["local.num_threads"]:
        import torch

        torch.set_num_threads(vars(args)["local.num_threads"])
    try:
        if args.demo:
            from gold_plugin.local.demo import run_demo

            run_demo(args)
        else:
            run(args)
    except (GoldConfigError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0
