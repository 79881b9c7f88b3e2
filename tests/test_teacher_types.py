"""The typed contracts: every teacher implements :class:`TeacherScorer` with the protocol's own signatures, and
real Hugging Face tokenizers have every member of the tokenizer protocols that the plugin calls."""

from __future__ import annotations

import inspect
import sys
import typing
from collections.abc import Callable, Sequence

import pytest

from gold_plugin.alignment.types import ChatTokenizer, Tokenizer
from gold_plugin.local.launch import RayTeacher
from gold_plugin.packaged_tokenizers import PACKAGED_TOKENIZERS, load_packaged_tokenizer
from gold_plugin.teacher import (
    HFTeacher,
    ServedTeacher,
    TeacherGroup,
    TeacherRequest,
    TeacherResult,
    TeacherScorer,
    VLLMTeacher,
)

SCORERS = [HFTeacher, VLLMTeacher, ServedTeacher, TeacherGroup, RayTeacher]
NAMES = {"ChatTokenizer": ChatTokenizer, "Tokenizer": Tokenizer}  # imported under TYPE_CHECKING where used


def _members(protocol: type) -> dict[str, object]:
    """The protocol's methods and properties (its own and its bases'), by name."""
    members: dict[str, object] = {}
    for cls in reversed(protocol.__mro__):
        if cls in (object, typing.Protocol, typing.Generic):
            continue
        for name, value in vars(cls).items():
            if (callable(value) or isinstance(value, property)) and (
                not name.startswith("_") or name in ("__len__", "__call__")
            ):
                members[name] = value
    return members


def _resolved(function: Callable) -> inspect.Signature:
    """``inspect.signature`` with the annotations evaluated (in the function's module, TYPE_CHECKING names too)."""
    signature = inspect.signature(function)
    module = sys.modules[function.__module__]
    hints = typing.get_type_hints(function, vars(module), NAMES)
    parameters = [
        p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()
    ]
    return signature.replace(parameters=parameters, return_annotation=hints.get("return", None))


def _drift(protocol: type, cls: type) -> list[str]:
    """How ``cls`` departs from ``protocol``: each member missing, of another kind, or with another signature."""
    problems = []
    for name, member in _members(protocol).items():
        own = inspect.getattr_static(cls, name, None)
        if isinstance(member, property):
            if not isinstance(own, property):
                problems.append(f"{name}: not a property")
            elif _resolved(own.fget).return_annotation != _resolved(member.fget).return_annotation:
                problems.append(f"{name}: returns {_resolved(own.fget).return_annotation}")
        elif own is None or not callable(own):
            problems.append(f"{name}: missing")
        elif _resolved(own) != _resolved(member):
            problems.append(f"{name}{_resolved(own)} is not {name}{_resolved(member)}")
    return problems


@pytest.mark.parametrize("cls", SCORERS, ids=lambda c: c.__name__)
def test_every_teacher_implements_the_scorer_contract_with_its_signatures(cls):
    assert TeacherScorer in cls.__mro__  # explicit: inherits the defaults, a checker verifies it
    assert _drift(TeacherScorer, cls) == []
    assert set(_members(TeacherScorer)) == {"tokenizer", "score", "score_counting_retries", "close"}
    assert "topk" in typing.get_type_hints(TeacherScorer)


def test_a_drifted_teacher_is_caught():
    class Drifted(TeacherScorer):
        @property
        def tokenizer(self) -> Tokenizer:  # not the ChatTokenizer the request encoder needs
            raise NotImplementedError

        def score(
            self, requests: Sequence[TeacherRequest], timeout: float | None = None
        ) -> list[TeacherResult]:
            return []

        def close(self, force: bool) -> None:
            pass

    problems = _drift(TeacherScorer, Drifted)
    assert [p.split("(")[0].split(":")[0] for p in problems] == ["tokenizer", "score", "close"]


def test_the_contract_gives_an_in_process_scorer_no_retries_and_nothing_to_close():
    request = TeacherRequest("2+2=", "4")
    result = TeacherResult.failed("stub", topk=0)

    class OnlyScores(TeacherScorer):
        def score(self, requests: Sequence[TeacherRequest]) -> list[TeacherResult]:
            return [result for _ in requests]

    scorer = OnlyScores()
    assert scorer.score_counting_retries([request, request]) == ([result, result], 0)
    assert scorer.close() is None


def _accepts(protocol_fn: Callable, real_fn: Callable) -> list[str]:
    """Parameters of ``protocol_fn`` that a call written against it would not pass to ``real_fn``."""
    real = inspect.signature(real_fn).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in real.values())
    missing = []
    positional = [n for n, p in real.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for index, (name, param) in enumerate(inspect.signature(protocol_fn).parameters.items()):
        if param.kind is param.VAR_KEYWORD:
            continue
        if param.kind is param.POSITIONAL_OR_KEYWORD and positional[index : index + 1] != [name]:
            missing.append(f"{name} (positional {index})")
        elif param.kind is param.KEYWORD_ONLY and name not in real and not takes_kwargs:
            missing.append(name)
    return missing


@pytest.mark.parametrize("name", sorted(PACKAGED_TOKENIZERS))
def test_real_tokenizers_have_every_member_the_tokenizer_protocols_name(name):
    tokenizer = load_packaged_tokenizer(name)
    for member, declared in _members(ChatTokenizer).items():
        assert hasattr(tokenizer, member), member
        if not isinstance(declared, property):
            assert _accepts(declared, getattr(type(tokenizer), member)) == [], member
    # What the protocols promise of the values, on this tokenizer.
    assert tokenizer("a b", add_special_tokens=False)["input_ids"] == tokenizer.encode(
        "a b", add_special_tokens=False
    )
    ids = tokenizer.encode("a b", add_special_tokens=False)
    assert isinstance(tokenizer.convert_ids_to_tokens(ids), list) and len(tokenizer) >= len(
        tokenizer.get_vocab()
    )
    assert isinstance(tokenizer.eos_token_id, int) and isinstance(tokenizer.all_special_ids, list)


def test_a_missing_or_moved_parameter_is_caught():
    class Real:
        def encode(self, text, text_pair=None, add_special_tokens=True): ...

        def decode(self, ids): ...

    assert _accepts(Tokenizer.encode, Real.encode) == []
    assert _accepts(ChatTokenizer.decode, Real.decode) == [
        "token_ids (positional 1)",
        "skip_special_tokens (positional 2)",
    ]


def test_a_backend_that_leaves_a_request_without_an_answer_raises_instead_of_passing_none_on():
    from gold_plugin.teacher.types import TeacherError, filled

    answers = ["a", "b"]
    assert filled(answers) == answers
    with pytest.raises(TeacherError, match=r"left 2 of 3 requests without an answer: \[0, 2\]"):
        filled([None, "b", None])
