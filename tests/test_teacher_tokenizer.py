"""The one teacher-tokenizer loader: which path it reads, that it trusts remote code, and its error."""

from __future__ import annotations

import pytest

from gold_plugin.config import GoldConfigError, TeacherConfig
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer
from gold_plugin.teacher.tokenizer import load_teacher_tokenizer, load_tokenizer, teacher_tokenizer_source


def test_source_prefers_the_tokenizer_path():
    assert teacher_tokenizer_source(TeacherConfig(model_name_or_path="m")) == "m"
    assert teacher_tokenizer_source(TeacherConfig(model_name_or_path="m", tokenizer_name_or_path="t")) == "t"
    with pytest.raises(GoldConfigError, match="--gold.teacher.model_name_or_path"):
        teacher_tokenizer_source(TeacherConfig())


def test_loads_with_trust_remote_code(monkeypatch):
    import transformers

    calls = []
    monkeypatch.setattr(
        transformers.AutoTokenizer,
        "from_pretrained",
        lambda path, **kwargs: calls.append((path, kwargs)) or path,
    )
    assert load_teacher_tokenizer(TeacherConfig(model_name_or_path="m", tokenizer_name_or_path="t")) == "t"
    assert load_tokenizer("x") == "x"
    assert calls == [("t", {"trust_remote_code": True}), ("x", {"trust_remote_code": True})]


def test_loads_a_saved_tokenizer(tmp_path):
    original = load_packaged_tokenizer("gpt2")
    original.save_pretrained(tmp_path)
    loaded = load_teacher_tokenizer(TeacherConfig(model_name_or_path=str(tmp_path)))
    assert loaded.get_vocab() == original.get_vocab()
    assert loaded("Hello world")["input_ids"] == original("Hello world")["input_ids"]
