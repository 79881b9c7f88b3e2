#!/usr/bin/env bash
# (a) Reward-free GOLD across tokenizers on Countdown:
#     teacher Qwen/Qwen3-4B-Instruct-2507 (Qwen byte-level BPE, 151k) -> student meta-llama/Llama-3.2-1B-Instruct
#     (Llama-3 byte-level BPE, 128k). --gold.alpha 1: no reward model, no reward function, no reference model.
#
# GPUs: one node with 8 GPUs (uses 6): actor 2 (ZeRO-2), vLLM rollout 2 x 1, teacher 2 replicas x 1 (vLLM
# prompt log-probs). Smaller machine: add --train.colocate_all --vllm.enable_sleep --ds.enable_sleep and set
# --actor.num_gpus_per_node / --vllm.num_engines to your GPU count (the teacher then shares the actor's GPUs).
#
# Signal: --gold.signal logit (the default), the byte-projected logit loss on the teacher's top-64 at every teacher
# position. Measured (docs/results.md): on tokenizer pairs that cut numbers differently it closed 1.34x and 1.04x
# of same-tokenizer distillation's gain where sampled-KL advantages (--gold.signal advantage) closed -0.02x and
# 0.81x (examples/local/compare_pairs.py, 5 seeds); its inputs cost OpenRLHF's experience maker 1-3 us per teacher
# position and ship about 600 bytes per position to the actors (benchmarks/bench_gold_step.py).
#
# Before: ray start --head --num-gpus 8 ; python examples/prepare_countdown.py --out "$DATA"
# Check the options without a cluster: bash examples/gold_countdown_qwen3_4b_to_llama3_1b.sh --dry_run
set -euo pipefail
cd "$(dirname "$0")/.."

STUDENT=${STUDENT:-meta-llama/Llama-3.2-1B-Instruct}
TEACHER=${TEACHER:-Qwen/Qwen3-4B-Instruct-2507}
DATA=${DATA:-/shared/data/countdown_train.jsonl}
SAVE=${SAVE:-/shared/ckpt/gold-countdown-llama1b}
ACTOR_GPUS=${ACTOR_GPUS:-2}
VLLM_ENGINES=${VLLM_ENGINES:-2}
TEACHER_REPLICAS=${TEACHER_REPLICAS:-2}
MAX_LEN=${MAX_LEN:-1536}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-1024}
ROLLOUT_BATCH=${ROLLOUT_BATCH:-64}
N_SAMPLES=${N_SAMPLES:-4}
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
   --actor.num_nodes 1 --actor.num_gpus_per_node "$ACTOR_GPUS" \
   --vllm.num_engines "$VLLM_ENGINES" --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.85 \
   --gold.teacher.model_name_or_path "$TEACHER" \
   --gold.teacher.backend vllm --gold.teacher.num_replicas "$TEACHER_REPLICAS" --gold.teacher.num_gpus_per_replica 1 \
   --gold.alpha 1.0 --gold.signal logit --gold.alignment spans \
   --algo.advantage.estimator reinforce --algo.kl.init_coef 0 \
   --data.prompt_dataset "$DATA" --data.input_key prompt --data.label_key label --data.apply_chat_template \
   --data.max_len "$MAX_LEN" --rollout.max_new_tokens "$MAX_NEW_TOKENS" --rollout.temperature 1.0 \
   --rollout.batch_size "$ROLLOUT_BATCH" --rollout.n_samples_per_prompt "$N_SAMPLES" --rollout.micro_batch_size "$ROLLOUT_MICRO" \
   --train.batch_size "$TRAIN_BATCH" --train.micro_batch_size "$TRAIN_MICRO" --train.max_epochs 1 --train.num_episodes 1 \
   --actor.adam.lr 1e-6 --ds.zero_stage 2 --ds.param_dtype bf16 --actor.gradient_checkpointing_enable \
   --ckpt.output_dir "$SAVE" --ckpt.path "$SAVE/ckpt" --ckpt.save_steps "$SAVE_STEPS" --ckpt.save_hf \
   --logger.logging_steps 1 --logger.tensorboard_dir "$SAVE/runs" \
   "$@"
