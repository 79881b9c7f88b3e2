"""server backend against a real ``vllm serve`` (the CPU build) on 127.0.0.1, started and stopped here.

One server for the module: the tiny Llama of ``test_teacher_vllm_engine.py`` (Mistral-v1 SentencePiece tokenizer,
``max_model_len`` 64), served as ``gold-teacher`` with ``--max-logprobs 8`` and an API key. The reference is the
in-cluster vllm backend (:class:`VLLMTeacher`) on the same weights in this process.
"""

from __future__ import annotations

import pickle
import threading
import time

import numpy as np
import pytest
from vllm_helpers import require_vllm

require_vllm()

from gold_plugin.config import GoldConfigError, TeacherConfig  # noqa: E402
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer  # noqa: E402
from gold_plugin.teacher import (  # noqa: E402
    GenerationParams,
    ServedTeacher,
    TeacherRequest,
    TeacherServerError,
    VLLMTeacher,
    build_teacher,
)
from gold_plugin.testing.tiny_teacher import VLLM_CPU_SHAPE, save_tiny_teacher, vllm_cpu_engine_kwargs  # noqa: E402
from gold_plugin.testing.vllm_server import SERVED_NAME, VLLMServer, free_port  # noqa: E402

pytestmark = pytest.mark.slow

TOPK = 6
MAX_LEN = 64
KEY_ENV = "GOLD_TEST_TEACHER_KEY"
KEY = "test-key-not-secret"
CHAT = [{"role": "user", "content": "Say something about the sea."}]
REQUESTS = [
    TeacherRequest(CHAT, "The sea is wide and deep.", ends_with_eos=True),
    TeacherRequest("Plain text prompt:", " and a plain continuation"),
    TeacherRequest([{"role": "user", "content": "Hi"}], "Café naïve — 東京 😀 done"),
    TeacherRequest(CHAT, ""),  # nothing to score: no request for it
    TeacherRequest("Bad text:", "lone \ud800 surrogate"),  # rejected here, the batch goes on
    TeacherRequest("x " * 40, "y " * 40, True),  # longer than the context: prompt cut, tail masked
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("served_teacher"), "mistral", seed=3, **VLLM_CPU_SHAPE)


@pytest.fixture(scope="module")
def server(teacher_dir, tmp_path_factory):
    with VLLMServer(
        teacher_dir,
        max_logprobs=8,
        max_model_len=MAX_LEN,
        api_key=KEY,
        log_path=tmp_path_factory.mktemp("server_log") / "server.log",
    ) as running:
        yield running


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def served(server, teacher_dir, **options) -> ServedTeacher:
    """The module's served teacher built as a run builds it: from a TeacherConfig (``options`` change fields)."""
    fields = {
        "model_name_or_path": str(teacher_dir),
        "backend": "server",
        "url": server.url,
        "served_model_name": SERVED_NAME,
        "api_key_env": KEY_ENV,
        "topk": TOPK,
        **options,
    }
    return build_teacher(TeacherConfig(**fields))


@pytest.fixture(scope="module")
def in_cluster(teacher_dir):
    teacher = VLLMTeacher(str(teacher_dir), topk=TOPK, max_len=MAX_LEN, **vllm_cpu_engine_kwargs())
    yield teacher
    teacher.close()


