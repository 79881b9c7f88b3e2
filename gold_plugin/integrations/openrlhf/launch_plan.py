"""Resolve and validate a launcher command line before anything starts.

:func:`resolve_launch` applies OpenRLHF 0.11.2's own post-parse rules (the ones ``train_ppo_ray`` runs after
``parse_args``; re-stated here because that code is inline) and the GOLD rules, and returns a
:class:`LaunchPlan`: the resolved nested arguments, the :class:`GoldConfig`, which Ray groups will be created
and the warnings to print. Every impossible combination raises :class:`GoldConfigError` with a message that
names the option to change. Nothing here imports OpenRLHF, Ray or DeepSpeed.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from types import SimpleNamespace

from gold_plugin.config import GoldConfig, GoldConfigError, gold_config_from_args
from gold_plugin.prompt_dataset import check_local_datasets

from .args import fill_gold_defaults, nest_namespace

GROUP_ESTIMATORS = ("rloo", "reinforce_baseline", "group_norm", "dr_grpo")
COLOCATED_GPU_SHARE = 0.2
"""GPU share of each model placed in the actor's placement group (OpenRLHF's value for actor and reference)."""


@dataclass
class GroupPlan:
    """One Ray actor group of the run."""

    name: str
    replicas: int
    gpus_per_replica: float
    placement: str

    def describe(self) -> str:
        return f"{self.name:<10} {self.replicas} x {self.gpus_per_replica:g} GPU  ({self.placement})"


@dataclass
class LaunchPlan:
    """Everything the cluster run needs, decided before Ray starts."""

    args: SimpleNamespace
    gold: GoldConfig
    reward_source: str | None
    create_reward_model_group: bool
    create_reference_group: bool
    create_critic_group: bool
    teacher_colocated: bool
    groups: list[GroupPlan] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    filled_defaults: dict[str, object] = field(default_factory=dict)
    """Options left unset that got GOLD's or OpenRLHF's default (:func:`~.args.fill_gold_defaults`)."""


def _reward_source(args: SimpleNamespace) -> str | None:
    if args.train.agent_func_path:
        return f"agent executor {args.train.agent_func_path}"
    if args.reward.remote_url:
        url = args.reward.remote_url
        return f"reward function file {url}" if str(url).endswith(".py") else f"remote reward server {url}"
    if args.reward.model_name_or_path:
        return f"reward model {args.reward.model_name_or_path}"
    return None


def _check_gold_rules(args: SimpleNamespace, gold: GoldConfig, warnings: list[str]) -> None:
    """GOLD-specific start-time checks, before OpenRLHF's rules rewrite packing options."""
    if not args.actor.model_name_or_path:
        raise GoldConfigError("Set --actor.model_name_or_path (the student model).")
    if not gold.teacher.model_name_or_path and not (
        gold.teacher.backend == "server" and gold.teacher.tokenizer_name_or_path
    ):
        raise GoldConfigError(
            "Set --gold.teacher.model_name_or_path (the teacher model; for a served teacher, where its tokenizer "
            "is, or --gold.teacher.tokenizer_name_or_path)."
        )
    if not args.data.prompt_dataset:
        raise GoldConfigError("Set --data.prompt_dataset (the prompts the student answers).")
    # A local prompt file is read here, before Ray starts: a bad line stops the job at start, naming it.
    check_local_datasets(args.data.prompt_dataset, args.data.input_key)
    if gold.needs_references and not args.data.output_key:
        raise GoldConfigError(
            f"--gold.lmbda {gold.lmbda} < 1 with --gold.off_policy_source {gold.off_policy_source} trains a share "
            "of the prompts on the dataset's reference completions: set --data.output_key (the completion column), "
            "or --gold.off_policy_source teacher (the teacher writes them), or --gold.lmbda 1."
        )
    if args.data.max_images_per_prompt > 0:
        raise GoldConfigError(
            "GOLD distils text: the teacher scores text only. Set --data.max_images_per_prompt 0."
        )

    if gold.uses_logit_loss or gold.uses_hidden_states:
        layouts = []
        if args.ds.packing_samples:
            layouts.append("--ds.packing_samples")
        if args.train.dynamic_batch_enable:
            layouts.append("--train.dynamic_batch_enable (implies packing)")
        if args.ds.ring_attn_size > 1:
            layouts.append("--ds.ring_attn_size > 1 (implies packing)")
        if layouts:
            loss = "aligned logit loss" if gold.uses_logit_loss else "hidden-state loss"
            raise GoldConfigError(
                f"--gold.signal={gold.signal} ({loss}) needs padded [batch, time, ...] logits and states, but "
                f"{', '.join(layouts)} packs samples into one row. Drop those options, or use "
                "--gold.signal advantage (works with every batch layout)."
            )

    source = _reward_source(args)
    if gold.needs_reward:
        if source is None:
            raise GoldConfigError(
                f"--gold.alpha={gold.alpha} < 1 mixes in a task reward, but no reward source is set: give "
                "--reward.model_name_or_path, --reward.remote_url (an HTTP server or a .py file with reward_func) "
                "or --train.agent_func_path; or set --gold.alpha 1 for reward-free distillation."
            )
        return

    # alpha == 1: reward-free.
    if args.algo.advantage.estimator == "gae":
        raise GoldConfigError(
            "--gold.alpha=1 is reward-free, but --algo.advantage.estimator gae (OpenRLHF's default) trains a critic "
            "on the task reward. Pick a critic-free estimator, e.g. --algo.advantage.estimator reinforce "
            "(with alpha=1 the estimator only shapes the unused reward part)."
        )
    if args.algo.dynamic_filtering_enable:
        raise GoldConfigError(
            "--algo.dynamic_filtering_enable filters prompts by reward, which a reward-free run (--gold.alpha=1) "
            "never computes. Drop it, or set --gold.alpha < 1 with a reward source."
        )
    if args.eval.dataset:
        raise GoldConfigError(
            "--eval.dataset scores evaluation samples with the reward function, which a reward-free run "
            "(--gold.alpha=1) does not call. Drop --eval.dataset, or set --gold.alpha < 1 with --reward.remote_url."
        )
    if args.algo.kl.init_coef > 0 and not args.algo.kl.use_loss:
        raise GoldConfigError(
            f"--algo.kl.init_coef={args.algo.kl.init_coef} puts the KL to the reference into the task reward, which "
            "a reward-free run (--gold.alpha=1) gives zero weight. Add --algo.kl.use_loss to keep the KL as a loss, "
            "or set --algo.kl.init_coef 0 to run without a reference model."
        )
    if args.train.agent_func_path:
        warnings.append(
            "--train.agent_func_path: the agent executor computes its own rewards during rollout; with "
            "--gold.alpha=1 they are logged but never used."
        )
    elif args.reward.remote_url or args.reward.model_name_or_path:
        warnings.append(
            "--gold.alpha=1 is reward-free: --reward.remote_url / --reward.model_name_or_path are ignored "
            "(no reward-model group is created and no reward function is called)."
        )
        args.reward.remote_url = None
        args.reward.model_name_or_path = None


