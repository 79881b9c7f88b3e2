"""The alignment inspector (``python -m gold_plugin.alignment``) on real tokenizers."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gold_plugin.alignment.inspector import dataset_stats, main, read_jsonl_texts
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer, tokenizer_dir

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "data" / "responses.jsonl"


def run(*args: str) -> str:
    out = io.StringIO()
    assert main(list(args), out=out) == 0
    return out.getvalue()


def test_text_mode_prints_groups_side_by_side():
    text = run("--student", "mistral", "--teacher", "qwen", "--text", " Hello 你好 123")
    lines = text.splitlines()
    assert any("'▁Hello'" in line and "'ĠHello'" in line and "1:1" in line for line in lines)
    # Qwen merges 你好 into one token, Mistral has one piece per character: a 2:1 group.
    assert any("'你' '好'" in line and "2:1" in line for line in lines)
    assert any("eos" in line and "'</s>'" in line and "'<|im_end|>'" in line for line in lines)
    assert "by canonical bytes" in text and "by exact string" in text


def test_text_mode_accepts_tokenizer_folders_and_shows_masked_eos():
    text = run(
        "--student", str(tokenizer_dir("gpt2")), "--teacher", str(tokenizer_dir("mistral")), "--text", "a\tb",
        "--no_eos_pair",
    )  # fmt: skip
    assert "masked" in text and "'<|endoftext|>'" in text and "'</s>'" in text


def test_dataset_mode_reports_statistics():
    report = run("--student", "gpt2", "--teacher", "mistral", "--dataset", str(EXAMPLE))
    assert "samples: 20, unalignable: 0 (0.0%)" in report
    assert "1:1 groups:" in report and "mean tokens per group: student" in report


def test_dataset_statistics_are_consistent():
    gpt2, qwen = load_packaged_tokenizer("gpt2"), load_packaged_tokenizer("qwen")
    texts = read_jsonl_texts(str(EXAMPLE), "text")
    same = dataset_stats(qwen, qwen, texts)
    assert same.one_to_one_share == 1.0 and same.unalignable == 0
    assert same.student_tokens_in_groups == same.teacher_tokens_in_groups == same.groups
    cross = dataset_stats(qwen, gpt2, texts)
    assert 0.3 < cross.one_to_one_share < 1.0
    assert cross.student_tokens_in_groups >= cross.groups and cross.teacher_tokens_in_groups >= cross.groups


def test_dataset_with_a_missing_key_names_it(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(KeyError, match="no key 'text'.*--text_key"):
        run("--student", "gpt2", "--teacher", "qwen", "--dataset", str(path))
    assert "samples: 1" in run(
        "--student", "gpt2", "--teacher", "qwen", "--dataset", str(path), "--text_key", "prompt"
    )


def test_module_entry_point():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gold_plugin.alignment",
            "--student",
            "gpt2",
            "--teacher",
            "mistral",
            "--text",
            "Hi!",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "groups:" in result.stdout and "'ĠHi'" not in result.stdout and "'Hi'" in result.stdout
