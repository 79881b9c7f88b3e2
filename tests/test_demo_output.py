"""The demo's output contract (no training): the table, the plot's path and nothing else; the plot written next to
the table; the silencing and the pinning last only as long as the demo."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gold_plugin.demo import environment, prepare, report, run
from gold_plugin.local import launch
from gold_plugin.local.cli import main

HISTORY = [
    {"step": 0, "eval/accuracy": 0.2},
    {"step": 1, "gold/sampled_kl": 3.0},
    {"step": 2, "eval/accuracy": 0.35, "gold/sampled_kl": 2.0},
    {"step": 4, "eval/accuracy": 0.5, "gold/sampled_kl": 1.0},
]
TABLE = [
    "| model                                                            | held-out accuracy |",
    "|------------------------------------------------------------------|-------------------|",
    "| student before GOLD (brief SFT; its tokenizer merges digit runs) |             0.200 |",
    "| student after GOLD (4 steps)                                     |             0.500 |",
    "| teacher (single-digit tokenizer)                                 |             0.900 |",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_prints_the_table_and_the_plot_path_only(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    with environment.quiet():  # as the demo runs it
        figures = report.report(HISTORY, 0.9, tmp_path)
    out, err = capsys.readouterr()
    plot = tmp_path / report.PLOT_NAME
    assert out.splitlines() == [*TABLE, f"Held-out accuracy per evaluation: {plot}"]
    assert err == ""
    assert figures == {"before": 0.2, "after": 0.5, "teacher": 0.9}
    assert (tmp_path / report.TABLE_NAME).read_text() == "\n".join(TABLE) + "\n"
    data = plot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000  # a drawn figure, not an empty canvas

    from matplotlib.image import imread

    height, width, _ = imread(plot).shape
    assert (width, height) == (768, 504)  # 6.4 x 4.2 inches at 120 dpi


def test_report_without_matplotlib_says_so_instead_of_a_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)  # import -> ImportError
    report.report(HISTORY, 0.9, tmp_path)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == TABLE
    assert lines[-1] == "No plot: matplotlib is not installed (pip install matplotlib)."
    assert not (tmp_path / report.PLOT_NAME).exists()


def test_report_refuses_a_history_without_evaluations(tmp_path):
    with pytest.raises(ValueError, match="no held-out accuracy"):
        report.report([{"step": 1, "gold/sampled_kl": 3.0}], 0.9, tmp_path)


def test_quiet_silences_logs_warnings_and_bars_only_inside(monkeypatch):
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    noisy = logging.getLogger("DeepSpeed")  # sets its own level and handler; silenced all the same
    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    try:
        with pytest.raises(RuntimeError, match="inside"), environment.quiet():
            assert not noisy.isEnabledFor(logging.WARNING)
            assert noisy.isEnabledFor(logging.ERROR)
            assert hf_logging.get_verbosity() == logging.ERROR
            assert not hf_logging.is_progress_bar_enabled() and hub_utils.are_progress_bars_disabled()
            assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
            with warnings.catch_warnings(record=True) as inside:
                warnings.warn("hidden", FutureWarning, stacklevel=1)
            assert inside == []  # the demo's filter wins over the caller's "record everything"
            raise RuntimeError("inside")  # restored on the way out of a failing demo too
        assert noisy.isEnabledFor(logging.WARNING)
        assert hf_logging.get_verbosity() == logging.INFO
        assert hf_logging.is_progress_bar_enabled() and not hub_utils.are_progress_bars_disabled()
        assert "TOKENIZERS_PARALLELISM" not in os.environ
        with pytest.warns(FutureWarning, match="shown"):
            warnings.warn("shown", FutureWarning, stacklevel=1)
    finally:
        hf_logging.set_verbosity_warning()


def test_quiet_keeps_what_the_caller_set(monkeypatch):
    import huggingface_hub.utils as hub_utils

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    hub_utils.disable_progress_bars()
    try:
        with environment.quiet():
            assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
        assert hub_utils.are_progress_bars_disabled()
    finally:
        hub_utils.enable_progress_bars()


def test_pinned_fixes_threads_seeds_determinism_and_restores_them(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    assert not torch.are_deterministic_algorithms_enabled()
    with environment.pinned(seed=7, num_threads=1):
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert torch.are_deterministic_algorithms_enabled()
        drawn = torch.rand(3)
    with environment.pinned(seed=7, num_threads=1):
        assert torch.equal(torch.rand(3), drawn)
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()
    assert "OMP_NUM_THREADS" not in os.environ


@pytest.fixture
def fake_demo(monkeypatch):
    """The demo without models or training: data files, and a ``train`` that records how it was called."""
    seen: dict[str, object] = {}

    def fake_prepare(run_dir, **kwargs):
        seen["prepare"] = kwargs
        teacher, student, train_data, eval_data = prepare.model_paths(run_dir)
        for path in (train_data, eval_data):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"input": "12+34=", "label": "64"}) + "\n")
        return prepare.DemoModels(Path(run_dir), teacher, student, train_data, eval_data, 0.9, 0.2)

    def train(config, gold, *, quiet=False):
        seen.update(quiet=quiet, progress=config.progress, threads=torch.get_num_threads())
        seen["deterministic"] = torch.are_deterministic_algorithms_enabled()
        logging.getLogger("ray").warning("a Ray warning the demo must not show")
        logging.getLogger("some.library").warning("nor a library's")
        warnings.warn("a warning the demo must not show", UserWarning, stacklevel=1)
        return HISTORY

    monkeypatch.setattr(run, "prepare_models", fake_prepare)
    monkeypatch.setattr(launch, "train", train)
    return seen


def test_the_demo_prints_the_table_and_the_plot_path(tmp_path, fake_demo, capsys, caplog):
    pytest.importorskip("matplotlib")
    threads = torch.get_num_threads()
    assert main(["--demo", "--local.run_dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [*TABLE, f"Held-out accuracy per evaluation: {tmp_path / report.PLOT_NAME}"]
    assert err == "" and caplog.records == []  # no log record was even made
    logging.getLogger("some.library").warning("after the demo")
    assert [r.getMessage() for r in caplog.records] == ["after the demo"]
    # One progress bar (the trainer's), the models' SFT bars passing, the Ray teacher's output kept out.
    assert fake_demo["progress"] and fake_demo["prepare"] == {"progress": True} and fake_demo["quiet"]
    assert fake_demo["threads"] == 1 and fake_demo["deterministic"]
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()


def test_the_demo_trains_with_the_threads_given(tmp_path, fake_demo, capsys):
    assert main(["--demo", "--local.run_dir", str(tmp_path), "--local.num_threads", "2"]) == 0
    assert fake_demo["threads"] == 2


def test_ray_teacher_keeps_the_replicas_output_out_when_quiet(monkeypatch):
    import ray

    import gold_plugin.teacher

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(
        gold_plugin.teacher, "TeacherGroup", lambda teacher, scorer_overrides: SimpleNamespace(topk=0)
    )
    launch.RayTeacher(None, "cpu", quiet=True)
    launch.RayTeacher(None, "cpu")
    assert [c["log_to_driver"] for c in calls] == [False, True]
