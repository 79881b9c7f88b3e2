"""A teacher that is already served: vLLM's OpenAI-compatible server (``vllm serve``), reached over HTTP.

The plugin renders and tokenises every request with the teacher's own tokenizer and chat template, exactly as the
in-cluster backends do (:class:`~gold_plugin.teacher.prepare.RequestEncoder`), sends the token ids as the prompt of
a ``/v1/completions`` request with ``max_tokens=1`` and ``prompt_logprobs=k``, and reads the response tokens'
log-probs and top-k from the answer: the same :class:`~gold_plugin.teacher.types.TeacherResult` as
:class:`~gold_plugin.teacher.vllm_backend.VLLMTeacher` gives on the same engine. Teacher-written completions
(``--gold.off_policy_source teacher``) go through the same server.

At start :meth:`ServedTeacher.check` asks every URL for its models, and probes the top-k and the tokenizer; each
failure raises :class:`TeacherServerError` saying what to change. In a run, requests are spread over the URLs with
at most ``max_concurrency`` in flight; a connection error, a timeout, a 429 or a 5xx answer is retried with
back-off on the next URL for up to ``retry_window_s``; a request that still fails gets ``TeacherResult.error`` (the
sample trains without signal, the trainers count it and stop a run without any signal; docs/teacher.md, "A served
teacher"). The API key is read from the environment variable that ``api_key_env`` names and is never logged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from gold_plugin.teacher.generation import (
    GenerationParams,
    Prompt,
    TeacherGeneration,
    finish,
    prepare_prompts,
    stop_ids,
)
from gold_plugin.teacher.prepare import PreparedSequence, RequestEncoder, build_result
from gold_plugin.teacher.types import TeacherError, TeacherRequest, TeacherResult, TeacherScorer, filled
from gold_plugin.teacher.vllm_backend import parse_position_dicts

if TYPE_CHECKING:
    import httpx

    from gold_plugin.alignment.types import ChatTokenizer
    from gold_plugin.config import TeacherConfig

logger = logging.getLogger(__name__)

RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP answers that are retried (the server busy, restarting or behind a failing proxy)."""

TOKENIZER_PROBE = "Probe: 12 + 30 = 42. Café naïve, 東京 😀 — done."
"""Text that the local tokenizer and the server's must split into the same ids (digits, accents, CJK, emoji)."""


class TeacherServerError(TeacherError):
    """The served teacher cannot be used as configured (unreachable, another model, too few log-probs, another
    tokenizer, a refused key); the message says what to change."""


class RequestFailed(Exception):
    """One request failed for good (a 4xx answer, or retries ran out); the sample gets this as its error."""


@dataclasses.dataclass
class CallStats:
    """What the last :meth:`ServedTeacher.score` or ``generate`` call cost."""

    retries: int = 0
    """Requests re-sent after a connection error, a timeout, a 429 or a 5xx."""
    failed: int = 0
    """Requests sent that still failed (their samples carry the error)."""
    bytes_received: int = 0
    """Answer bodies' bytes (what came over the wire)."""
    request_seconds: list[float] = dataclasses.field(default_factory=list)
    """Each request's latency, retries included."""


