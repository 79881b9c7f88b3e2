"""The plugin's cost per training step in OpenRLHF's Ray loop: GOLD + GRPO (alpha 0.5) vs OpenRLHF's plain GRPO.

Both jobs go through ``ray job submit`` to one local Ray head, with the same OpenRLHF options (the options of
``examples/gold_grpo_countdown_mix.sh``: group_norm advantages, k3 KL loss to a reference, the Countdown reward
function, vLLM rollout engines, DeepSpeed ZeRO-2) on the same tiny student and prompts:

1. ``grpo``: ``python -m openrlhf.cli.train_ppo_ray <options>``, OpenRLHF unchanged;
2. ``gold``: ``python launchers/train_gold.py <options> --gold.alpha 0.5 ...`` (hf teacher, sampled-KL
   advantages mixed with the task's);
3. ``gold_logit``: the same with the default signal, the byte-projected logit loss (``--gold.signal logit``,
   teacher top-k 64): its compact inputs are built in the experience maker (in ``gold/plugin_seconds``) and
   expanded by the actor in its training step (in ``ppo_train``).

Per step it reads OpenRLHF's own timing (``timing/step_total`` = generation + make_experience + ppo_train +
broadcast) and the plugin's ``gold/teacher_seconds`` (the teacher's scoring, which runs beside OpenRLHF's
reference and actor forwards) and ``gold/teacher_wait_seconds`` (how long make_experience then still waited for
it) from each job's tensorboard log. The GOLD step without the teacher lies between the step minus the wait (the
teacher's CPU use still slows the forwards it overlaps) and the step minus the whole scoring time (as if none of
it overlapped). The headline ratio ("without teacher") replaces the GOLD step's experience making by the GRPO
job's (the same OpenRLHF forwards without a teacher beside them) plus ``gold/plugin_seconds``, the plugin's own
measured work there (teacher requests, alignment, signal); generation, training and the weight sync are the GOLD
job's own. The first ``--warmup`` steps of every job are left out;
the jobs alternate (``--rounds``) so that load drifts reach both.

Run (CPU, any machine):  python3 benchmarks/bench_openrlhf_overhead.py
On a GPU cluster drop the CPU runtime env (``--cpu false``) and point ``--address`` at the head.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gold_plugin.testing.ray_head import (  # noqa: E402
    BIN_DIR,
    REPO,
    countdown_prompts,
    job_env,
    local_ray_head,
    tensorboard_scalars,
)

PHASES = ("generation", "make_experience", "ppo_train", "broadcast", "step_total")
KINDS = ("grpo", "gold", "gold_logit")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="measured steps per job")
    parser.add_argument("--warmup", type=int, default=1, help="first steps of every job left out")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of one job per kind, in rotating order")
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=KINDS,
        default=list(KINDS),
        help="the jobs of a round (grpo is the baseline)",
    )
    parser.add_argument("--rollout-batch", type=int, default=8, help="prompts per step")
    parser.add_argument("--n-samples", type=int, default=4, help="samples per prompt (the GRPO group)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="models, data and logs (default: a temp dir)"
    )
    parser.add_argument(
        "--address", default=None, help="an existing Ray head's job address (default: start one)"
    )
    parser.add_argument("--cpu", type=lambda s: s.lower() != "false", default=True, help="CPU runtime env")
    parser.add_argument("--json", type=Path, default=None, help="also write the per-step figures here")
    parser.add_argument(
        "--report-only", action="store_true", help="only read the finished jobs' logs under --work-dir"
    )
    return parser.parse_args()


def openrlhf_options(args: argparse.Namespace, student: Path, data: Path, save: Path) -> list[str]:
    """The options both jobs share (examples/gold_grpo_countdown_mix.sh at this size, CPU options appended)."""
    samples = args.rollout_batch * args.n_samples
    options = [
        "--actor.model_name_or_path", str(student),
        "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "1", "--ref.num_nodes", "1",
        "--ref.num_gpus_per_node", "1", "--train.colocate_actor_ref",
        "--vllm.num_engines", "1", "--vllm.tensor_parallel_size", "1", "--vllm.gpu_memory_utilization", "0.85",
        "--reward.remote_url", "examples/countdown_reward.py",
        "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", str(args.n_samples),
        "--algo.kl.init_coef", "1e-3", "--algo.kl.use_loss", "--algo.kl.estimator", "k3",
        "--data.prompt_dataset", str(data), "--data.input_key", "prompt", "--data.label_key", "label",
        "--data.apply_chat_template", "--data.max_len", "256", "--rollout.max_new_tokens", str(args.max_new_tokens),
        "--rollout.temperature", "1.0", "--rollout.batch_size", str(args.rollout_batch),
        "--rollout.micro_batch_size", str(samples), "--train.batch_size", str(samples),
        "--train.micro_batch_size", "4", "--train.max_epochs", "1", "--train.num_episodes", "1",
        "--actor.adam.lr", "1e-6", "--ds.zero_stage", "2", "--ds.param_dtype", "bf16",
        "--actor.gradient_checkpointing_enable",
        "--ckpt.output_dir", str(save), "--ckpt.path", str(save / "ckpt"), "--ckpt.save_steps", "-1",
        "--logger.logging_steps", "1", "--logger.tensorboard_dir", str(save / "runs"),
        "--data.max_samples", str(args.rollout_batch * (args.warmup + args.steps)),
    ]  # fmt: skip
    if args.cpu:
        options += ["--ds.attn_implementation", "sdpa", "--vllm.enforce_eager"]
    return options


def gold_options(kind: str, teacher: Path) -> list[str]:
    signal = (
        ["--gold.signal", "logit", "--gold.teacher.topk", "64"]
        if kind == "gold_logit"
        else ["--gold.signal", "advantage"]
    )
    return [
        "--gold.teacher.model_name_or_path", str(teacher), "--gold.teacher.backend", "hf",
        "--gold.teacher.num_replicas", "1", "--gold.teacher.micro_batch_size", "8",
        "--gold.alpha", "0.5", *signal,
    ]  # fmt: skip


def run_job(
    kind: str, address: str, runtime_env: dict, options: list[str], log: Path, timeout_s: float = 1800
) -> None:
    entry = (
        ["python3", "launchers/train_gold.py"]
        if kind.startswith("gold")
        else ["python3", "-m", "openrlhf.cli.train_ppo_ray"]
    )
    command = [
        f"{BIN_DIR}/ray", "job", "submit", f"--address={address}", f"--runtime-env-json={json.dumps(runtime_env)}",
        "--", *entry, *options,
    ]  # fmt: skip
    with log.open("w") as out:
        try:
            done = subprocess.run(
                command, env=job_env(), stdout=out, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"the {kind} job ran over {timeout_s} s (log: {log}; a vLLM engine that fails to start leaves the "
                "actors waiting for it: see the Ray session's worker logs)"
            ) from None
    text = log.read_text(errors="replace")
    if done.returncode != 0 or "succeeded" not in text:
        raise RuntimeError(f"the {kind} job failed (log: {log}):\n{text[-4000:]}")


def step_figures(save: Path, warmup: int) -> list[dict[str, float]]:
    """Per measured step: OpenRLHF's phase times and the teacher's scoring time (0 for GRPO)."""
    scalars = tensorboard_scalars(save / "runs")
    steps = sorted(scalars["train/timing/step_total"])[warmup:]
    teacher = scalars.get("train/gold/teacher_seconds", {})
    wait = scalars.get("train/gold/teacher_wait_seconds", {})
    plugin = scalars.get("train/gold/plugin_seconds", {})
    return [
        {
            **{p: scalars[f"train/timing/{p}"][s] for p in PHASES},
            "teacher": teacher.get(s, 0.0),
            "teacher_wait": wait.get(s, 0.0),
            "plugin": plugin.get(s, 0.0),
        }
        for s in steps
    ]


def main() -> None:
    args = parse_args()
    from gold_plugin.testing.openrlhf_cpu import runtime_env as cpu_runtime_env
    from gold_plugin.testing.tiny_teacher import VLLM_CPU_SHAPE, save_tiny_teacher

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gold-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    student = save_tiny_teacher(work / "student", "mistral", seed=1, **VLLM_CPU_SHAPE)
    teacher = save_tiny_teacher(work / "teacher", "gpt2", seed=2, **VLLM_CPU_SHAPE)
    data = countdown_prompts(work / "countdown.jsonl", args.rollout_batch * (args.warmup + args.steps))
    runtime_env = cpu_runtime_env(str(REPO)) if args.cpu else {"working_dir": str(REPO)}

    kinds = ["grpo", *(k for k in args.kinds if k != "grpo")]
    figures: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}

    def rounds(address: str) -> None:
        for r in range(args.rounds):
            for kind in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:
                save = work / f"{kind}{r}"
                options = openrlhf_options(args, student, data, save)
                if kind != "grpo":
                    options += gold_options(kind, teacher)
                if not args.report_only:
                    print(f"round {r + 1}/{args.rounds}: {kind} job ...", flush=True)
                    run_job(kind, address, runtime_env, options, work / f"{kind}{r}.log")
                figures[kind] += step_figures(save, args.warmup)

    if args.address or args.report_only:
        rounds(args.address)
    else:
        with local_ray_head() as address:
            rounds(address)

    def median(kind: str, key: str) -> float:
        return statistics.median(step[key] for step in figures[kind])

    # OpenRLHF's own experience making, without a teacher beside it:
    grpo_forwards = median("grpo", "make_experience")
    for kind in kinds:
        for step in figures[kind]:
            if kind == "grpo":
                for key in ("step_total - teacher_wait", "step_total - teacher", "without teacher"):
                    step[key] = step["step_total"]
                continue
            step["step_total - teacher_wait"] = step["step_total"] - step["teacher_wait"]
            step["step_total - teacher"] = step["step_total"] - step["teacher"]
            # The GOLD step with OpenRLHF's experience making as it is without a teacher running beside it, plus
            # the plugin's own measured work there: what remains when the teacher's scoring (and its CPU use) is
            # removed. The logit loss's work in the actor's training step stays in (ppo_train).
            step["without teacher"] = (
                step["step_total"] - step["make_experience"] + grpo_forwards + step["plugin"]
            )
    counts = " + ".join(f"{len(figures[kind])} {kind}" for kind in kinds)
    print(f"\n{counts} measured steps, medians in seconds; ratios to grpo")
    print(f"{'phase':<28}" + "".join(f"{kind:>12}{'/grpo':>8}" for kind in kinds))
    keys = (*PHASES, "teacher", "teacher_wait", "plugin", "step_total - teacher_wait", "step_total - teacher")
    for key in (*keys, "without teacher"):
        grpo = median("grpo", key)
        cells = []
        for kind in kinds:
            value = median(kind, key)
            cells.append(f"{value:>12.3f}{(f'{value / grpo:.3f}x' if grpo > 0 else '-'):>8}")
        print(f"{key:<28}" + "".join(cells))
    for kind in kinds[1:]:
        ratio = median(kind, "without teacher") / median("grpo", "step_total")
        print(f"{kind}: step without the teacher's scoring / GRPO step: {ratio:.3f}x (target <= 1.05x)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