def _apply_openrlhf_rules(args: SimpleNamespace, gold: GoldConfig, warnings: list[str]) -> None:
    """OpenRLHF 0.11.2's post-parse rules (train_ppo_ray ``__main__``), with errors that say what to change."""
    if args.actor.eps_clip_low_high is None:
        args.actor.eps_clip_low_high = (args.actor.eps_clip, args.actor.eps_clip)
    if args.train.agent_func_path:
        args.reward.remote_url = "agent"

    threshold = list(args.algo.advantage.is_correction_threshold)
    if len(threshold) == 1:
        threshold.insert(0, 0.0)
    if len(threshold) != 2:
        raise GoldConfigError("--algo.advantage.is_correction_threshold takes HIGH or LOW HIGH.")
    args.algo.advantage.is_correction_threshold = threshold

    if args.algo.advantage.estimator != "gae":
        args.critic.model_name_or_path = None
    elif args.critic.model_name_or_path is None:
        if args.reward.remote_url:
            args.critic.model_name_or_path = args.actor.model_name_or_path
        else:
            args.critic.model_name_or_path = args.reward.model_name_or_path.split(",")[0]

    if args.algo.advantage.estimator in GROUP_ESTIMATORS and args.rollout.n_samples_per_prompt <= 1:
        raise GoldConfigError(
            f"--algo.advantage.estimator {args.algo.advantage.estimator} needs a prompt group: set "
            "--rollout.n_samples_per_prompt > 1."
        )

    if args.reward.remote_url and isinstance(args.reward.remote_url, str):
        args.reward.remote_url = args.reward.remote_url.split(",")

    if args.data.input_template and "{}" not in args.data.input_template:
        warnings.append("--data.input_template has no '{}': ignored.")
        args.data.input_template = None
    if args.data.input_template and "\\n" in args.data.input_template:
        warnings.append(
            "--data.input_template holds a literal backslash-n; in bash pass $'\\n' for a newline."
        )

    if args.ds.ring_attn_size > 1 and not args.ds.packing_samples:
        warnings.append("--ds.ring_attn_size > 1 turns on --ds.packing_samples.")
        args.ds.packing_samples = True
    if args.train.dynamic_batch_enable:
        if not args.ds.packing_samples:
            warnings.append("--train.dynamic_batch_enable turns on --ds.packing_samples.")
            args.ds.packing_samples = True
        if args.rollout.max_tokens_per_gpu is None:
            args.rollout.max_tokens_per_gpu = args.train.max_tokens_per_gpu
    if args.ds.packing_samples:
        if "flash_attention" not in args.ds.attn_implementation:
            warnings.append(
                "--ds.packing_samples needs flash attention: --ds.attn_implementation set to flash_attention_2."
            )
            args.ds.attn_implementation = "flash_attention_2"
        if not args.vllm.num_engines or args.vllm.num_engines <= 0:
            raise GoldConfigError("--ds.packing_samples needs vLLM rollouts: set --vllm.num_engines >= 1.")

    if args.vllm.enable_sleep and not args.train.colocate_all:
        warnings.append("--vllm.enable_sleep only applies with --train.colocate_all: turned off.")
        args.vllm.enable_sleep = False
    if args.train.async_enable and args.vllm.enable_sleep:
        raise GoldConfigError("--train.async_enable cannot run with --vllm.enable_sleep: drop one of them.")
    if args.train.partial_rollout_enable and not args.train.async_enable:
        raise GoldConfigError("--train.partial_rollout_enable needs --train.async_enable.")
    if args.eval.dataset and not (args.reward.remote_url or args.train.agent_func_path):
        raise GoldConfigError(
            "--eval.dataset needs --reward.remote_url or --train.agent_func_path to score samples."
        )

    if not args.rollout.vllm_generate_batch_size:
        args.rollout.vllm_generate_batch_size = args.rollout.batch_size
    if args.rollout.vllm_generate_batch_size > args.rollout.batch_size and not args.train.async_enable:
        raise GoldConfigError(
            "--rollout.vllm_generate_batch_size > --rollout.batch_size buffers extra batches: add --train.async_enable."
        )

    if args.algo.dynamic_filtering_enable:
        low, high = args.algo.dynamic_filtering_range
        if not low < high:
            raise GoldConfigError("--algo.dynamic_filtering_range needs LOW < HIGH.")
        if not (args.reward.remote_url or args.train.agent_func_path):
            raise GoldConfigError(
                "--algo.dynamic_filtering_enable needs --reward.remote_url or --train.agent_func_path."
            )
        if args.rollout.n_samples_per_prompt <= 1:
            raise GoldConfigError("--algo.dynamic_filtering_enable needs --rollout.n_samples_per_prompt > 1.")

    micro_batches = (
        args.rollout.n_samples_per_prompt * args.rollout.batch_size // args.rollout.micro_batch_size
    )
    actor_processes = (
        args.actor.num_nodes
        * args.actor.num_gpus_per_node
        // args.ds.ring_attn_size
        // args.ds.tensor_parallel_size
    )
    if micro_batches < actor_processes:
        raise GoldConfigError(
            f"A rollout batch splits into {micro_batches} micro-batches for {actor_processes} actor processes: raise "
            "--rollout.batch_size or --rollout.n_samples_per_prompt, or lower --rollout.micro_batch_size."
        )