class ServerClient:
    """JSON over HTTP to one or several base URLs of one server deployment, with retries and failover.

    ``urls``: base URLs (``http://host:8000`` or ``http://host:8000/v1``). Request ``i`` of a call starts on URL
    ``i mod n`` and each retry moves to the next URL.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        retry_window_s: float = 300.0,
        max_concurrency: int = 16,
    ) -> None:
        import httpx

        if not urls:
            raise TeacherServerError("Give the served teacher's URL: --gold.teacher.url http://host:8000.")
        self._options = {
            "urls": list(urls),
            "api_key": api_key,
            "timeout_s": timeout_s,
            "retry_window_s": retry_window_s,
            "max_concurrency": max_concurrency,
        }
        self.urls = [_base_url(url) for url in urls]
        self.retry_window_s = float(retry_window_s)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        self._http = httpx.Client(headers=headers, timeout=timeout_s, limits=limits)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="gold-teacher-http")
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never the headers: they hold the key
        return f"ServerClient(urls={self.urls})"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its options (a Ray actor that calls the teacher rebuilds the connections)."""
        return (_rebuild_client, (self._options,))

    def get_once(self, url: str, path: str) -> httpx.Response:
        """One GET, not retried (the start-up checks report each failure as it is)."""
        return self._http.get(url + path)

    def post_once(self, url: str, path: str, payload: dict[str, Any]) -> httpx.Response:
        """One POST, not retried."""
        return self._http.post(url + path, json=payload)

    def post(self, path: str, payload: dict[str, Any], first_url: int, stats: CallStats) -> dict[str, Any]:
        """The JSON answer of ``payload`` posted to ``path``; retried as the class says. Raises
        :class:`RequestFailed` (this request only) or :class:`TeacherServerError` (401/403/404: every request
        would fail)."""
        import httpx

        start = time.monotonic()
        attempt = 0
        while True:
            url = self.urls[(first_url + attempt) % len(self.urls)]
            try:
                answer = self._http.post(url + path, json=payload)
            except httpx.TransportError as exc:  # refused, reset, timed out
                problem = f"{url}: {type(exc).__name__}: {exc}"
            else:
                if answer.status_code == 200:
                    with self._lock:
                        stats.bytes_received += len(answer.content)
                        stats.request_seconds.append(time.monotonic() - start)
                    return answer.json()
                message = error_message(answer)
                if answer.status_code in (401, 403, 404):
                    raise TeacherServerError(
                        f"The served teacher at {url} answered {answer.status_code}: {message}"
                    )
                if answer.status_code not in RETRIED_STATUS:
                    raise RequestFailed(f"the served teacher answered {answer.status_code}: {message}")
                problem = f"{url}: {answer.status_code}: {message}"
            waited = time.monotonic() - start
            if waited >= self.retry_window_s:
                raise RequestFailed(
                    f"the served teacher did not answer within {self.retry_window_s:.0f} s "
                    f"({attempt + 1} attempts; last: {problem})"
                )
            delay = min(8.0, 0.5 * 2**attempt, self.retry_window_s - waited)
            logger.warning("Teacher request failed (%s); retrying in %.1f s.", problem, delay)
            with self._lock:
                stats.retries += 1
            time.sleep(delay)
            attempt += 1

    def map(self, function: Any, items: Sequence[Any]) -> list[Any]:
        """``function(i, item)`` for every item, at most ``max_concurrency`` at once, results in order."""
        return list(self._pool.map(function, range(len(items)), items))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()


def _rebuild_client(options: dict[str, Any]) -> ServerClient:
    options = dict(options)
    urls = options.pop("urls")
    return ServerClient(urls, **options)


def _base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise TeacherServerError(f"--gold.teacher.url must start with http:// or https://, got {url!r}.")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def error_message(answer: httpx.Response) -> str:
    """The server's own error text (vLLM: ``{"error": {"message": ...}}``), else the body's start."""
    try:
        body = answer.json()
    except ValueError:
        return answer.text[:300]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error if error is not None else body)[:300]


def read_api_key(variable: str | None) -> str | None:
    """The key in environment variable ``variable`` (None when no variable is named)."""
    if not variable:
        return None
    key = os.environ.get(variable)
    if not key:
        raise TeacherServerError(
            f"--gold.teacher.api_key_env names the environment variable {variable}, which is not set in this "
            "process: export it where the job runs (the key never goes on the command line)."
        )
    return key


