"""The cluster run: OpenRLHF's Ray layout plus a teacher group, with the GOLD trainer and policy actor.

Follows OpenRLHF 0.11.2's ``train_ppo_ray.train`` with these differences (decided in :class:`LaunchPlan`):

- a teacher :class:`~gold_plugin.teacher.TeacherGroup`, placed like the reference model: inside the actor's
  placement group (a GPU share per replica) with ``--train.colocate_actor_ref`` / ``--train.colocate_all``,
  otherwise on its own GPUs;
- a reward-model group only when a reward model is really used (never for ``--gold.alpha 1``, and never
  an uninitialised one when the reward comes from a remote URL or function);
- a reward function / remote URL handed to the vLLM engines only when ``alpha < 1``;
- ``GoldPolicyModelActor`` and ``GoldPPOTrainer`` / ``GoldPPOTrainerAsync`` instead of OpenRLHF's classes.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .launch_plan import COLOCATED_GPU_SHARE, LaunchPlan

if TYPE_CHECKING:
    from types import SimpleNamespace

    from ray.actor import ActorClass
    from ray.util.placement_group import PlacementGroup

    from gold_plugin.teacher.types import TeacherScorer

JOB_CONFIG_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Where ``ray job submit`` hands the job's runtime env to the driver (Ray refuses a ``ray.init`` runtime env that
sets a field or env var the job's already sets)."""


def job_runtime_env() -> dict[str, Any]:
    """The runtime env of the ``ray job submit`` that started this driver (empty outside a job)."""
    raw = os.environ.get(JOB_CONFIG_ENV_VAR)
    return (json.loads(raw).get("runtime_env") or {}) if raw else {}


