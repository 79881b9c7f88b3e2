#!/usr/bin/env bash
# (c) Same-tokenizer distillation: teacher Qwen/Qwen3-8B -> student Qwen/Qwen3-1.7B (one vocabulary, so the
#     span groups are 1:1 tokens and the vocabulary map is the identity). Sampled-KL advantages plus the aligned
#     logit loss on the teacher's top-64 (--gold.signal both), reward-free (--gold.alpha 1).
#
# GPUs: one node with 8 GPUs (uses 8): actor 4 (ZeRO-2), vLLM rollout 2 x 1, teacher 2 replicas x 1 (vLLM prompt
# log-probs, top-64). The logit loss needs padded batches: no --ds.packing_samples / --train.dynamic_batch_enable.
#
# Before: ray start --head --num-gpus 8 ; python examples/prepare_countdown.py --out "$DATA"
# Check the options without a cluster: bash examples/gold_same_tokenizer_qwen3_8b_to_1p7b.sh --dry_run
set -euo pipefail
cd "$(dirname "$0")/.."

STUDENT=${STUDENT:-Qwen/Qwen3-1.7B}
TEACHER=${TEACHER:-Qwen/Qwen3-8B}
DATA=${DATA:-/shared/data/countdown_train.jsonl}
SAVE=${SAVE:-/shared/ckpt/gold-qwen3-1p7b}
ACTOR_GPUS=${ACTOR_GPUS:-4}
VLLM_ENGINES=${VLLM_ENGINES:-2}
TEACHER_REPLICAS=${TEACHER_REPLICAS:-2}
MAX_LEN=${MAX_LEN:-2048}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-1536}
ROLLOUT_BATCH=${ROLLOUT_BATCH:-64}
N_SAMPLES=${N_SAMPLES:-4}
ROLLOUT_MICRO=${ROLLOUT_MICRO:-8}
TRAIN_BATCH=${TRAIN_BATCH:-256}
TRAIN_MICRO=${TRAIN_MICRO:-2}
SAVE_STEPS=${SAVE_STEPS:-50}
DEFAULT_RUNTIME_ENV='{"working_dir": "."}'
RUNTIME_ENV=${RUNTIME_ENV:-$DEFAULT_RUNTIME_ENV}
SUBMIT=(ray job submit --address="${RAY_ADDRESS:-http://127.0.0.1:8265}" --runtime-env-json="$RUNTIME_ENV" --)
if [[ " $* " == *" --dry_run "* ]]; then SUBMIT=(); fi

"${SUBMIT[@]}" python3 launchers/train_gold.py \
   --actor.model_name_or_path "$STUDENT" \
   --actor.num_nodes 1 --actor.num_gpus_per_node "$ACTOR_GPUS" \
   --vllm.num_engines "$VLLM_ENGINES" --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.85 \
   --gold.teacher.model_name_or_path "$TEACHER" \
   --gold.teacher.backend vllm --gold.teacher.num_replicas "$TEACHER_REPLICAS" --gold.teacher.num_gpus_per_replica 1 \
   --gold.teacher.topk 64 \
   --gold.alpha 1.0 --gold.signal both --gold.logit_coef 1.0 --gold.beta 0.5 \
   --algo.advantage.estimator reinforce --algo.kl.init_coef 0 \
   --data.prompt_dataset "$DATA" --data.input_key prompt --data.label_key label --data.apply_chat_template \
   --data.max_len "$MAX_LEN" --rollout.max_new_tokens "$MAX_NEW_TOKENS" --rollout.temperature 1.0 \
   --rollout.batch_size "$ROLLOUT_BATCH" --rollout.n_samples_per_prompt "$N_SAMPLES" --rollout.micro_batch_size "$ROLLOUT_MICRO" \
   --train.batch_size "$TRAIN_BATCH" --train.micro_batch_size "$TRAIN_MICRO" --train.max_epochs 1 --train.num_episodes 1 \
   --actor.adam.lr 1e-6 --ds.zero_stage 2 --ds.param_dtype bf16 --actor.gradient_checkpointing_enable \
   --ckpt.output_dir "$SAVE" --ckpt.path "$SAVE/ckpt" --ckpt.save_steps "$SAVE_STEPS" --ckpt.save_hf \
   --logger.logging_steps 1 --logger.tensorboard_dir "$SAVE/runs" \
   "$@"