class ServedTeacher(TeacherScorer):
    """Scores (and generates) with a teacher served by vLLM's OpenAI-compatible server.

    Args:
        urls: the server's base URLs (one deployment: every URL serves the same model).
        served_model_name: the name the server serves the teacher under (its ``--served-model-name``).
        tokenizer: the teacher's tokenizer (or where to load it): the plugin tokenises with it.
        topk: top-k log-probs per response position (the server's ``--max-logprobs`` must allow it).
        max_len: teacher context; default and upper bound: the server's ``max_model_len``.
        api_key_env: environment variable that holds the server's API key.
        max_concurrency, request_timeout_s, retry_window_s: see :class:`ServerClient`.
        check: run :meth:`check` now (the default).
    """

    def __init__(
        self,
        urls: Sequence[str],
        served_model_name: str,
        tokenizer: ChatTokenizer | str,
        *,
        topk: int = 0,
        max_len: int | None = None,
        api_key_env: str | None = None,
        max_concurrency: int = 16,
        request_timeout_s: float = 600.0,
        retry_window_s: float = 300.0,
        end_of_turn_token: str | None = None,
        check: bool = True,
    ) -> None:
        from gold_plugin.teacher.tokenizer import load_tokenizer

        if topk < 0:
            raise ValueError(f"topk must be >= 0, got {topk}.")
        self.topk = int(topk)
        self.served_model_name = served_model_name
        self._tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.client = ServerClient(
            urls,
            api_key=read_api_key(api_key_env),
            timeout_s=request_timeout_s,
            retry_window_s=retry_window_s,
            max_concurrency=max_concurrency,
        )
        self._api_key_env = api_key_env
        self._asked_max_len = max_len
        self._end_of_turn_token = end_of_turn_token
        self.last_call = CallStats()
        self.max_len: int | None = None
        self.encoder: RequestEncoder | None = None
        if check:
            self.check()

    @classmethod
    def from_config(cls, config: TeacherConfig, **overrides: Any) -> ServedTeacher:
        """The teacher that ``config`` (``backend="server"``) describes."""
        from gold_plugin.teacher.tokenizer import teacher_tokenizer_source

        kwargs: dict[str, Any] = {
            "urls": config.urls,
            "served_model_name": config.served_model_name or config.model_name_or_path,
            "tokenizer": teacher_tokenizer_source(config),
            "topk": config.topk or 0,
            "max_len": config.max_len,
            "api_key_env": config.api_key_env,
            "max_concurrency": config.max_concurrency,
            "request_timeout_s": config.request_timeout_s,
            "retry_window_s": config.retry_window_s,
        }
        return cls(**{**kwargs, **overrides})

    @property
    def tokenizer(self) -> ChatTokenizer:
        return self._tokenizer

    # -- start-up checks ----------------------------------------------------------------------------
    def check(self) -> None:
        """Every URL reachable, serving ``served_model_name`` with a context of 2 tokens or more, allowing
        ``topk`` prompt log-probs, and splitting :data:`TOKENIZER_PROBE` into the local tokenizer's ids; sets
        :attr:`max_len` from the server's ``max_model_len``. Raises :class:`TeacherServerError` naming the URL
        and what to change."""
        import httpx

        server_lens = []
        for url in self.client.urls:
            try:
                answer = self.client.get_once(url, "/v1/models")
            except httpx.TransportError as exc:
                raise TeacherServerError(
                    f"The served teacher at {url} cannot be reached ({type(exc).__name__}: {exc}). Start it "
                    "(vllm serve MODEL --host 0.0.0.0 --port PORT ...) or fix --gold.teacher.url."
                ) from exc
            if answer.status_code == 401:
                raise TeacherServerError(self._key_refused(url))
            if answer.status_code != 200:
                raise TeacherServerError(
                    f"The served teacher at {url} answered {answer.status_code} to GET /v1/models "
                    f"({error_message(answer)}): is it vLLM's OpenAI-compatible server?"
                )
            models = {m.get("id"): m for m in answer.json().get("data", [])}
            if self.served_model_name not in models:
                raise TeacherServerError(
                    f"The server at {url} does not serve {self.served_model_name!r}; it serves {sorted(models)}. "
                    "Set --gold.teacher.served_model_name to one of them (the server's --served-model-name)."
                )
            server_lens.append(int(models[self.served_model_name].get("max_model_len") or 0))
        server_len = min(server_lens)
        if server_len and self._asked_max_len and self._asked_max_len > server_len:
            logger.warning(
                "--gold.teacher.max_len %d is more than the server's max_model_len %d: using %d.",
                self._asked_max_len,
                server_len,
                server_len,
            )
        limits = [length for length in (server_len, self._asked_max_len) if length]
        if not limits:
            raise TeacherServerError(
                "The server does not say its max_model_len: set --gold.teacher.max_len to the teacher's context."
            )
        self.max_len = min(limits)
        # vLLM keeps one slot for the token it generates (max_tokens=1).
        self.encoder = RequestEncoder(self._tokenizer, self.max_len - 1, self._end_of_turn_token)
        for url in self.client.urls:
            self._check_logprobs(url)
            self._check_tokenizer(url)

    def _key_refused(self, url: str) -> str:
        if self._api_key_env:
            return (
                f"The served teacher at {url} refused the API key in ${self._api_key_env} (401): set it to the "
                "server's --api-key."
            )
        return (
            f"The served teacher at {url} needs an API key (401): put it in an environment variable and name "
            "that variable with --gold.teacher.api_key_env."
        )

    def _check_logprobs(self, url: str) -> None:
        probe_ids = self._tokenizer.encode("a b", add_special_tokens=False)[:2] or [0, 0]
        payload = self._scoring_payload(np.asarray([probe_ids[0], *probe_ids], dtype=np.int64))
        answer = self.client.post_once(url, "/v1/completions", payload)
        if answer.status_code == 200:
            return
        message = error_message(answer)
        if "max allowed" in message or "logprobs" in message:
            raise TeacherServerError(
                f"The served teacher at {url} refuses {self.topk} prompt log-probs ({message}). Start the server "
                f"with --max-logprobs {self.topk} or more, or lower --gold.teacher.topk."
            )
        raise TeacherServerError(
            f"The served teacher at {url} failed a scoring probe ({answer.status_code}): {message}"
        )

    def _check_tokenizer(self, url: str) -> None:
        payload = {"model": self.served_model_name, "prompt": TOKENIZER_PROBE, "add_special_tokens": False}
        answer = self.client.post_once(url, "/tokenize", payload)
        if answer.status_code == 404:
            logger.warning(
                "The server at %s has no /tokenize endpoint: the teacher's tokenizer was not compared with the "
                "server's.",
                url,
            )
            return
        if answer.status_code != 200:
            raise TeacherServerError(
                f"The served teacher at {url} failed the tokenizer probe ({answer.status_code}): {error_message(answer)}"
            )
        served = [int(t) for t in answer.json().get("tokens", [])]
        local = [int(t) for t in self._tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)]
        if served != local:
            raise TeacherServerError(
                f"The server at {url} tokenises differently from the teacher tokenizer loaded here "
                f"({getattr(self._tokenizer, 'name_or_path', '?')}): a probe gave {served[:12]} there and "
                f"{local[:12]} here. Point --gold.teacher.tokenizer_name_or_path (or model_name_or_path) at the "
                "served model's tokenizer."
            )

    # -- scoring ------------------------------------------------------------------------------------
    def _scoring_payload(self, input_ids: np.ndarray) -> dict[str, Any]:
        return {
            "model": self.served_model_name,
            "prompt": input_ids.tolist(),
            "max_tokens": 1,
            "temperature": 1.0,
            "prompt_logprobs": self.topk,
            "add_special_tokens": False,
        }

    def _ready_encoder(self) -> RequestEncoder:
        if self.encoder is None:
            self.check()
        assert self.encoder is not None
        return self.encoder

    def score(self, requests: Sequence[TeacherRequest]) -> list[TeacherResult]:
        return self.score_counting_retries(requests)[0]

    def score_counting_retries(self, requests: Sequence[TeacherRequest]) -> tuple[list[TeacherResult], int]:
        """One result per request, in order, and the requests re-sent (:attr:`last_call` has the rest)."""
        results, todo, sequences = self._ready_encoder().partition(requests, self.topk)
        stats = CallStats()

        def score_one(index: int, seq: PreparedSequence) -> TeacherResult:
            try:
                answer = self.client.post(
                    "/v1/completions", self._scoring_payload(seq.input_ids), index, stats
                )
                choice = answer["choices"][0]
                positions = seq.prompt_len + np.arange(seq.first_scored, seq.num_fed)
                scores = parse_served_prompt_logprobs(
                    choice.get("prompt_logprobs"), seq.input_ids, positions, self.topk
                )
            except RequestFailed as exc:
                return TeacherResult.failed(str(exc), self.topk)
            except (
                KeyError,
                IndexError,
                TypeError,
                ValueError,
            ) as exc:  # a 200 answer without the expected fields
                return TeacherResult.failed(f"unreadable answer from the served teacher: {exc!r}", self.topk)
            return build_result(seq, self.topk, *scores)

        scored = self.client.map(score_one, sequences)
        for index, result in zip(todo, scored):
            results[index] = result
        stats.failed = sum(result.error is not None for result in scored)
        self.last_call = stats
        return filled(results), stats.retries

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[TeacherGeneration]:
        return self.generate_counting_retries(prompts, params)[0]

    def generate_counting_retries(
        self, prompts: Sequence[Prompt], params: GenerationParams
    ) -> tuple[list[TeacherGeneration], int]:
        """One completion per prompt, in order, as :meth:`VLLMTeacher.generate` gives on the same engine (prompt i
        seeded by ``params.seed + i``, greedy at temperature 0); and the requests re-sent."""
        encoder = self._ready_encoder()
        prepared = prepare_prompts(encoder, prompts, params.max_new_tokens)
        stops = stop_ids(encoder)
        stats = CallStats()

        def generate_one(index: int, item: Any) -> TeacherGeneration:
            if isinstance(item, str):
                return TeacherGeneration("", False, error=item)
            payload = {
                "model": self.served_model_name,
                "prompt": item.input_ids.tolist(),
                "max_tokens": item.max_new_tokens,
                "temperature": float(params.temperature),
                "top_p": 1.0 if params.greedy else float(params.top_p),
                "seed": int(params.seed) + index,
                "stop_token_ids": stops,
                "return_token_ids": True,
                "add_special_tokens": False,
            }
            try:
                choice = self.client.post("/v1/completions", payload, index, stats)["choices"][0]
            except RequestFailed as exc:
                return TeacherGeneration("", False, error=str(exc))
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                return TeacherGeneration(
                    "", False, error=f"unreadable answer from the served teacher: {exc!r}"
                )
            generation = finish(self._tokenizer, choice.get("token_ids") or [], stops, item.max_new_tokens)
            if not generation.finished and choice.get("finish_reason") == "stop":  # stop token left out
                generation = dataclasses.replace(generation, finished=True)
            return generation

        out = self.client.map(generate_one, prepared)
        stats.failed = sum(g.error is not None and not isinstance(p, str) for g, p in zip(out, prepared))
        self.last_call = stats
        return out, stats.retries

    def close(self) -> None:
        self.client.close()


