"""The one way the plugin loads a tokenizer by name: the teacher's (from its config) and any other.

``trust_remote_code=True`` as OpenRLHF loads its models' tokenizers, so a teacher whose tokenizer ships custom
code loads the same way in every backend, the dry run and the policy actor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gold_plugin.config import GoldConfig, GoldConfigError, TeacherConfig

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


def check_teacher_chat_template(
    gold: GoldConfig, teacher_tokenizer: PreTrainedTokenizerBase, chat_prompts: bool
) -> None:
    """Refuse a run whose chat prompts would reach a teacher tokenizer that has no chat template to render them.

    ``chat_prompts``: the dataset's prompts are chat messages (``--data.apply_chat_template``). With
    ``--gold.teacher.chat_template teacher`` such a teacher would reject every request and the run would distil
    nothing; a base model (no template) is the usual case. Raises :class:`GoldConfigError` naming both ways out.
    Nothing to check at ``--gold.alpha 0`` (no teacher is asked).
    """
    teacher = gold.teacher
    if gold.alpha == 0 or not chat_prompts or teacher.chat_template != "teacher":
        return
    if getattr(teacher_tokenizer, "chat_template", None):
        return
    raise GoldConfigError(
        f"The teacher tokenizer {teacher_tokenizer_source(teacher)!r} has no chat template, but the prompts are chat "
        "messages (--data.apply_chat_template) that --gold.teacher.chat_template teacher renders with the "
        "teacher's own template: every teacher request would be rejected and nothing distilled. Either send the "
        "student's rendered prompt as plain text (--gold.teacher.chat_template student, what a base teacher reads "
        "in TRL's GOLD), or give the teacher a tokenizer with a chat template (--gold.teacher.tokenizer_name_or_path "
        "pointing at a tokenizer folder that holds a chat_template.jinja)."
    )
