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
# Signal: --gold.signal logit (the default), the byte-projected logit loss on the teacher's top-64 at every teacher
# position. Measured (docs/results.md): on tokenizer pairs that cut numbers differently it closed 1.34x and 1.04x
# of same-tokenizer distillation's gain where sampled-KL advantages (--gold.signal advantage) closed -0.02x and
# 0.81x (examples/local/compare_pairs.py, 5 seeds); its inputs cost OpenRLHF's experience maker 1-3 us per teacher
# position and ship about 600 bytes per position to the actors (benchmarks/bench_gold_step.py).
#
# Before: ray start --head --num-gpus 8 ; python examples/prepare_countdown.py --out "$DATA"
# Check the options without a cluster: bash examples/gold_grpo_countdown_mix.sh --dry_run
set -euo pipefail
cd "$(dirname "$0")/.."

STUDENT=${STUDENT:-meta-llama/Llama-3.2-1B-Instruct}
TEACHER=${TEACHER:-Qwen/Qwen3-4B-Instruct-2507}
DATA=${DATA:-/shared/data/countdown_train.jsonl}
SAVE=${SAVE:-/shared/ckpt/gold-grpo-countdown-llama1b}
ACTOR_GPUS=${ACTOR_GPUS:-2}
VLLM_ENGINES=${VLLM_ENGINES:-4}
TEACHER_REPLICAS=${TEACHER_REPLICAS:-2}
MAX_LEN=${MAX_LEN:-1536}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-1024}
ROLLOUT_BATCH=${ROLLOUT_BATCH:-32}
N_SAMPLES=${N_SAMPLES:-8}
ROLLOUT_MICRO=${ROLLOUT_MICRO:-8}
TRAIN_BATCH=${TRAIN_BATCH:-256}
TRAIN_MICRO=${TRAIN_MICRO:-4}
SAVE_STEPS=${SAVE_STEPS:-50}
DEFAULT_RUNTIME_ENV='{"working_dir": "."}'
RUNTIME_ENV=${RUNTIME_ENV:-$DEFAULT_RUNTIME_ENV}
SUBMIT=(ray job submit --address="${RAY_ADDRESS:-http://127.0.0.1:8265}" --runtime-env-json="$RUNTIME_ENV" --)
if [[ " $* " == *" --dry_run "* ]]; then SUBMIT=(); fi

"${SUBMIT[@]}" python3 launchers/train_gold.py \
   --actor.model_name_or_path "$STUDENT" \
   --actor.num_nodes 1 --actor.num_gpus_per_node "$ACTOR_GPUS" --ref.num_nodes 1 --ref.num_gpus_per_node "$ACTOR_GPUS" \
   --train.colocate_actor_ref \
   --vllm.num_engines "$VLLM_ENGINES" --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.85 \
   --gold.teacher.model_name_or_path "$TEACHER" \
   --gold.teacher.backend hf --gold.teacher.num_replicas "$TEACHER_REPLICAS" --gold.teacher.micro_batch_size 8 \
   --gold.alpha 0.5 --gold.signal logit \
   --reward.remote_url examples/countdown_reward.py \
   --algo.advantage.estimator group_norm --rollout.n_samples_per_prompt "$N_SAMPLES" \
   --algo.kl.init_coef 1e-3 --algo.kl.use_loss --algo.kl.estimator k3 \
   --data.prompt_dataset "$DATA" --data.input_key prompt --data.label_key label --data.apply_chat_template \
   --data.max_len "$MAX_LEN" --rollout.max_new_tokens "$MAX_NEW_TOKENS" --rollout.temperature 1.0 \
   --rollout.batch_size "$ROLLOUT_BATCH" --rollout.micro_batch_size "$ROLLOUT_MICRO" \
   --train.batch_size "$TRAIN_BATCH" --train.micro_batch_size "$TRAIN_MICRO" --train.max_epochs 1 --train.num_episodes 1 \
   --actor.adam.lr 1e-6 --ds.zero_stage 2 --ds.param_dtype bf16 --actor.gradient_checkpointing_enable \
   --ckpt.output_dir "$SAVE" --ckpt.path "$SAVE/ckpt" --ckpt.save_steps "$SAVE_STEPS" --ckpt.save_hf \
   --logger.logging_steps 1 --logger.tensorboard_dir "$SAVE/runs" \
   "$@"
