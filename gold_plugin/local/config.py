"""The local backend's options, declared once: the fields of :class:`LocalTrainConfig`.

Each option field names its command-line option (OpenRLHF 0.11.2's dotted name where OpenRLHF has one:
``--actor.adam.lr``, ``--rollout.n_samples_per_prompt``, ``--ckpt.path`` ...; ``--local.*`` for options of this
backend only), its help text and its help group (:func:`gold_plugin.cli_options.option`);
:func:`add_local_arguments` derives the argparse options from them and :func:`local_config_from_args` the config
back from a parsed command line, through the builder that ``--gold.*`` uses too (:mod:`gold_plugin.cli_options`).
Fields without an option hold what the options point to (the prompt rows, the reward function), loaded by
:func:`local_config_from_args`.

A :class:`LocalTrainConfig` is frozen and validated when it is built; errors are
:class:`~gold_plugin.config.GoldConfigError` naming the option to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

from gold_plugin.cli_options import add_grouped_options, declared_options, option, option_values
from gold_plugin.config import GoldConfig, GoldConfigError, gold_config_from_args
from gold_plugin.prompt_dataset import LOCAL_SUFFIXES, check_prompts, read_rows

RewardFunc = Callable[[list[str], list[str], list[str]], Any]
AdvantageEstimator = Literal["group_norm", "dr_grpo", "reinforce_baseline", "rloo", "reinforce"]

# Help groups, in --help order.
MODEL_AND_DATA = "model and data (OpenRLHF names)"
OPTIMISATION = "optimisation (OpenRLHF names)"
CHECKPOINTS = "checkpoints and logging (OpenRLHF names)"
LOCAL = "local backend (--local.*)"
GROUPS = (MODEL_AND_DATA, OPTIMISATION, CHECKPOINTS, LOCAL)


@dataclass(frozen=True)
class LocalTrainConfig:
    """Options of the local backend that are not GOLD options; frozen and validated when built."""

    # -- model and data
    student: str | None = option(
        "actor.model_name_or_path", None, "Student: HF folder or hub name.", group=MODEL_AND_DATA
    )
    prompt_dataset: str | None = option(
        "data.prompt_dataset", None, "Prompts: a .jsonl/.json file or an HF dataset.", group=MODEL_AND_DATA
    )
    prompt_split: str = option("data.prompt_split", "train", group=MODEL_AND_DATA)
    input_key: str = option("data.input_key", "input", group=MODEL_AND_DATA)
    label_key: str | None = option(
        "data.label_key", None, "Field passed to the reward function as the label.", group=MODEL_AND_DATA
    )
    output_key: str | None = option(
        "data.output_key",
        None,
        "Field holding a reference completion (the off-policy samples of --gold.lmbda < 1; not needed with "
        "--gold.off_policy_source teacher).",
        group=MODEL_AND_DATA,
    )
    apply_chat_template: bool = option("data.apply_chat_template", False, group=MODEL_AND_DATA, switch=True)
    max_samples: int = option("data.max_samples", int(1e8), group=MODEL_AND_DATA)
    eval_dataset: str | None = option(
        "eval.dataset", None, "Held-out prompts for greedy accuracy.", group=MODEL_AND_DATA
    )
    eval_split: str = option("eval.split", "train", group=MODEL_AND_DATA)
    eval_steps: int = option(
        "eval.steps", -1, "Evaluate every N steps (-1: only start and end; 0: never).", group=MODEL_AND_DATA
    )
    # -- optimisation
    learning_rate: float = option("actor.adam.lr", 1e-6, group=OPTIMISATION)
    adam_betas: tuple[float, float] = option("actor.adam.betas", (0.9, 0.95), group=OPTIMISATION)
    weight_decay: float = option("actor.adam.weight_decay", 0.0, group=OPTIMISATION)
    lr_warmup_ratio: float = option("actor.lr_warmup_ratio", 0.03, group=OPTIMISATION)
    min_lr_ratio: float = option("actor.min_lr_ratio", 0.1, group=OPTIMISATION)
    max_norm: float = option("actor.max_norm", 1.0, group=OPTIMISATION)
    eps_clip: float = option("actor.eps_clip", 0.2, group=OPTIMISATION)
    rollout_batch_size: int = option("rollout.batch_size", 8, "Prompts per step.", group=OPTIMISATION)
    n_samples_per_prompt: int = option("rollout.n_samples_per_prompt", 1, group=OPTIMISATION)
    temperature: float = option("rollout.temperature", 1.0, group=OPTIMISATION)
    top_p: float = option("rollout.top_p", 1.0, group=OPTIMISATION)
    max_new_tokens: int = option("rollout.max_new_tokens", 64, group=OPTIMISATION)
    train_batch_size: int | None = option(
        "train.batch_size",
        None,
        "Samples per optimizer step (default: the whole rollout).",
        group=OPTIMISATION,
    )
    micro_batch_size: int = option("train.micro_batch_size", 64, group=OPTIMISATION)
    max_epochs: int = option("train.max_epochs", 1, group=OPTIMISATION)
    num_episodes: int = option("train.num_episodes", 1, group=OPTIMISATION)
    seed: int = option("train.seed", 42, group=OPTIMISATION)
    advantage_estimator: AdvantageEstimator = option(
        "algo.advantage.estimator",
        "group_norm",
        "Task-reward estimator (used when alpha < 1).",
        group=OPTIMISATION,
    )
    reward_remote_url: str | None = option(
        "reward.remote_url",
        None,
        "A .py file defining reward_func(queries, prompts, labels).",
        group=OPTIMISATION,
    )
    # -- checkpoints and logging
    ckpt_path: str | None = option("ckpt.path", "./ckpt/checkpoints_gold_local", group=CHECKPOINTS)
    save_steps: int = option("ckpt.save_steps", -1, group=CHECKPOINTS)
    load_checkpoint: bool = option("ckpt.load_enable", False, group=CHECKPOINTS, switch=True)
    max_ckpt_num: int = option("ckpt.max_num", 3, group=CHECKPOINTS)
    output_dir: str | None = option("ckpt.output_dir", None, "Final student (HF folder).", group=CHECKPOINTS)
    logging_steps: int = option("logger.logging_steps", 1, group=CHECKPOINTS)
    tensorboard_dir: str | None = option("logger.tensorboard_dir", None, group=CHECKPOINTS)
    # -- this backend only
    max_steps: int | None = option(
        "local.max_steps", None, "Steps to run (default: from episodes).", group=LOCAL
    )
    device: str = option("local.device", "auto", "auto | cpu | cuda | cuda:N.", group=LOCAL)
    teacher_in_process: bool = option(
        "local.teacher_in_process",
        False,
        "Score with an in-process teacher instead of a Ray TeacherGroup (no Ray needed).",
        group=LOCAL,
        switch=True,
    )
    metrics_path: str | None = option(
        "local.metrics_path", None, "Metrics jsonl (default: <ckpt.path>/metrics.jsonl).", group=LOCAL
    )
    no_progress: bool = option("local.no_progress", False, "No progress bar.", group=LOCAL, switch=True)
    # -- what the options point to, loaded by local_config_from_args (not options themselves)
    prompts: list[dict] = field(default_factory=list)
    """Training prompt rows (from --data.prompt_dataset)."""
    eval_prompts: list[dict] = field(default_factory=list)
    """Held-out prompt rows (from --eval.dataset)."""
    reward_func: RewardFunc | None = None
    """``reward_func(queries, prompts, labels)`` (from --reward.remote_url)."""
    eval_max_new_tokens: int | None = None
    """Response length of the greedy evaluation (default: ``max_new_tokens``)."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def progress(self) -> bool:
        """Whether to show a progress bar."""
        return not self.no_progress

    def validate(self) -> None:
        """Raise :class:`GoldConfigError` naming the option to change if a value cannot work."""
        if not self.student:
            raise GoldConfigError("Set --actor.model_name_or_path (or use --demo).")
        if not self.prompts:
            raise GoldConfigError(
                "No training prompts: set --data.prompt_dataset (a .jsonl/.json file or HF dataset)."
            )
        for name, hint in _hints().items():
            if get_origin(hint) is Literal and getattr(self, name) not in get_args(hint):
                raise GoldConfigError(
                    f"{_flag(name)} must be one of {list(get_args(hint))}, got {getattr(self, name)!r}."
                )
        at_least_one = (
            "rollout_batch_size",
            "n_samples_per_prompt",
            "max_new_tokens",
            "micro_batch_size",
            "max_epochs",
            "num_episodes",
            "max_ckpt_num",
            "max_samples",
        )
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise GoldConfigError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}.")
        for name in ("train_batch_size", "eval_max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise GoldConfigError(f"{_flag(name)} must be >= 1 (or unset), got {value}.")
        if self.max_steps is not None and self.max_steps < 0:
            raise GoldConfigError(f"--local.max_steps must be >= 0, got {self.max_steps}.")
        if self.temperature <= 0:
            raise GoldConfigError(f"--rollout.temperature must be > 0, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise GoldConfigError(f"--rollout.top_p must be in (0, 1], got {self.top_p}.")
        for name in (
            "learning_rate",
            "weight_decay",
            "lr_warmup_ratio",
            "min_lr_ratio",
            "max_norm",
            "eps_clip",
        ):
            if getattr(self, name) < 0:
                raise GoldConfigError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}.")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise GoldConfigError(f"--actor.adam.betas must be two values in [0, 1), got {self.adam_betas}.")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, ValueError) as err:
                raise GoldConfigError(
                    f"--local.device {self.device!r} is not a device: use auto, cpu, cuda or cuda:N."
                ) from err

    def check_gold(self, gold: GoldConfig) -> None:
        """Raise :class:`GoldConfigError` for a combination with the GOLD options that cannot work."""
        if gold.needs_reward and self.reward_func is None:
            raise GoldConfigError(
                f"--gold.alpha {gold.alpha} < 1 mixes in a task reward: give --reward.remote_url "
                "path/to/reward.py (defining reward_func(queries, prompts, labels)), or set --gold.alpha 1."
            )
        if gold.needs_references and not self.output_key:
            raise GoldConfigError(
                f"--gold.lmbda {gold.lmbda} < 1 with --gold.off_policy_source {gold.off_policy_source} trains a share "
                "of the prompts on the dataset's reference completions: set --data.output_key (the completion column), "
                "or --gold.off_policy_source teacher (the teacher writes them), or --gold.lmbda 1."
            )
        if gold.needs_reward and self.advantage_estimator == "rloo" and self.n_samples_per_prompt < 2:
            raise GoldConfigError(
                "--algo.advantage.estimator rloo needs --rollout.n_samples_per_prompt >= 2."
            )


def _hints() -> dict[str, Any]:
    return get_type_hints(LocalTrainConfig)


def option_fields() -> list[dataclasses.Field]:
    """The fields of :class:`LocalTrainConfig` that are command-line options, in declaration order."""
    return [f for f in dataclasses.fields(LocalTrainConfig) if "option" in f.metadata]


def _flag(field_name: str) -> str:
    """``--<option>`` of an option field, or the field's own name for the others (error messages)."""
    names = {f.name: f"--{f.metadata['option']}" for f in option_fields()}
    return names.get(field_name, field_name)


def add_local_arguments(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """Register every option field of :class:`LocalTrainConfig` in its help group; returns the groups by title."""
    return add_grouped_options(parser, declared_options(LocalTrainConfig), GROUPS)


def configs_from_args(args: argparse.Namespace) -> tuple[LocalTrainConfig, GoldConfig]:
    """The local and GOLD configs of a parsed command line, each validated (together: :meth:`check_gold`)."""
    return local_config_from_args(args), gold_config_from_args(args)


def local_config_from_args(args: argparse.Namespace) -> LocalTrainConfig:
    """The validated :class:`LocalTrainConfig` a parsed command line describes (prompts and reward loaded)."""
    values = option_values(args, declared_options(LocalTrainConfig))
    if values["metrics_path"] is None and values["ckpt_path"]:
        values["metrics_path"] = os.path.join(values["ckpt_path"], "metrics.jsonl")
    key = values["input_key"]
    if values["prompt_dataset"]:
        values["prompts"] = load_prompt_rows(
            values["prompt_dataset"],
            values["prompt_split"],
            values["max_samples"],
            key,
            "data.prompt_dataset",
        )
    if values["eval_dataset"]:
        values["eval_prompts"] = load_prompt_rows(
            values["eval_dataset"], values["eval_split"], None, key, "eval.dataset"
        )
    if values["reward_remote_url"]:
        values["reward_func"] = load_reward_func(values["reward_remote_url"])
    return LocalTrainConfig(**values)


def load_prompt_rows(
    source: str, split: str, max_samples: int | None, input_key: str, option: str
) -> list[dict]:
    """Rows of a .jsonl / .json file, or of an HF dataset (``datasets.load_dataset``), each checked to hold a prompt
    under ``input_key``: a bad row stops the run at start, naming its line (:mod:`gold_plugin.prompt_dataset`)."""
    if source.endswith(LOCAL_SUFFIXES):
        rows, lines = read_rows(source, option)
    else:
        import datasets

        rows, lines = list(datasets.load_dataset(source, split=split)), None
    check_prompts(rows, source, input_key, option, lines)
    return rows[:max_samples] if max_samples else rows


def load_reward_func(path: str) -> RewardFunc:
    """``reward_func(queries, prompts, labels)`` from a Python file (OpenRLHF's ``--reward.remote_url x.py``)."""
    import importlib.util

    if not path.endswith(".py") or not os.path.isfile(path):
        raise GoldConfigError(
            f"--reward.remote_url {path!r}: the local backend takes a Python file defining "
            "reward_func(queries, prompts, labels) (HTTP reward servers are for the OpenRLHF backend)."
        )
    spec = importlib.util.spec_from_file_location("gold_local_reward", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if not hasattr(module, "reward_func"):
        raise GoldConfigError(
            f"--reward.remote_url {path}: the file defines no reward_func(queries, prompts, labels)."
        )
    return module.reward_func