def _plan_groups(args: SimpleNamespace, gold: GoldConfig, plan: LaunchPlan) -> None:
    colocate_actor = args.train.colocate_actor_ref or args.train.colocate_all
    actor_share = COLOCATED_GPU_SHARE if colocate_actor else 1.0
    actor_gpus = args.actor.num_nodes * args.actor.num_gpus_per_node
    placement = "actor placement group" if colocate_actor else "own GPUs"
    groups = [GroupPlan("actor", actor_gpus, actor_share, placement)]
    if plan.create_reference_group:
        groups.append(
            GroupPlan("reference", args.ref.num_nodes * args.ref.num_gpus_per_node, actor_share, placement)
        )
    if args.vllm.num_engines:
        groups.append(
            GroupPlan(
                "vllm",
                args.vllm.num_engines,
                float(args.vllm.tensor_parallel_size),
                "actor placement group"
                if args.train.colocate_all and not args.train.async_enable
                else "own GPUs",
            )
        )
    critic_reward_colocated = bool(args.critic.model_name_or_path and args.train.colocate_critic_reward)
    for name, role, wanted in (
        ("critic", args.critic, plan.create_critic_group),
        ("reward", args.reward, plan.create_reward_model_group),
    ):
        if wanted:
            groups.append(
                GroupPlan(
                    name,
                    role.num_nodes * role.num_gpus_per_node,
                    COLOCATED_GPU_SHARE if critic_reward_colocated else 1.0,
                    "critic/reward placement group" if critic_reward_colocated else "own GPUs",
                )
            )
    t = gold.teacher
    if t.backend == "server":
        groups.append(GroupPlan("teacher", len(t.urls), 0.0, f"served at {', '.join(t.urls)}; none started"))
    elif plan.teacher_colocated:
        groups.append(GroupPlan("teacher", t.num_replicas, COLOCATED_GPU_SHARE, "actor placement group"))
    else:
        groups.append(GroupPlan("teacher", t.num_replicas, t.num_gpus_per_replica, "own GPUs"))
    plan.groups = groups


