"""The one way the plugin loads a tokenizer by name: the teacher's (from its config) and any other.

``trust_remote_code=True`` as OpenRLHF loads its models' tokenizers, so a teacher whose tokenizer ships custom
code loads the same way in every backend, the dry run and the policy actor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gold_plugin.config import GoldConfigError, TeacherConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=True)``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=True)


def teacher_tokenizer_source(teacher: TeacherConfig) -> str:
    """Where the teacher's tokenizer is: ``tokenizer_name_or_path``, else ``model_name_or_path``."""
    source = teacher.tokenizer_name_or_path or teacher.model_name_or_path
    if not source:
        raise GoldConfigError(
            "Set --gold.teacher.model_name_or_path (or --gold.teacher.tokenizer_name_or_path): the teacher's "
            "tokenizer is needed to align its tokens with the student's."
        )
    return source


def load_teacher_tokenizer(teacher: TeacherConfig) -> PreTrainedTokenizerBase:
    """The teacher's tokenizer as :class:`TeacherConfig` names it."""
    return load_tokenizer(teacher_tokenizer_source(teacher))
