"""A bad prompt dataset stops a run at start with the file, the line and the fix, in both backends (no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gold_plugin.config import GoldConfigError
from gold_plugin.prompt_dataset import check_local_datasets, check_prompts, read_rows

REPO = Path(__file__).resolve().parents[1]
GOOD = [{"input": "1+2=", "label": "3"}, {"input": [{"role": "user", "content": "2+2="}], "label": "4"}]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "bad_line,message",
    [
        ('{"input": "3+4=", "label": "7"', "line 4: not JSON"),
        ('["a", "list"]', "line 4: a JSON list, not an object"),
        ('{"question": "3+4="}', "line 4: no 'input' key (its keys: ['question']). Set --data.input_key"),
        ('{"input": ""}', "line 4: 'input' is ''; a prompt is a non-empty string"),
        ('{"input": null}', "line 4: no 'input' key"),
    ],
)
def test_each_bad_row_is_named_by_its_line_with_the_fix(tmp_path, bad_line, message):
    path = _write(tmp_path / "p.jsonl", [json.dumps(GOOD[0]), "", json.dumps(GOOD[1]), bad_line])
    with pytest.raises(GoldConfigError) as error:
        check_local_datasets(f"{path},other/hub_dataset", "input")
    assert str(path) in str(error.value) and message in str(error.value)


def test_good_files_pass_and_only_local_files_are_read(tmp_path):
    jsonl = _write(tmp_path / "p.jsonl", [json.dumps(row) for row in GOOD])
    listed = tmp_path / "p.json"
    listed.write_text(json.dumps(GOOD))
    assert check_local_datasets(f"{jsonl}, {listed},org/hub_name,/cluster/only.jsonl", "input") == 2
    rows, lines = read_rows(str(jsonl), "data.prompt_dataset")
    assert rows == GOOD and lines == [1, 2]
    listed.write_text(json.dumps({"input": "x"}))
    with pytest.raises(GoldConfigError, match="must be a list of objects"):
        read_rows(str(listed), "data.prompt_dataset")
    with pytest.raises(GoldConfigError, match="row 2: no 'prompt' key"):
        check_prompts([{"prompt": "a"}, {"x": 1}], "hub/name", "prompt", "data.prompt_dataset")


@pytest.mark.parametrize("backend", ["openrlhf", "local"])
def test_both_launchers_stop_at_start_naming_the_line(tmp_path, backend):
    path = _write(tmp_path / "prompts.jsonl", [json.dumps(GOOD[0]), "{not json"])
    argv = [
        sys.executable, str(REPO / "launchers" / "train_gold.py"), "--backend", backend,
        "--actor.model_name_or_path", str(tmp_path / "student"),
        "--data.prompt_dataset", str(path), "--data.input_key", "input",
    ]  # fmt: skip
    if backend == "openrlhf":
        argv += ["--gold.teacher.model_name_or_path", str(tmp_path / "teacher"), "--dry_run"]
    else:
        argv += ["--gold.teacher.model_name_or_path", str(tmp_path / "teacher")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode != 0
    assert f"{path}, line 2: not JSON" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
