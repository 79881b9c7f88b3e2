"""GOLD trainers: OpenRLHF's sync and async PPO trainers with :class:`GoldExperienceMaker`.

OpenRLHF's trainers are Ray actor classes; they are subclassed through ``__ray_actor_class__``. The base
constructors build a plain ``RemoteExperienceMaker`` (cheap: it only stores references); the GOLD subclasses
replace it with a ``GoldExperienceMaker`` that holds the teacher group, the teacher's tokenizer and the raw-prompt
lookup for the teacher's chat template.
"""

from __future__ import annotations

from typing import Any

import ray
from openrlhf.trainer.ppo_trainer import PPOTrainer
from openrlhf.trainer.ppo_trainer_async import GenerateSamplesActor, PPOTrainerAsync, TrainingActor, VLLMLock
from openrlhf.utils.logging_utils import init_logger
from ray.util.queue import Queue

from gold_plugin.config import gold_config_from_args
from gold_plugin.teacher.tokenizer import load_teacher_tokenizer

from .experience_maker import GoldExperienceMaker
from .prompts import load_prompt_lookup, load_reference_lookup

logger = init_logger(__name__)


def install_gold_experience_maker(trainer: Any, teacher: Any) -> GoldExperienceMaker:
    """Replace ``trainer.experience_maker`` (built by OpenRLHF's ``BasePPOTrainer``) with the GOLD one."""
    strategy = trainer.strategy
    gold = gold_config_from_args(strategy.args)
    prompt_lookup = None
    if gold.teacher.chat_template == "teacher":
        prompt_lookup = load_prompt_lookup(strategy, trainer.tokenizer)
        logger.info(f"GOLD: raw chat prompts for the teacher's template: {len(prompt_lookup)} prompts")
    reference_lookup = None
    if gold.needs_references:
        reference_lookup = load_reference_lookup(strategy, trainer.tokenizer)
        logger.info(f"GOLD: reference completions for lmbda={gold.lmbda}: {len(reference_lookup)} prompts")
    base = trainer.experience_maker
    trainer.experience_maker = GoldExperienceMaker(
        base.actor_model_group,
        base.critic_model_group,
        base.reward_model_group,
        base.initial_model_group,
        base.kl_ctl,
        strategy,
        trainer.tokenizer,
        teacher=teacher,
        gold_config=gold,
        teacher_tokenizer=load_teacher_tokenizer(gold.teacher),
        prompt_lookup=prompt_lookup,
        reference_lookup=reference_lookup,
    )
    return trainer.experience_maker


@ray.remote
class GoldPPOTrainer(PPOTrainer.__ray_actor_class__):
    """OpenRLHF's synchronous PPO trainer (single controller) with GOLD experiences.

    Same arguments as OpenRLHF's ``PPOTrainer`` plus ``teacher``: the :class:`~gold_plugin.teacher.TeacherGroup`.
    """

    def __init__(
        self, pretrain: str, strategy: Any, *groups: Any, teacher: Any, **generate_kwargs: Any
    ) -> None:
        super().__init__(pretrain, strategy, *groups, **generate_kwargs)
        install_gold_experience_maker(self, teacher)


@ray.remote
class GoldTrainingActor(TrainingActor.__ray_actor_class__):
    """The training half of OpenRLHF's async trainer, with GOLD experiences."""

    def __init__(self, pretrain: str, strategy: Any, *groups: Any, teacher: Any, **kwargs: Any) -> None:
        super().__init__(pretrain, strategy, *groups, **kwargs)
        install_gold_experience_maker(self, teacher)


@ray.remote
class GoldPPOTrainerAsync(PPOTrainerAsync.__ray_actor_class__):
    """OpenRLHF's async trainer (rollout and training overlap) whose training actor is :class:`GoldTrainingActor`.

    The base constructor would start OpenRLHF's own training actor, so this one builds the same parts
    (rollout queue, slot tokens, vLLM lock, sample generator) around the GOLD training actor instead.
    """

    def __init__(
        self,
        pretrain: str,
        strategy: Any,
        actor_model_group: Any,
        critic_model_group: Any,
        reward_model_group: Any,
        reference_model_group: Any,
        vllm_engines: Any,
        *,
        teacher: Any,
        **generate_kwargs: Any,
    ) -> None:
        args = strategy.args
        if args.eval.steps == -1:
            args.eval.steps = float("inf")
        if args.ckpt.save_steps == -1:
            args.ckpt.save_steps = float("inf")
        queue_size = int(getattr(args.train, "async_queue_size", 1))
        if queue_size <= 0:
            raise ValueError(f"--train.async_queue_size must be positive, got {queue_size}.")
        self.rollout_queue = Queue(maxsize=queue_size)
        self.rollout_slots = Queue(maxsize=queue_size)  # counting semaphore: one token per queued batch
        for _ in range(queue_size):
            self.rollout_slots.put(0, block=True)
        vllm_lock = VLLMLock.remote()
        shared = dict(vllm_lock=vllm_lock, rollout_queue=self.rollout_queue, rollout_slots=self.rollout_slots)
        self.generator_actor = GenerateSamplesActor.remote(
            pretrain=pretrain, strategy=strategy, vllm_engines=vllm_engines, **shared, **generate_kwargs
        )
        self.trainer_actor = GoldTrainingActor.remote(
            pretrain,
            strategy,
            actor_model_group,
            critic_model_group,
            reward_model_group,
            reference_model_group,
            vllm_engines,
            teacher=teacher,
            **shared,
        )
