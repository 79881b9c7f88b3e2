"""GOLD trainers: OpenRLHF's sync and async PPO trainers with :class:`GoldExperienceMaker`.

OpenRLHF's trainers are Ray actor classes; they are subclassed through ``__ray_actor_class__``. The base
constructors build a plain ``RemoteExperienceMaker`` (cheap: it only stores references); the GOLD subclasses
replace it with a ``GoldExperienceMaker`` that holds the teacher group, the teacher's tokenizer and the raw-prompt
lookup for the teacher's chat template; :class:`DrawAtGlobalStep` makes their off-policy draws resume exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ray
import torch
from openrlhf.trainer.ppo_trainer import PPOTrainer
from openrlhf.trainer.ppo_trainer_async import GenerateSamplesActor, PPOTrainerAsync, TrainingActor
from openrlhf.utils.logging_utils import init_logger

from gold_plugin.config import gold_config_from_args
from gold_plugin.teacher.tokenizer import check_teacher_chat_template, load_teacher_tokenizer

from .compat import rebound, with_arguments
from .experience_maker import GoldExperienceMaker
from .prompts import load_prompt_lookup, load_reference_lookup

if TYPE_CHECKING:
    from openrlhf.trainer.ppo_trainer import BasePPOTrainer
    from openrlhf.utils.deepspeed import DeepspeedStrategy

    from gold_plugin.teacher.types import TeacherScorer

logger = init_logger(__name__)


def seed_prompt_order(args: Any) -> None:
    """Seed this process's torch RNG with ``--train.seed`` before OpenRLHF builds its prompt data loader.

    OpenRLHF 0.11.2's trainer (and the async trainer's sample generator) shuffles the prompts with a
    ``StatefulDataLoader`` whose sampler takes its seed from the process's global torch RNG, which nothing seeds
    there (OpenRLHF seeds only the model actors): two jobs with the same options trained on different prompt
    orders. Seeded, the order is a function of ``--train.seed``; a resumed job gets the sampler's state back from
    OpenRLHF's checkpoint (``data_loader_state_dict``) either way.
    """
    torch.manual_seed(int(args.train.seed))


def install_gold_experience_maker(trainer: BasePPOTrainer, teacher: TeacherScorer) -> GoldExperienceMaker:
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
    teacher_tokenizer = load_teacher_tokenizer(gold.teacher)
    chat_prompts = bool(getattr(strategy.args.data, "apply_chat_template", False))
    check_teacher_chat_template(gold, teacher_tokenizer, chat_prompts)
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
        teacher_tokenizer=teacher_tokenizer,
        prompt_lookup=prompt_lookup,
        reference_lookup=reference_lookup,
    )
    return trainer.experience_maker


class DrawAtGlobalStep:
    """Mixin for OpenRLHF's trainers: the off-policy draw of a rollout batch is made at OpenRLHF's global step.

    OpenRLHF's ``train_step(rollout_samples, global_step)`` gets the count of training steps before this batch, the
    ``global_step`` it saves in every checkpoint's client states and restores on ``--ckpt.load_enable`` (sync and
    async trainers alike). Taking the draw's step from it makes a resumed job draw, at step ``k + 1``, what the
    uninterrupted job drew there; the plugin keeps no other state across steps (the draw is seeded by
    ``(--train.seed, step)`` alone and every signal is normalised within its rollout), so nothing of its own goes
    into the checkpoint.
    """

    experience_maker: GoldExperienceMaker

    def train_step(self, rollout_samples: list, global_step: int) -> tuple[dict, int]:
        """OpenRLHF's training step, its experience maker set to draw at ``global_step``."""
        self.experience_maker.draw_step = global_step
        return super().train_step(rollout_samples, global_step)  # type: ignore[misc]


@ray.remote
class GoldPPOTrainer(DrawAtGlobalStep, PPOTrainer.__ray_actor_class__):
    """OpenRLHF's synchronous PPO trainer (single controller) with GOLD experiences.

    Same arguments as OpenRLHF's ``PPOTrainer`` plus ``teacher``: the :class:`~gold_plugin.teacher.TeacherGroup`.
    """

    def __init__(
        self,
        pretrain: str,
        strategy: DeepspeedStrategy,
        *groups: Any,
        teacher: TeacherScorer,
        **generate_kwargs: Any,
    ) -> None:
        seed_prompt_order(strategy.args)
        super().__init__(pretrain, strategy, *groups, **generate_kwargs)
        install_gold_experience_maker(self, teacher)


@ray.remote
class GoldTrainingActor(DrawAtGlobalStep, TrainingActor.__ray_actor_class__):
    """The training half of OpenRLHF's async trainer, with GOLD experiences."""

    def __init__(
        self, pretrain: str, strategy: DeepspeedStrategy, *groups: Any, teacher: TeacherScorer, **kwargs: Any
    ) -> None:
        super().__init__(pretrain, strategy, *groups, **kwargs)
        install_gold_experience_maker(self, teacher)


@ray.remote
class GoldGenerateSamplesActor(GenerateSamplesActor.__ray_actor_class__):
    """The rollout half of OpenRLHF's async trainer, its prompt order seeded by ``--train.seed``
    (:func:`seed_prompt_order`)."""

    def __init__(self, pretrain: str, strategy: Any, *args: Any, **kwargs: Any) -> None:
        seed_prompt_order(strategy.args)
        super().__init__(pretrain, strategy, *args, **kwargs)


@ray.remote
class GoldPPOTrainerAsync(PPOTrainerAsync.__ray_actor_class__):
    """OpenRLHF's async trainer (rollout and training overlap) with :class:`GoldTrainingActor` and
    :class:`GoldGenerateSamplesActor`: OpenRLHF's own constructor, the two actor classes it starts rebound to the
    GOLD ones for the call (``compat``'s ``async_actors`` entry), the training actor also given the teacher."""

    def __init__(self, *args: Any, teacher: TeacherScorer, **generate_kwargs: Any) -> None:
        base_init = PPOTrainerAsync.__ray_actor_class__.__init__
        with (
            rebound(base_init, "GenerateSamplesActor", GoldGenerateSamplesActor),
            rebound(base_init, "TrainingActor", with_arguments(GoldTrainingActor, teacher=teacher)),
        ):
            super().__init__(*args, **generate_kwargs)
