#!/usr/bin/env bash
# (b) GOLD mixed with GRPO on Countdown: A = 0.5 * A_grpo + 0.5 * A_distill.
#     Same pair as (a): teacher Qwen/Qwen3-4B-Instruct-2507 -> student meta-llama/Llama-3.2-1B-Instruct.
#     Task reward: examples/countdown_reward.py (OpenRLHF reward_func: 1 if the <answer> equation is right).
#     GRPO: group_norm over 8 samples per prompt, KL to the reference as a k3 loss.
#
# GPUs: one node with 8 GPUs (uses 6): actor 2, with the reference and the teacher colocated on those 2 GPUs (like
# OpenRLHF's reference), vLLM rollout 4 x 1; or drop --train.colocate_actor_ref to give the reference and the
# teacher their own GPUs (then actor 2 + reference 2 + teacher 2 + vLLM 2).
#
# Before: ray start --head --num-gpus 8 ; python examples/prepare_countdown.py --out "$DATA"
# Check the options without a cluster: bash examples/gold_grpo_countdown_mix.sh --dry_run
set -euo pipefail
cd "$(dirname "$0")/.."

STUDENT=${STUDENT:-meta-llama/Llama-3.2-1B-Instruct}
TEACHER=${TEACHER:-Qwen/Qwen3-4B-Instruct-2507}
DATA=${DATA:-/shared/data/countdown_train.jsonl}
SAVE=${SAVE:-/shared/ckpt/gold-grpo-countdown-llama1b}
SUBMIT=(ray job submit --address="${RAY_ADDRESS:-http://127.0.0.1:8265}" --runtime-env-json='{"working_dir": "."}' --)
if [[ " $* " == *" --dry_run "* ]]; then SUBMIT=(); fi

"${SUBMIT[@]}" python3 launchers/train_gold.py \
   --actor.model_name_or_path "$STUDENT" \
   --actor.num_nodes 1 --actor.num_gpus_per_node 2 --ref.num_nodes 1 --ref.num_gpus_per_node 2 \
   --train.colocate_actor_ref \
   --vllm.num_engines 4 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.85 \
   --gold.teacher.model_name_or_path "$TEACHER" \
   --gold.teacher.backend hf --gold.teacher.num_replicas 2 --gold.teacher.micro_batch_size 8 \
   --gold.alpha 0.5 --gold.kl_coef 1.0 --gold.signal advantage \
   --reward.remote_url examples/countdown_reward.py \
   --algo.advantage.estimator group_norm --rollout.n_samples_per_prompt 8 \
   --algo.kl.init_coef 1e-3 --algo.kl.use_loss --algo.kl.estimator k3 \
   --data.prompt_dataset "$DATA" --data.input_key prompt --data.label_key label --data.apply_chat_template \
   --data.max_len 1536 --rollout.max_new_tokens 1024 --rollout.temperature 1.0 \
   --rollout.batch_size 32 --rollout.micro_batch_size 8 \
   --train.batch_size 256 --train.micro_batch_size 4 --train.max_epochs 1 --train.num_episodes 1 \
   --actor.adam.lr 1e-6 --ds.zero_stage 2 --ds.param_dtype bf16 --actor.gradient_checkpointing_enable \
   --ckpt.output_dir "$SAVE" --ckpt.path "$SAVE/ckpt" --ckpt.save_steps 50 --ckpt.save_hf \
   --logger.logging_steps 1 --logger.tensorboard_dir "$SAVE/runs" \
   "$@"