def assert_same_results(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.error == b.error
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_array_equal(a.logprobs, b.logprobs)  # NaN where masked, on both
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
        assert (a.num_masked, a.num_prompt_truncated) == (b.num_masked, b.num_prompt_truncated)


def test_served_teacher_equals_the_in_cluster_vllm_backend(server, teacher_dir, in_cluster, key_env):
    teacher = served(server, teacher_dir)
    assert isinstance(teacher, ServedTeacher) and teacher.max_len == MAX_LEN  # read from the server
    results, retries = teacher.score_counting_retries(REQUESTS)
    expected = in_cluster.score(REQUESTS)
    assert retries == 0 and teacher.last_call.failed == 0
    assert_same_results(results, expected)
    assert results[-1].num_prompt_truncated > 0 and results[4].error
    assert results[0].topk_ids.shape == (results[0].num_tokens, TOPK)
    assert teacher.last_call.bytes_received > 0 and len(teacher.last_call.request_seconds) == 4

    # A copy made by pickling (how a Ray actor receives it) calls the same server and gets the same.
    assert_same_results(pickle.loads(pickle.dumps(teacher)).score(REQUESTS), expected)
    assert KEY not in repr(teacher.client)

    prompts = [
        CHAT,
        "Once upon a time",
        {"content": "not a list of messages"},
    ]  # the last one is refused here
    for params in (GenerationParams(12, temperature=0), GenerationParams(12, temperature=1.0, seed=5)):
        got = teacher.generate(prompts, params)
        assert got[:2] == in_cluster.generate(prompts[:2], params)
        assert got[2].error and not got[2].text
    teacher.close()


def test_start_up_failures_say_what_to_change(server, teacher_dir, key_env, monkeypatch):
    def refused(**options) -> str:
        with pytest.raises(TeacherServerError) as caught:
            served(server, teacher_dir, **options)
        return str(caught.value)

    nobody = f"http://127.0.0.1:{free_port()}"
    assert "cannot be reached" in refused(url=nobody) and nobody in refused(url=nobody)
    message = refused(served_model_name="another-model")
    assert "does not serve 'another-model'" in message and SERVED_NAME in message
    message = refused(topk=16)
    assert "--max-logprobs 16" in message and "greater than max allowed: 8" in message
    other = load_packaged_tokenizer("gpt2")
    with pytest.raises(TeacherServerError, match="tokenises differently"):
        ServedTeacher([server.url], SERVED_NAME, other, topk=TOPK, api_key_env=KEY_ENV)
    assert "needs an API key" in refused(api_key_env=None)
    monkeypatch.setenv(KEY_ENV, "wrong")
    message = refused()
    assert f"refused the API key in ${KEY_ENV}" in message and "wrong" not in message
    monkeypatch.delenv(KEY_ENV)
    assert "not set in this process" in refused()

    with pytest.raises(GoldConfigError, match="needs --gold.teacher.url"):
        TeacherConfig(model_name_or_path="m", backend="server")
    with pytest.raises(GoldConfigError, match="add --gold.teacher.backend server"):
        TeacherConfig(model_name_or_path="m", backend="vllm", url=server.url)
    with pytest.raises(GoldConfigError, match="starts no replicas"):
        TeacherConfig(model_name_or_path="m", backend="server", url=server.url, num_replicas=2)


def test_a_server_killed_and_restarted_mid_call_gives_what_a_fresh_call_gives(server, teacher_dir, key_env):
    """A server gone for longer than the retry window: every request fails on its own, none is dropped. A server
    back within it: each request is retried with back-off until it answers, and the results equal a fresh scoring.
    (One restart serves both.)"""
    requests = [TeacherRequest(f"Prompt {i}:", f" response number {i} about the sea") for i in range(24)]
    teacher = served(server, teacher_dir, max_concurrency=2, retry_window_s=240.0)
    short = served(server, teacher_dir, retry_window_s=1.0)
    fresh = teacher.score(requests)
    got: dict[str, object] = {}

    def score_through_the_restart() -> None:
        got["results"], got["retries"] = teacher.score_counting_retries(requests * 4)

    server.stop()
    try:
        results, retries = short.score_counting_retries(requests[:3])
        assert [r.num_tokens for r in results] == [0, 0, 0] and retries > 0
        assert all("did not answer within 1 s" in r.error for r in results)
        assert short.last_call.failed == 3
        caller = threading.Thread(target=score_through_the_restart)
        caller.start()
        time.sleep(2.0)
        assert caller.is_alive()  # the call is waiting for the server
    finally:
        server.start()
    caller.join(timeout=300)
    assert not caller.is_alive()
    assert got["retries"] > 0 and teacher.last_call.failed == 0
    assert_same_results(got["results"], fresh * 4)


def test_dry_run_checks_the_served_teacher(server, teacher_dir, key_env, capsys):
    from gold_plugin import cli

    argv = (
        f"--actor.model_name_or_path {teacher_dir} --gold.teacher.model_name_or_path {teacher_dir} "
        f"--gold.teacher.backend server --gold.teacher.url {server.url} --gold.teacher.served_model_name "
        f"{SERVED_NAME} --gold.teacher.api_key_env {KEY_ENV} --gold.teacher.topk {TOPK} "
        "--data.prompt_dataset /nonexistent/prompts.jsonl --algo.kl.init_coef 0 --vllm.num_engines 1 --dry_run"
    ).split()
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"served at {server.url}; none started" in out  # the layout: no teacher replica, no GPU
    assert f"served teacher '{SERVED_NAME}' at {server.url}: reachable, context {MAX_LEN} tokens" in out
    argv[argv.index(SERVED_NAME)] = "another-model"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and "does not serve 'another-model'" in capsys.readouterr().err


def test_the_local_backend_trains_with_the_served_teacher_as_with_its_in_process_one(
    server, teacher_dir, key_env, tmp_path
):
    """One seeded step of the local backend: the served teacher's metrics equal the in-process hf teacher's on the
    same weights (their log-probs agree to about 1e-5), with no Ray started for the served one."""
    import ray

    from gold_plugin.local.cli import configs_from_args, parse_args
    from gold_plugin.local.launch import train

    ray.shutdown()  # a Ray left running in this process by an earlier test would hide one started here
    student = save_tiny_teacher(tmp_path / "student", "gpt2", seed=1, **VLLM_CPU_SHAPE)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(f'{{"input": "Tell me about the number {i}:"}}\n' for i in range(8)))
    common = (
        f"--actor.model_name_or_path {student} --gold.teacher.model_name_or_path {teacher_dir} "
        f"--data.prompt_dataset {data} --data.input_key input --rollout.batch_size 4 "
        "--rollout.n_samples_per_prompt 2 --rollout.max_new_tokens 8 --local.max_steps 1 --eval.steps 0 "
        f"--gold.signal both --gold.teacher.topk {TOPK} --gold.teacher.max_len {MAX_LEN - 1} --train.seed 0 "
        "--local.no_progress --local.device cpu"
    ).split()
    server_options = (
        f"--gold.teacher.backend server --gold.teacher.url {server.url} --gold.teacher.served_model_name "
        f"{SERVED_NAME} --gold.teacher.api_key_env {KEY_ENV} --gold.teacher.max_len {MAX_LEN}"
    ).split()
    [served_step] = [h for h in train(*configs_from_args(parse_args(common + server_options))) if "step" in h]
    assert not ray.is_initialized()
    [local_step] = [
        h
        for h in train(*configs_from_args(parse_args([*common, "--local.teacher_in_process"])))
        if "step" in h
    ]
    assert served_step["gold/teacher_failed"] == 0 and served_step["gold/aligned_token_share"] > 0.5
    for name in ("gold/sampled_kl", "gold/logit_loss", "gold/aligned_token_share"):
        assert served_step[name] == pytest.approx(local_step[name], rel=1e-3, abs=1e-4), name
