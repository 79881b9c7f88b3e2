"""The served teacher's HTTP client and answer parsing, against a scripted stand-in server (no vLLM).

The real ``vllm serve`` cannot be made to answer 503 or 400 on demand; a local ``http.server`` that replays a
script of answers can. ``tests/test_teacher_server.py`` runs the client against the real server.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from gold_plugin.teacher.server import (
    CallStats,
    RequestFailed,
    ServerClient,
    TeacherServerError,
    parse_served_prompt_logprobs,
)
from gold_plugin.testing.vllm_server import free_port


class ScriptedServer:
    """Answers each POST with the next ``(status, body)`` of ``script`` (the last one repeats); records the paths."""

    def __init__(self, script: list[tuple[int, dict]]):
        self.script, self.paths = list(script), []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers["Content-Length"]))
                owner.paths.append(self.path)
                status, body = owner.script.pop(0) if len(owner.script) > 1 else owner.script[0]
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    servers = []

    def make(script):
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


OK = (200, {"choices": [{"index": 0}]})


def test_busy_and_failing_answers_are_retried_with_back_off(scripted):
    server = scripted([(503, {"error": {"message": "busy"}}), (500, {}), OK])
    client = ServerClient([server.url], retry_window_s=30)
    stats = CallStats()
    assert client.post("/v1/completions", {}, 0, stats) == OK[1]
    assert stats.retries == 2 and len(server.paths) == 3 and stats.bytes_received > 0
    assert len(stats.request_seconds) == 1 and stats.request_seconds[0] >= 1.5  # waited 0.5 s, then 1 s


def test_a_refused_request_fails_alone_and_a_refused_key_stops(scripted):
    server = scripted([(400, {"error": {"message": "prompt too long"}})])
    client = ServerClient([server.url], retry_window_s=30)
    with pytest.raises(RequestFailed, match="answered 400: prompt too long"):
        client.post("/v1/completions", {}, 0, CallStats())
    assert len(server.paths) == 1  # not retried
    server.script = [(401, {"error": "Unauthorized"})]
    with pytest.raises(TeacherServerError, match="answered 401"):
        client.post("/v1/completions", {}, 0, CallStats())


def test_requests_fail_over_to_the_next_url_and_give_up_after_the_window(scripted):
    alive = scripted([OK])
    dead = f"http://127.0.0.1:{free_port()}"
    client = ServerClient([dead, alive.url], retry_window_s=30)
    stats = CallStats()
    assert client.post("/v1/completions", {}, 0, stats) == OK[1]  # request 0 starts on the dead URL
    assert stats.retries == 1
    assert (
        client.post("/v1/completions", {}, 1, stats) == OK[1] and stats.retries == 1
    )  # request 1 on the live one
    gone = ServerClient([dead], retry_window_s=1.0)
    with pytest.raises(RequestFailed, match="did not answer within 1 s"):
        gone.post("/v1/completions", {}, 0, CallStats())


def test_api_key_is_sent_but_never_shown(scripted):
    server = scripted([OK])
    client = ServerClient([server.url + "/v1/"], api_key="k-123")
    assert client.urls == [server.url] and "k-123" not in repr(client)
    assert client._http.headers["Authorization"] == "Bearer k-123"
    with pytest.raises(TeacherServerError, match="must start with http"):
        ServerClient(["127.0.0.1:8000"])


def entry(logprob: float, rank: int) -> dict:
    return {"logprob": logprob, "rank": rank, "decoded_token": "x"}


def test_served_prompt_logprobs_are_ranked_as_the_in_cluster_backend_ranks_them():
    input_ids = np.array([1, 7, 9])
    answer = [
        None,
        {"7": entry(-0.5, 1), "3": entry(-1.5, 2)},  # the scored token inside the top-2: 2 entries
        {
            "9": entry(-6.0, 40),
            "4": entry(-0.2, 1),
            "5": entry(-2.0, 2),
        },  # outside: k + 1 entries, itself first
    ]
    logprobs, top_ids, top_lp = parse_served_prompt_logprobs(answer, input_ids, np.array([1, 2]), topk=2)
    np.testing.assert_array_equal(logprobs, np.float32([-0.5, -6.0]))
    np.testing.assert_array_equal(top_ids, [[7, 3], [4, 5]])
    np.testing.assert_array_equal(top_lp, np.float32([[-0.5, -1.5], [-0.2, -2.0]]))
    assert parse_served_prompt_logprobs(answer, input_ids, np.array([2]), topk=0)[1] is None
    with pytest.raises(RequestFailed, match="for 2 positions, expected 3"):
        parse_served_prompt_logprobs(answer[:2], input_ids, np.array([1]), topk=2)
    with pytest.raises(RequestFailed, match="do not include the prompt token 9"):
        parse_served_prompt_logprobs([None, answer[1], answer[1]], input_ids, np.array([2]), topk=2)


def test_an_unreadable_answer_fails_its_sample_only(scripted):
    from gold_plugin.packaged_tokenizers import load_packaged_tokenizer
    from gold_plugin.teacher import ServedTeacher, TeacherRequest
    from gold_plugin.teacher.prepare import RequestEncoder

    server = scripted([(200, {"choices": []})])
    teacher = ServedTeacher([server.url], "m", load_packaged_tokenizer("gpt2"), topk=2, check=False)
    teacher.encoder = RequestEncoder(teacher.tokenizer, 63)  # what check() sets from the server's context
    results, retries = teacher.score_counting_retries(
        [TeacherRequest("A prompt", " a response"), TeacherRequest("B", "")]
    )
    assert "unreadable answer" in results[0].error and results[0].num_tokens == 0
    assert results[1].error is None and retries == 0 and teacher.last_call.failed == 1
