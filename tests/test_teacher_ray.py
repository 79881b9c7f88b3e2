"""Ray teacher service: real actors on a local Ray cluster, a replica killed mid-batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from gold_plugin.alignment import encode_continuation  # noqa: E402
from gold_plugin.config import GoldConfig, TeacherConfig  # noqa: E402
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer  # noqa: E402
from gold_plugin.teacher import HFTeacher, TeacherGroup, TeacherReplicaError, TeacherRequest  # noqa: E402
from gold_plugin.teacher.ray_group import split_balanced  # noqa: E402
from gold_plugin.teacher.types import TeacherScorer  # noqa: E402
from gold_plugin.testing.tiny_teacher import save_tiny_teacher  # noqa: E402

pytestmark = pytest.mark.ray

TOPK = 4
REQUESTS = [
    TeacherRequest(
        [{"role": "user", "content": f"Question number {i}?"}],
        f" Answer {i}: " + "yes " * (i % 7),
        i % 2 == 0,
    )
    for i in range(24)
] + [TeacherRequest("plain", ""), TeacherRequest("plain", "bad \ud800")]


@pytest.fixture(scope="module")
def teacher_config(tmp_path_factory):
    path = save_tiny_teacher(tmp_path_factory.mktemp("ray_teacher"), "gpt2", seed=2)
    return TeacherConfig(
        model_name_or_path=str(path),
        topk=TOPK,
        num_gpus_per_replica=0,
        num_cpus_per_replica=1,
        micro_batch_size=4,
    )


@pytest.fixture(scope="module")
def reference(teacher_config):
    teacher = HFTeacher(
        teacher_config.model_name_or_path, topk=TOPK, tokenizer=load_packaged_tokenizer("gpt2")
    )
    return teacher.score(REQUESTS)


@pytest.fixture(scope="module")
def group(local_ray, teacher_config):
    group = TeacherGroup(teacher_config, num_replicas=2, max_retries=1)
    yield group
    group.close()


def assert_same(results, references):
    assert len(results) == len(references)
    for got, ref in zip(results, references):
        assert got.error == ref.error
        np.testing.assert_array_equal(got.token_ids, ref.token_ids)
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got.topk_ids, ref.topk_ids)


def test_split_balanced_keeps_every_index_once():
    sizes = [5, 1, 9, 3, 3, 7, 2]
    parts = split_balanced(sizes, 3)
    assert sorted(i for p in parts for i in p) == list(range(len(sizes)))
    assert all(p == sorted(p) for p in parts)
    loads = [sum(sizes[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(sizes)


def test_replica_that_cannot_be_scheduled_is_a_clear_error(group, teacher_config):
    # Both CPUs are held by the module's group: a third 1-CPU replica can never start.
    with pytest.raises(TeacherReplicaError, match="did not start within 3"):
        TeacherGroup(teacher_config, num_replicas=1, name="starved", start_timeout_s=3)


def test_group_scores_in_order_like_a_local_teacher(group, reference):
    pids = {info["pid"] for info in ray.get([r.ready.remote() for r in group.replicas])}
    assert len(pids) == 2  # two real actor processes
    results = group.score(REQUESTS)
    assert_same(results, reference)
    assert results[-1].error and results[-2].num_tokens == 0
    # The group's own tokenizer (loaded from its config) is the one the replicas' token ids refer to.
    assert group.topk == TOPK
    expected = encode_continuation(group.tokenizer, REQUESTS[1].response)
    assert list(results[1].token_ids) == expected and not REQUESTS[1].ends_with_eos


def test_async_scoring_returns_refs(group, reference):
    batch = group.score_async(REQUESTS[:6])
    assert len(batch.refs) == 2 and all(isinstance(r, ray.ObjectRef) for r in batch.refs)
    assert_same(batch.result(timeout=120), reference[:6])
    assert batch.done()
    assert group.score([]) == []


def test_killed_replica_is_restarted_and_its_share_retried(group, reference):
    before = group.num_restarts
    victim = group.replicas[1]
    batch = group.score_async(REQUESTS)
    ray.kill(victim)  # dies while it holds its share of the batch
    results = batch.result(timeout=300)
    assert_same(results, reference)
    assert group.num_restarts == before + 1 and batch.retries == 1
    assert group.replicas[1] is not victim
    results, retries = group.score_counting_retries(REQUESTS[:4])
    assert_same(results, reference[:4])  # the new replica serves later batches
    assert retries == 0


def test_score_counting_retries_counts_every_resent_share(group, reference):
    """What the experience makers log as ``gold/teacher_retries``: one per share re-sent after its replica died."""
    before = group.num_restarts
    for victim in list(group.replicas):
        ray.kill(victim)  # both replicas dead before the call: both shares fail once and are re-sent
    results, retries = group.score_counting_retries(REQUESTS)
    assert_same(results, reference)
    assert retries == 2 and group.num_restarts == before + 2
    results, retries = HFTeacherStub(reference).score_counting_retries(REQUESTS)
    assert retries == 0 and results == reference  # an in-process scorer: nothing to retry


class HFTeacherStub(TeacherScorer):
    """An in-process scorer that defines only ``score`` (``score_counting_retries`` is the contract's default)."""

    def __init__(self, results):
        self.results = results

    def score(self, requests):
        return self.results[: len(requests)]


def test_replica_that_keeps_dying_is_named_in_the_error(local_ray, teacher_config):
    # The module's group holds both CPUs: this replica asks for none so that it can be scheduled.
    config = dataclasses.replace(teacher_config, num_cpus_per_replica=0)
    group = TeacherGroup(GoldConfig(teacher=config), num_replicas=1, max_retries=0, name="tiny-teacher")
    try:
        # Killed before the batch is sent (a kill racing a 3-request share is timing-dependent on a busy
        # machine): the share fails with the actor's death, and with no retries left the error names it.
        ray.kill(group.replicas[0])
        batch = group.score_async(REQUESTS[:3])
        with pytest.raises(TeacherReplicaError, match="tiny-teacher-0 died 1 times"):
            batch.result(timeout=120)
    finally:
        group.close()


GENERATION_PROMPTS = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(5)] + [
    "plain",
    "text",
]


def test_group_generates_in_order_like_a_local_teacher_and_retries_a_dead_replica(group, teacher_config):
    """``TeacherGroup.generate`` splits the prompts over both replicas; a replica dead before the call is restarted
    and its share re-sent (the retry handling of ``score``), with the same completions."""
    from gold_plugin.teacher.generation import GenerationParams, generate_counting_retries

    params = GenerationParams(max_new_tokens=5, temperature=0.0)
    local = HFTeacher(
        teacher_config.model_name_or_path, tokenizer=load_packaged_tokenizer("gpt2"), micro_batch_size=4
    )
    expected = local.generate(GENERATION_PROMPTS, params)
    assert all(g.error is None and g.num_tokens > 0 for g in expected)
    assert group.generate(GENERATION_PROMPTS, params) == expected
    before = group.num_restarts
    ray.kill(group.replicas[0])
    results, retries = generate_counting_retries(group, GENERATION_PROMPTS, params)
    assert results == expected
    assert retries == 1 and group.num_restarts == before + 1
    assert generate_counting_retries(local, GENERATION_PROMPTS[:2], params) == (expected[:2], 0)