def plugin_runtime_env(job_env: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ray runtime env for the driver: OpenRLHF's env vars, plus ``gold_plugin`` shipped to the workers as a
    ``py_module`` when it is not installed in site-packages (a checkout). Only what the job's own runtime env
    (``job_env``, default :func:`job_runtime_env`) leaves unset: its values win, and a job submitted with a
    ``working_dir`` or ``py_modules`` already ships the package."""
    import gold_plugin

    job_env = job_runtime_env() if job_env is None else job_env
    job_vars = job_env.get("env_vars") or {}
    defaults = {
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "true"),
        "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN"),
        "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1"),
    }
    env: dict[str, Any] = {"env_vars": {k: v for k, v in defaults.items() if k not in job_vars}}
    package_dir = os.path.dirname(os.path.abspath(gold_plugin.__file__))
    installed = "site-packages" in package_dir or "dist-packages" in package_dir
    if not installed and not job_env.get("working_dir") and not job_env.get("py_modules"):
        env["py_modules"] = [package_dir]
    return env


def create_teacher_group(plan: LaunchPlan, placement: PlacementGroup | None) -> TeacherScorer:
    """The teacher replicas, in the actor's placement group (``placement``) or on their own GPUs; for a served
    teacher only its client (checked against the server here, before any model loads)."""
    from gold_plugin.teacher import TeacherGroup, build_teacher

    if plan.gold.teacher.backend == "server":
        return build_teacher(plan.gold.teacher)
    actor_options: dict[str, Any] = {}
    scorer_overrides: dict[str, Any] = {}
    if placement is not None:
        if plan.gold.teacher.backend == "vllm":  # share the GPU with the actor: cap vLLM's memory pool
            scorer_overrides["gpu_memory_utilization"] = COLOCATED_GPU_SHARE
        actor_options = {
            "num_gpus": COLOCATED_GPU_SHARE,
            "num_cpus": COLOCATED_GPU_SHARE,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=placement, placement_group_bundle_index=-1
            ),
        }
    return TeacherGroup(
        plan.gold, actor_options=actor_options, scorer_overrides=scorer_overrides, name="gold-teacher"
    )


def train(plan: LaunchPlan) -> None:
    """Start Ray, create the groups of ``plan``, train, save."""
    from openrlhf.trainer.ray import create_vllm_engines
    from openrlhf.trainer.ray.launcher import RayActorGroup, ReferenceModelActor, RewardModelActor
    from openrlhf.trainer.ray.ppo_critic import CriticModelActor
    from openrlhf.utils import get_strategy

    from .actor import GoldPolicyModelActor
    from .trainer import GoldPPOTrainer, GoldPPOTrainerAsync

    args = plan.args
    if args.use_ms:
        from modelscope.utils.hf_util import patch_hub

        patch_hub()
    if not ray.is_initialized():
        ray.init(runtime_env=plugin_runtime_env())

    strategy = get_strategy(args)
    strategy.print(args)
    duplicate = args.ds.ring_attn_size * args.ds.tensor_parallel_size

    actor_pg = None
    if args.train.colocate_actor_ref or args.train.colocate_all:
        bundles = [{"GPU": 1, "CPU": 1} for _ in range(args.actor.num_nodes * args.actor.num_gpus_per_node)]
        actor_pg = placement_group(bundles, strategy="PACK")
        ray.get(actor_pg.ready())

    vllm_engines = None
    if args.vllm.num_engines:
        vllm_engines = create_vllm_engines(
            args.vllm.num_engines,
            args.vllm.tensor_parallel_size,
            args.actor.model_name_or_path,
            args.train.seed,
            args.train.full_determinism_enable,
            args.vllm.enable_prefix_caching,
            args.vllm.enforce_eager,
            args.data.max_len,
            actor_pg if args.train.colocate_all and not args.train.async_enable else None,
            args.vllm.gpu_memory_utilization,
            args.vllm.enable_sleep,
            "processed_logprobs" if args.algo.advantage.is_correction_level != "off" else None,
            agent_func_path=args.train.agent_func_path,
            remote_rm_url=args.reward.remote_url if plan.gold.needs_reward else None,
            max_images_per_prompt=args.data.max_images_per_prompt,
        )

    def model_group(
        role: SimpleNamespace, actor_class: ActorClass, pg: PlacementGroup | None
    ) -> RayActorGroup:
        """A group of ``role.num_nodes x role.num_gpus_per_node`` model actors, sharing GPUs inside ``pg``."""
        share = COLOCATED_GPU_SHARE if pg else 1
        return RayActorGroup(
            role.num_nodes,
            role.num_gpus_per_node,
            actor_class,
            pg=pg,
            num_gpus_per_actor=share,
            duplicate_actors=duplicate,
        )

    actor_group = model_group(args.actor, GoldPolicyModelActor, actor_pg)
    ref_group = model_group(args.ref, ReferenceModelActor, actor_pg) if plan.create_reference_group else None
    teacher = create_teacher_group(plan, actor_pg if plan.teacher_colocated else None)

    critic_pg = actor_pg if args.train.colocate_all else None
    if plan.create_critic_group and args.train.colocate_critic_reward:
        bundles = [{"GPU": 1, "CPU": 1} for _ in range(args.critic.num_nodes * args.critic.num_gpus_per_node)]
        critic_pg = placement_group(bundles, strategy="PACK")
        ray.get(critic_pg.ready())
    critic_group = model_group(args.critic, CriticModelActor, critic_pg) if plan.create_critic_group else None
    reward_group = (
        model_group(args.reward, RewardModelActor, critic_pg) if plan.create_reward_model_group else None
    )

    trainer_class = GoldPPOTrainerAsync if args.train.async_enable else GoldPPOTrainer
    trainer = trainer_class.remote(
        args.actor.model_name_or_path,
        strategy,
        actor_group,
        critic_group,
        reward_group,
        ref_group,
        vllm_engines,
        teacher=teacher,
        do_sample=True,
        max_len=args.data.max_len,
        max_new_tokens=args.rollout.max_new_tokens,
        temperature=args.rollout.temperature,
        top_p=args.rollout.top_p,
    )
    max_steps = ray.get(trainer.get_max_steps.remote())

    refs = list(
        actor_group.async_init_model_from_pretrained(
            strategy, args.actor.model_name_or_path, max_steps, vllm_engines
        )
    )
    if ref_group is not None:
        refs.extend(ref_group.async_init_model_from_pretrained(strategy, args.actor.model_name_or_path))
    if reward_group is not None:
        refs.extend(reward_group.async_init_model_from_pretrained(strategy, args.reward.model_name_or_path))
    ray.get(refs)
    if critic_group is not None:
        ray.get(
            critic_group.async_init_model_from_pretrained(strategy, args.critic.model_name_or_path, max_steps)
        )

    ray.get(trainer.fit.remote())
    ray.get(actor_group.async_save_model())
    if critic_group is not None and args.critic.save_value_network:
        ray.get(critic_group.async_save_model())
    teacher.close()
