"""Run the local backend from validated configs: start the teacher, train, save, stop the teacher.

Shared by the command line (:mod:`gold_plugin.local.cli`) and the demo (:mod:`gold_plugin.demo.run`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gold_plugin.config import GoldConfig, TeacherConfig
from gold_plugin.local.config import LocalTrainConfig
from gold_plugin.teacher.types import TeacherRequest, TeacherResult, TeacherScorer

if TYPE_CHECKING:
    from gold_plugin.alignment.types import ChatTokenizer


class RayTeacher(TeacherScorer):
    """A Ray :class:`~gold_plugin.teacher.TeacherGroup` started on a local Ray instance (which :meth:`close` stops
    again if it started it).

    ``quiet`` (the demo): the replicas' output stays in Ray's log files instead of being copied to this terminal
    (errors still reach the caller with their traceback, through ``ray.get``).
    """

    def __init__(self, teacher: TeacherConfig, device: str, *, quiet: bool = False) -> None:
        import ray

        from gold_plugin.teacher import TeacherGroup

        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            ray.init(include_dashboard=False, log_to_driver=not quiet, configure_logging=False)
        self.group = TeacherGroup(teacher, scorer_overrides={"device": device})
        self.topk = self.group.topk

    @property
    def tokenizer(self) -> ChatTokenizer:
        return self.group.tokenizer

    def score(self, requests: Sequence[TeacherRequest]) -> list[TeacherResult]:
        return self.group.score(requests)

    def score_counting_retries(self, requests: Sequence[TeacherRequest]) -> tuple[list[TeacherResult], int]:
        return self.group.score_counting_retries(requests)

    def close(self) -> None:
        import ray

        self.group.close()
        if self._started_ray:
            ray.shutdown()


def make_teacher(
    teacher: TeacherConfig, in_process: bool, device: str, *, quiet: bool = False
) -> TeacherScorer:
    """An in-process :class:`~gold_plugin.teacher.HFTeacher`, or a Ray ``TeacherGroup`` on a local Ray
    (``quiet``: see :class:`RayTeacher`); a served teacher (``--gold.teacher.backend server``) is called from this
    process either way.

    On the CPU the Ray replicas ask for no GPU (a copy of ``teacher`` with ``num_gpus_per_replica=0``; the
    validated config itself is left as it is).
    """
    from gold_plugin.teacher import build_teacher

    if teacher.backend == "server":
        return build_teacher(teacher)
    if in_process:
        return build_teacher(teacher, device=device)
    if device == "cpu" and teacher.num_gpus_per_replica:
        teacher = dataclasses.replace(teacher, num_gpus_per_replica=0.0)
    return RayTeacher(teacher, device, quiet=quiet)


def train(config: LocalTrainConfig, gold: GoldConfig, *, quiet: bool = False) -> list[dict[str, float]]:
    """Train as ``config`` and ``gold`` say (a checkpoint at the end when ``ckpt_path`` is set); the history.

    ``quiet`` (the demo) keeps a Ray teacher's output out of the terminal (:class:`RayTeacher`).
    """
    from gold_plugin.local.modeling import resolve_device
    from gold_plugin.local.trainer import LocalTrainer
    from gold_plugin.teacher.tokenizer import check_teacher_chat_template, load_teacher_tokenizer

    config.check_gold(gold)
    device = str(resolve_device(config.device))
    teacher_tokenizer = load_teacher_tokenizer(gold.teacher)
    check_teacher_chat_template(gold, teacher_tokenizer, config.apply_chat_template)
    teacher = (
        make_teacher(gold.teacher, config.teacher_in_process, device, quiet=quiet) if gold.alpha > 0 else None
    )
    try:
        trainer = LocalTrainer(config, gold, teacher, teacher_tokenizer)
        history = trainer.fit()
        if config.ckpt_path:
            trainer.save_checkpoint()
    finally:
        if teacher is not None:
            teacher.close()
    return history
