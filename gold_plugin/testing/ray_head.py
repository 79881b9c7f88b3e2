"""A throw-away local Ray head with fake GPUs, and the tiny models and prompts the CPU end-to-end jobs use.

Test and benchmark scaffolding (``tests/test_openrlhf_e2e.py``, ``benchmarks/bench_openrlhf_overhead.py``): jobs go
to the head through ``ray job submit`` exactly as on a cluster; the fake GPUs only make OpenRLHF's placement
groups resolve (:mod:`gold_plugin.testing.openrlhf_cpu` keeps every process on the CPU).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
AGENT_PORT_OPTIONS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)
BIN_DIR = str(Path(sys.executable).parent)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_env() -> dict[str, str]:
    """This process's environment with this Python's ``ray`` first on PATH (the examples call ``ray job submit``)."""
    return {**os.environ, "PATH": f"{BIN_DIR}:{os.environ['PATH']}"}


def countdown_prompts(path: Path, count: int) -> Path:
    """``count`` Countdown prompts in the examples' dataset format (``examples/prepare_countdown.py``)."""
    spec = importlib.util.spec_from_file_location(
        "prepare_countdown", REPO / "examples" / "prepare_countdown.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with path.open("w") as out:
        for i in range(count):
            out.write(json.dumps(module.countdown_record(10 + i, [i % 5 + 1, i % 3 + 2, 7])) + "\n")
    return path


def _wait_for_job_agent(address: str, env: dict[str, str], timeout_s: float) -> None:
    """`ray start` returns before the head's job agent accepts submissions ("No available agent to submit job")."""
    deadline = time.time() + timeout_s
    while True:
        probe = subprocess.run(
            [f"{BIN_DIR}/ray", "job", "submit", f"--address={address}", "--", "python3", "-c", "pass"],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if probe.returncode == 0:
            return
        if time.time() > deadline:
            raise RuntimeError(f"the Ray head's job agent never came up:\n{probe.stdout[-3000:]}")
        time.sleep(3)


@contextmanager
def local_ray_head(num_cpus: int = 16, num_gpus: int = 4, agent_timeout_s: float = 180) -> Iterator[str]:
    """Start a Ray head on free ports with a temp dir of its own, wait until it accepts jobs, yield its
    job-submission address; stop it after.

    Only this head's processes are stopped (``ray stop`` would stop every Ray instance on the machine, such as the
    local Ray of a test running beside this one)."""
    env = job_env()
    dashboard = _free_port()
    gcs_port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-head-", dir="/tmp")  # short: Ray puts its sockets under it
    try:
        subprocess.run(
            [f"{BIN_DIR}/ray", "start", "--head", f"--port={gcs_port}", f"--dashboard-port={dashboard}",
             "--dashboard-host=127.0.0.1", f"--ray-client-server-port={_free_port()}", f"--num-cpus={num_cpus}",
             f"--num-gpus={num_gpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
             # every port of its own: another Ray on this machine (a test's ray.init) holds the default ones
             *(f"--{option}={_free_port()}" for option in AGENT_PORT_OPTIONS)],
            check=True, env=env, capture_output=True, timeout=300,
        )  # fmt: skip
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_job_agent(address, env, agent_timeout_s)
        yield address
    finally:
        _kill_head(temp_dir, gcs_port)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_head(temp_dir: str, gcs_port: int) -> None:
    """SIGKILL the processes whose command line names the head's ``temp_dir`` (its GCS, raylet, dashboard and
    workers) or its GCS port (its client server), and everything they started (jobs' drivers, vLLM engine
    processes), as ``ray stop --force`` does to every Ray instance."""
    import psutil

    port = re.compile(rf":{gcs_port}(?!\d)")

    def of_this_head(cmdline: list[str] | None) -> bool:
        text = " ".join(cmdline or ())
        return temp_dir in text or bool(port.search(text))

    own = [p for p in psutil.process_iter(["cmdline"]) if of_this_head(p.info["cmdline"])]
    victims = {p.pid: p for p in own}
    for process in own:
        with contextlib.suppress(psutil.Error):
            victims.update({child.pid: child for child in process.children(recursive=True)})
    for process in victims.values():
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(list(victims.values()), timeout=60)


def tensorboard_scalars(run_root: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the newest tensorboard run under ``run_root``: ``{tag: {step: value}}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted(run_root.iterdir()) if run_root.exists() else []
    if not runs:
        raise FileNotFoundError(f"no tensorboard run under {run_root}")
    events = EventAccumulator(str(runs[-1]), size_guidance={"scalars": 0})  # 0: keep every step
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
