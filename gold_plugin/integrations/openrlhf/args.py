"""The launcher's argument parser: every option of OpenRLHF 0.11.2's ``train_ppo_ray`` plus ``--gold.*``.

OpenRLHF builds its parser inline under ``if __name__ == "__main__"`` in ``openrlhf/cli/train_ppo_ray.py``, so it
cannot be imported; this module declares the same options (same dotted names, types, choices and defaults; the
test suite compares the two parsers option by option) and adds the GOLD options and ``--dry_run``
(``--backend`` belongs to the front door, :mod:`gold_plugin.cli`). Importing it needs neither OpenRLHF, DeepSpeed, vLLM nor Ray, so ``--help`` and ``--dry_run``
work on a laptop.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from gold_plugin.config import add_gold_arguments

OPENRLHF_VERSION = "0.11.2"

OPENRLHF_DEFAULTS = {"algo.advantage.estimator": "gae", "algo.kl.init_coef": 0.01}
"""OpenRLHF's defaults of the options whose launcher default is left unset (None) and filled by
:func:`fill_gold_defaults`."""
REWARD_FREE_DEFAULTS = {"algo.advantage.estimator": "reinforce", "algo.kl.init_coef": 0.0}
"""GOLD's defaults of those options for a reward-free run (``--gold.alpha 1``, GOLD's default)."""


def fill_gold_defaults(args: argparse.Namespace, alpha: float) -> dict[str, str | float]:
    """Fill the options the user left unset: GOLD's reward-free defaults when ``alpha == 1``, OpenRLHF's otherwise
    (an option given on the command line always wins). Returns what was filled."""
    chosen = REWARD_FREE_DEFAULTS if alpha == 1.0 else OPENRLHF_DEFAULTS
    filled: dict[str, str | float] = {}
    for dest, value in chosen.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, value)
            filled[dest] = value
    return filled


def _flag(group: argparse._ArgumentGroup, name: str, help_text: str = "") -> None:
    group.add_argument(name, action="store_true", default=False, help=help_text or None)


def _add_cluster_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("OpenRLHF: Ray placement")
    g.add_argument("--ref.num_nodes", type=int, default=1, help="Nodes of the reference-model group.")
    g.add_argument("--ref.num_gpus_per_node", type=int, default=8, help="GPUs per node, reference model.")
    g.add_argument("--reward.num_nodes", type=int, default=1, help="Nodes of the reward-model group.")
    g.add_argument("--reward.num_gpus_per_node", type=int, default=8, help="GPUs per node, reward model.")
    _flag(g, "--train.colocate_actor_ref", "Actor and reference model share GPUs (the GOLD teacher too).")
    g.add_argument("--actor.num_nodes", type=int, default=1, help="Nodes of the actor (policy) group.")
    g.add_argument("--actor.num_gpus_per_node", type=int, default=8, help="GPUs per node, actor.")
    g.add_argument("--critic.num_nodes", type=int, default=1, help="Nodes of the critic group.")
    g.add_argument("--critic.num_gpus_per_node", type=int, default=8, help="GPUs per node, critic.")
    _flag(g, "--train.colocate_critic_reward", "Critic and reward model share GPUs.")
    _flag(g, "--train.colocate_all", "All models, vLLM engines included, share the actor's GPUs.")


def _add_vllm_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("OpenRLHF: vLLM rollout engines")
    g.add_argument("--vllm.num_engines", type=int, default=None, help="vLLM engines (0 disables vLLM).")
    g.add_argument(
        "--vllm.tensor_parallel_size", type=int, default=1, help="Tensor parallel size per engine."
    )
    g.add_argument(
        "--vllm.sync_backend", type=str, default="nccl", help="Backend of the weight sync to vLLM."
    )
    _flag(g, "--vllm.sync_with_ray")
    _flag(g, "--vllm.enable_prefix_caching")
    _flag(g, "--vllm.enforce_eager", "Turn off CUDA graphs in vLLM.")
    _flag(g, "--vllm.enable_sleep", "Let vLLM sleep between rollouts (with --train.colocate_all).")
    g.add_argument("--vllm.gpu_memory_utilization", type=float, default=0.95, help="vLLM GPU memory share.")
    g.add_argument(
        "--algo.advantage.is_correction_level",
        type=str,
        default="off",
        choices=["off", "token", "seq"],
        help="Train/rollout log-prob mismatch correction: off, per token, or per sequence.",
    )
    g.add_argument(
        "--algo.advantage.is_correction_mode",
        type=str,
        default="mask",
        choices=["mask", "clip"],
        help="Outside the bounds: mask the unit, or clip the token ratio.",
    )
    g.add_argument(
        "--algo.advantage.is_correction_gating",
        type=str,
        default="ratio",
        choices=["ratio", "binary_kl", "tv"],
        help="Statistic compared with the bounds.",
    )
    g.add_argument(
        "--algo.advantage.is_correction_threshold",
        type=float,
        nargs="+",
        default=[0.5, 5.0],
        help="LOW HIGH bounds, or one HIGH bound.",
    )


def _add_async_and_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("OpenRLHF: async training and checkpoints")
    _flag(g, "--train.async_enable", "Overlap rollout and training (async trainer).")
    g.add_argument(
        "--train.async_queue_size", type=int, default=1, help="Rollout batches buffered in async mode."
    )
    _flag(
        g,
        "--train.partial_rollout_enable",
        "Async only: pause/resume vLLM for weight sync instead of a lock.",
    )
    g.add_argument("--eval.steps", type=int, default=-1)
    g.add_argument("--ckpt.save_steps", type=int, default=-1)
    g.add_argument("--logger.logging_steps", type=int, default=1)
    g.add_argument("--ckpt.path", type=str, default="./ckpt/checkpoints_ppo_ray")
    _flag(g, "--ckpt.save_hf")
    _flag(g, "--ckpt.disable_ds")
    g.add_argument("--ckpt.max_num", type=int, default=3)
    g.add_argument("--ckpt.max_mem", type=float, default=float("inf"))
    _flag(g, "--ckpt.load_enable")
    g.add_argument(
        "--ckpt.best_metric_key",
        type=str,
        default="",
        help="Eval metric that selects the best checkpoint ('' = first pass1 metric, 'none' = off).",
    )
    _flag(g, "--ds.use_universal_ckpt", "Save DeepSpeed universal checkpoints.")


def _add_deepspeed_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("OpenRLHF: DeepSpeed")
    g.add_argument("--local_rank", type=int, default=-1, help="Set by the DeepSpeed launcher.")
    g.add_argument("--ds.zero_stage", type=int, default=2, help="ZeRO stage.")
    _flag(g, "--actor.gradient_checkpointing_enable")
    _flag(g, "--ds.deepcompile")
    g.add_argument(
        "--ds.param_dtype", type=str, default="bf16", choices=["bf16", "fp16"], help="Weights dtype."
    )
    g.add_argument("--train.enable_ema", action="store_true", help="Keep an EMA copy of the actor.")
    g.add_argument("--train.ema_beta", type=float, default=0.992, help="EMA decay.")
    g.add_argument("--ds.zpg", type=int, default=1, help="ZeRO++ partition size.")
    _flag(g, "--ds.adam_offload", "Keep Adam states on the CPU.")
    g.add_argument(
        "--ds.attn_implementation",
        type=str,
        default="flash_attention_2",
        help="transformers attention implementation (eager, sdpa, flash_attention_2, ...).",
    )
    g.add_argument(
        "--ds.experts_implementation",
        type=str,
        default=None,
        choices=["eager", "batched_mm", "grouped_mm", "deepgemm"],
        help="MoE expert kernel passed to from_pretrained (default: chosen by transformers).",
    )
    _flag(g, "--ds.use_liger_kernel")
    g.add_argument("--ds.grad_accum_dtype", type=str, default=None, help="Gradient accumulation dtype.")
    _flag(g, "--ds.overlap_comm")
    _flag(g, "--actor.gradient_checkpointing_reentrant")
    _flag(g, "--data.disable_fast_tokenizer")
    g.add_argument("--data.dataloader_num_workers", type=int, default=0, help="Prompt dataloader workers.")
    _flag(g, "--ds.enable_sleep", "Offload DeepSpeed states between phases (with --train.colocate_all).")
    g.add_argument("--ds.tensor_parallel_size", type=int, default=1, help="DeepSpeed AutoTP size.")
    _flag(g, "--ds.packing_samples", "Pack samples without padding (flash attention).")
    _flag(g, "--train.dynamic_batch_enable", "Token-budget micro-batches.")
    g.add_argument("--rollout.max_tokens_per_gpu", type=int, default=None)
    g.add_argument("--train.max_tokens_per_gpu", type=int, default=16192)
    _flag(g, "--ds.load_in_4bit")
    g.add_argument("--ds.lora.rank", type=int, default=0)
    g.add_argument("--ds.lora.alpha", type=int, default=16)
    g.add_argument("--ds.lora.target_modules", type=str, nargs="*", default="all-linear")
    g.add_argument("--ds.lora.dropout", type=float, default=0)


def _add_ppo_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("OpenRLHF: PPO / GRPO")
    g.add_argument("--ckpt.output_dir", type=str, default="./ckpt")
    g.add_argument("--train.num_episodes", type=int, default=1)
    g.add_argument("--rollout.batch_size", type=int, default=1024, help="Prompts per rollout batch.")
    g.add_argument(
        "--rollout.vllm_generate_batch_size", type=int, default=None, help="Prompts per vLLM call."
    )
    g.add_argument("--rollout.micro_batch_size", type=int, default=1)
    g.add_argument("--train.max_epochs", type=int, default=1)
    g.add_argument("--data.max_len", type=int, default=2048, help="Prompt + response token budget.")
    g.add_argument(
        "--rollout.max_new_tokens",
        type=int,
        default=None,
        help="Response token limit (default: what max_len leaves).",
    )
    g.add_argument(
        "--data.max_samples", type=int, default=int(1e8), help="Prompts read from the dataset at most."
    )
    g.add_argument("--actor.eps_clip", type=float, default=0.2, help="PPO clip range.")
    g.add_argument(
        "--actor.eps_clip_low_high", type=float, nargs=2, default=None, help="Asymmetric clip range."
    )
    g.add_argument("--actor.dual_clip", type=float, default=None, help="Dual-clip constant.")
    g.add_argument("--critic.value_clip", type=float, default=0.5, help="Value clip range.")
    g.add_argument("--algo.advantage.lambd", type=float, default=1, help="GAE lambda.")
    g.add_argument("--algo.advantage.gamma", type=float, default=1, help="Discount.")
    g.add_argument("--train.micro_batch_size", type=int, default=1, help="Sequences per GPU per step.")
    g.add_argument("--train.batch_size", type=int, default=128, help="Sequences per optimiser step.")
    _flag(g, "--reward.normalize_enable", "Normalise reward-model scores.")
    g.add_argument("--rollout.top_p", type=float, default=1.0)
    g.add_argument("--rollout.temperature", type=float, default=1.0)
    g.add_argument("--train.seed", type=int, default=42)
    _flag(g, "--train.full_determinism_enable", "Reproducible distributed training.")
    g.add_argument("--critic.freezing_steps", type=int, default=-1, help="Steps that train only the critic.")
    g.add_argument(
        "--rollout.n_samples_per_prompt", type=int, default=1, help="Responses sampled per prompt."
    )
    _flag(g, "--critic.save_value_network")
    g.add_argument("--algo.kl.target", type=float, default=None)
    g.add_argument("--algo.kl.horizon", type=int, default=10000)
    g.add_argument(
        "--algo.kl.init_coef",
        type=float,
        default=None,
        help="KL-to-reference coefficient. GOLD's default: 0 for a reward-free run (--gold.alpha 1: a KL in the "
        "unused reward would do nothing, and no reference model is started), OpenRLHF's 0.01 otherwise.",
    )
    g.add_argument("--actor.policy_loss_type", type=str, default="ppo", choices=["ppo", "gspo"])
    g.add_argument(
        "--actor.loss_agg_mode",
        type=str,
        default="token-mean",
        choices=["token-mean", "seq-mean-token-mean"],
        help="Policy loss: mean over all tokens, or every sequence weighted equally.",
    )
    g.add_argument(
        "--algo.kl.estimator", type=str, default="k1", choices=["k1", "k2", "k3"], help="KL estimator."
    )
    _flag(g, "--algo.kl.unbiased_gradient", "KL loss with the importance-weighted reverse-KL gradient.")
    g.add_argument("--actor.aux_loss_coef", type=float, default=0, help="MoE balancing loss weight.")
    g.add_argument(
        "--actor.entropy_coef", type=float, default=None, help="Entropy loss weight (0 = log only)."
    )
    g.add_argument("--reward.clip_range", type=float, nargs=2, default=(-10, 10), help="Reward clip range.")


def _add_optimizer_options(parser: argparse.ArgumentParser) -> None:
    for prefix in ("actor", "critic"):
        g = parser.add_argument_group(f"OpenRLHF: {prefix} optimiser")
        g.add_argument(f"--{prefix}.optim", type=str, default="adam", choices=["adam", "muon"])
        g.add_argument(
            f"--{prefix}.muon.lr", type=float, default=0.02, help="Muon learning rate (2-D weights)."
        )
        g.add_argument(f"--{prefix}.muon.momentum", type=float, default=0.95)
        g.add_argument(f"--{prefix}.muon.ns_steps", type=int, default=5, help="Newton-Schulz steps.")
        g.add_argument(f"--{prefix}.muon.nesterov", action="store_true", default=True)
        g.add_argument(f"--{prefix}.muon.no_nesterov", dest=f"{prefix}.muon.nesterov", action="store_false")
        g.add_argument(f"--{prefix}.adam.lr", type=float, default=1e-6 if prefix == "actor" else 9e-6)
        g.add_argument(f"--{prefix}.adam.betas", type=float, nargs=2, default=(0.9, 0.95))
        g.add_argument(f"--{prefix}.adam.eps", type=float, default=1e-8)
        g.add_argument(f"--{prefix}.adam.weight_decay", type=float, default=0.0)
        g.add_argument(f"--{prefix}.lr_scheduler", type=str, default="cosine_with_min_lr")
        g.add_argument(f"--{prefix}.lr_warmup_ratio", type=float, default=0.03)
        g.add_argument(f"--{prefix}.min_lr_ratio", type=float, default=0.1)
        g.add_argument(f"--{prefix}.max_norm", type=float, default=1.0)


def _add_estimator_and_model_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("OpenRLHF: advantages, rewards and models")
    g.add_argument(
        "--algo.advantage.estimator",
        type=str,
        choices=[
            "gae",
            "reinforce",
            "rloo",
            "reinforce_baseline",
            "group_norm",
            "dr_grpo",
            "flash_reinforce",
        ],
        default=None,
        help="Task-reward advantage estimator (group_norm = GRPO); GOLD mixes its output with the distillation "
        "advantages. GOLD's default: reinforce for a reward-free run (--gold.alpha 1: no critic to train), "
        "OpenRLHF's gae otherwise.",
    )
    _flag(g, "--algo.kl.use_loss", "KL to the reference as a loss term (GRPO) instead of a reward penalty.")
    _flag(g, "--algo.advantage.no_std_norm", "Centre advantages without dividing by their std.")
    g.add_argument("--reward.overlong_buffer_len", type=float, default=None, help="DAPO overlong buffer.")
    g.add_argument("--reward.overlong_penalty_factor", type=float, default=1, help="DAPO overlong penalty.")
    g.add_argument(
        "--reward.stop_properly_penalty_coef",
        type=float,
        default=None,
        help="Truncated samples: scale the reward (>= 0) or replace it (< 0).",
    )
    g.add_argument("--ds.ring_attn_size", type=int, default=1, help="Ring attention (context parallel) size.")
    g.add_argument("--ds.ring_attn_head_stride", type=int, default=1, help="Heads per ring attention pass.")
    g.add_argument("--actor.model_name_or_path", type=str, default=None, help="Student (policy) model.")
    g.add_argument("--reward.model_name_or_path", type=str, default=None, help="Reward model.")
    g.add_argument(
        "--reward.remote_url",
        type=str,
        default=None,
        help="Remote reward URL(s), or a .py file with reward_func.",
    )
    g.add_argument("--critic.model_name_or_path", type=str, default=None, help="Critic model.")
    g.add_argument("--ds.value_head_prefix", type=str, default="score")
    _flag(g, "--ref.offload", "Keep the reference model on the CPU.")
    _flag(g, "--reward.offload", "Keep the reward model on the CPU.")
    g.add_argument(
        "--train.agent_func_path", type=str, default=None, help="Agent executor file (multi-turn)."
    )


def _add_data_and_logging_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("OpenRLHF: data, evaluation and logging")
    g.add_argument(
        "--data.prompt_dataset", type=str, default=None, help="Prompt dataset(s): HF name or path."
    )
    g.add_argument("--data.prompt_probs", type=str, default=None, help="Sampling weights of the datasets.")
    g.add_argument("--data.prompt_split", type=str, default="train")
    g.add_argument("--eval.dataset", type=str, default=None, help="Evaluation dataset.")
    g.add_argument("--eval.split", type=str, default="train")
    g.add_argument("--eval.temperature", type=float, default=0.6, help="Sampling temperature for evaluation.")
    g.add_argument("--eval.n_samples_per_prompt", type=int, default=4, help="Evaluation samples per prompt.")
    g.add_argument("--data.input_key", type=str, default="input", help="Prompt column.")
    g.add_argument(
        "--data.label_key", type=str, default=None, help="Label column (passed to reward functions)."
    )
    g.add_argument("--data.input_template", type=str, default=None)
    g.add_argument(
        "--data.output_key",
        type=str,
        default=None,
        help="GOLD (not an OpenRLHF PPO option): reference-completion column, used for the off-policy share of "
        "the prompts when --gold.lmbda < 1 (as GKD/TRL; OpenRLHF's SFT uses the same name); not needed with "
        "--gold.off_policy_source teacher.",
    )
    _flag(g, "--data.apply_chat_template", "Render prompts with the student tokenizer's chat template.")
    g.add_argument("--logger.wandb.key", type=str, default=None)
    g.add_argument("--logger.wandb.org", type=str, default=None)
    g.add_argument("--logger.wandb.group", type=str, default=None)
    g.add_argument("--logger.wandb.project", type=str, default="openrlhf_train_ppo")
    g.add_argument(
        "--logger.wandb.run_name", type=str, default=f"ppo_{datetime.now().strftime('%m%dT%H:%M')}"
    )
    _flag(g, "--algo.dynamic_filtering_enable", "Drop prompt groups whose mean score is outside the range.")
    g.add_argument(
        "--algo.dynamic_filtering_range", nargs=2, default=(0, 1), type=float, help="Kept score range."
    )
    g.add_argument("--data.image_key", type=str, default="images", help="Image column (VLM).")
    g.add_argument(
        "--data.max_images_per_prompt", type=int, default=0, help="Images per prompt (0 = text only)."
    )
    _flag(g, "--actor.freeze_visual_encoder", "VLM: train the language model only.")
    g.add_argument("--logger.tensorboard_dir", type=str, default=None, help="TensorBoard folder.")
    _flag(g, "--use_ms", "Download models from ModelScope.")


def add_openrlhf_arguments(parser: argparse.ArgumentParser) -> None:
    """Register every option of OpenRLHF 0.11.2's ``train_ppo_ray`` (same dest names and defaults)."""
    _add_cluster_options(parser)
    _add_vllm_options(parser)
    _add_async_and_checkpoint_options(parser)
    _add_deepspeed_options(parser)
    _add_ppo_options(parser)
    _add_optimizer_options(parser)
    _add_estimator_and_model_options(parser)
    _add_data_and_logging_options(parser)


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dry_run``."""
    parser.add_argument_group("Launcher").add_argument(
        "--dry_run",
        action="store_true",
        default=False,
        help="Validate the options, print the resolved configuration and cluster layout, check the two tokenizers "
        "when their paths exist, and exit without starting Ray or loading weights.",
    )


def build_parser(parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """The OpenRLHF backend's parser: ``parents``' options, ``--dry_run``, OpenRLHF's options, the GOLD groups."""
    parser = argparse.ArgumentParser(
        parents=list(parents),
        prog="train_gold.py",
        description=f"GOLD on-policy distillation on OpenRLHF {OPENRLHF_VERSION}: OpenRLHF's train_ppo_ray options "
        "plus --gold.* (docs/design.md). Submit with `ray job submit -- python launchers/train_gold.py ...`.",
    )
    add_launcher_arguments(parser)
    add_openrlhf_arguments(parser)
    add_gold_arguments(parser)
    return parser


def nest_namespace(args: argparse.Namespace) -> SimpleNamespace:
    """Turn dotted dest names into nested namespaces (``args.actor.model_name_or_path``), like OpenRLHF does."""
    root: dict[str, Any] = {}
    for key, value in vars(args).items():
        *parents, leaf = key.split(".")
        node = root
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    def build(node: Any) -> Any:
        if isinstance(node, dict):
            return SimpleNamespace(**{k: build(v) for k, v in node.items()})
        return node

    return build(root)


def namespace_to_dict(ns: Any) -> Any:
    """Nested namespaces as nested dicts (for printing and JSON)."""
    if isinstance(ns, (SimpleNamespace, argparse.Namespace)):
        return {k: namespace_to_dict(v) for k, v in vars(ns).items()}
    if isinstance(ns, tuple):
        return list(ns)
    return ns