def parse_served_prompt_logprobs(
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None,
    input_ids: np.ndarray,
    positions: np.ndarray,
    topk: int,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Log-probs of ``input_ids[positions]`` and the top-k there from a served answer's ``prompt_logprobs``
    (per prompt position ``{"<token id>": {"logprob", "rank", ...}}``, entry 0 null), ranked as the in-cluster
    backend ranks them. Raises :class:`RequestFailed` if the answer does not hold them."""
    if prompt_logprobs is None or len(prompt_logprobs) != len(input_ids):
        got = None if prompt_logprobs is None else len(prompt_logprobs)
        raise RequestFailed(
            f"the served teacher returned prompt log-probs for {got} positions, expected {len(input_ids)}"
        )
    positions = np.asarray(positions, dtype=np.int64)
    targets = np.asarray(input_ids, dtype=np.int64)[positions]
    wanted = set(positions.tolist())
    by_id = [
        {int(token): entry for token, entry in entries.items()} if pos in wanted and entries else None
        for pos, entries in enumerate(prompt_logprobs)
    ]
    try:
        return parse_position_dicts(by_id, targets, positions, topk, lambda e: (e["logprob"], e.get("rank")))
    except TeacherError as exc:
        raise RequestFailed(str(exc)) from exc


__all__ = [
    "CallStats",
    "RequestFailed",
    "ServedTeacher",
    "ServerClient",
    "TeacherServerError",
    "parse_served_prompt_logprobs",
]