def resolve_launch(args: argparse.Namespace) -> LaunchPlan:
    """Validate a parsed command line and decide the cluster layout; raise GoldConfigError naming what to change."""
    gold = gold_config_from_args(args)
    filled = fill_gold_defaults(args, gold.alpha)
    nested = nest_namespace(args)
    warnings: list[str] = []
    source = _reward_source(nested) if gold.needs_reward else None
    _check_gold_rules(nested, gold, warnings)
    _apply_openrlhf_rules(nested, gold, warnings)

    colocate_actor = nested.train.colocate_actor_ref or nested.train.colocate_all
    teacher_colocated = bool(colocate_actor) and gold.teacher.backend != "server"
    if teacher_colocated:
        bundles = nested.actor.num_nodes * nested.actor.num_gpus_per_node
        if gold.teacher.num_replicas > bundles:
            raise GoldConfigError(
                f"A teacher colocated with the actor gets one replica per actor GPU ({bundles}); "
                f"--gold.teacher.num_replicas={gold.teacher.num_replicas} is more. Lower it, or drop "
                "--train.colocate_actor_ref / --train.colocate_all to give the teacher its own GPUs."
            )
        if gold.teacher.tensor_parallel_size > 1:
            raise GoldConfigError(
                "A teacher colocated with the actor runs one GPU per replica: set --gold.teacher.tensor_parallel_size "
                "1, or drop --train.colocate_actor_ref / --train.colocate_all."
            )
    elif gold.teacher.num_gpus_per_replica <= 0 and gold.teacher.backend == "hf":
        warnings.append("--gold.teacher.num_gpus_per_replica 0: the teacher runs on CPU (slow; for tests).")

    uses_reward_model = bool(
        gold.needs_reward and not nested.reward.remote_url and nested.reward.model_name_or_path
    )
    plan = LaunchPlan(
        args=nested,
        gold=gold,
        reward_source=source,
        create_reward_model_group=uses_reward_model,
        create_reference_group=nested.algo.kl.init_coef > 0,
        create_critic_group=bool(nested.critic.model_name_or_path),
        teacher_colocated=teacher_colocated,
        warnings=warnings,
        filled_defaults=filled,
    )
    _plan_groups(nested, gold, plan)
    return plan
