"""``--dry_run``: print the resolved run and check the tokenizer pair, without Ray or model weights."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TextIO

from gold_plugin.config import GoldConfigError

from .args import namespace_to_dict
from .launch_plan import LaunchPlan


@dataclass
class TokenizerReport:
    """What the dry run learnt about the student/teacher tokenizer pair (None where not checked)."""

    student_checked: bool
    teacher_checked: bool
    student_matched_fraction: float | None = None
    teacher_matched_fraction: float | None = None
    same_vocabulary: bool | None = None


def _is_local(path: str | None) -> bool:
    return path is not None and bool(path) and os.path.exists(path)


def check_tokenizers(plan: LaunchPlan, out: TextIO) -> TokenizerReport:
    """Load the tokenizers whose paths exist, refuse one whose tokens cannot be mapped to bytes, report the map.

    Paths that do not exist here (a hub name, or cluster storage not mounted on this machine) are only warned
    about: the run itself will check them again on the cluster.
    """
    student_path = plan.args.actor.model_name_or_path
    teacher = plan.gold.teacher
    teacher_path = teacher.tokenizer_name_or_path or teacher.model_name_or_path
    report = TokenizerReport(student_checked=_is_local(student_path), teacher_checked=_is_local(teacher_path))
    for role, path, found in (
        ("student", student_path, report.student_checked),
        ("teacher", teacher_path, report.teacher_checked),
    ):
        if not found:
            print(f"WARNING: {role} tokenizer {path!r} is not a local path here; not checked.", file=out)
    if not (report.student_checked or report.teacher_checked):
        return report

    from gold_plugin.alignment import UnsupportedTokenizerError, VocabMap, token_bytes
    from gold_plugin.teacher.tokenizer import check_teacher_chat_template, load_tokenizer

    loaded = {}
    for role, path, found in (
        ("student", student_path, report.student_checked),
        ("teacher", teacher_path, report.teacher_checked),
    ):
        if not found:
            continue
        tokenizer = load_tokenizer(path)
        try:
            token_bytes(tokenizer)
        except UnsupportedTokenizerError as err:
            raise GoldConfigError(
                f"The {role} tokenizer at {path} cannot be mapped to bytes ({err}); GOLD aligns texts byte by byte. "
                f"Use a byte-level BPE or SentencePiece {role}."
            ) from err
        print(
            f"{role} tokenizer {path}: {type(tokenizer).__name__}, {len(tokenizer)} tokens, byte-mappable",
            file=out,
        )
        if role == "teacher":
            chat_prompts = bool(getattr(plan.args.data, "apply_chat_template", False))
            check_teacher_chat_template(plan.gold, tokenizer, chat_prompts)
        loaded[role] = tokenizer

    if len(loaded) == 2:
        vocab_map = VocabMap(loaded["student"], loaded["teacher"])
        matched = int((vocab_map.teacher_to_student >= 0).sum())
        report.teacher_matched_fraction = float(vocab_map.matched_fraction)
        report.student_matched_fraction = float(vocab_map.student_matched_fraction)
        report.same_vocabulary = loaded["student"].get_vocab() == loaded["teacher"].get_vocab()
        print(
            f"vocabulary map: {matched} teacher tokens have a student token with the same bytes; matched share of "
            f"the non-special vocabulary: teacher {report.teacher_matched_fraction:.1%}, "
            f"student {report.student_matched_fraction:.1%}"
            + ("; identical vocabularies" if report.same_vocabulary else ""),
            file=out,
        )
    return report


def resolved_configuration(plan: LaunchPlan) -> dict:
    """The resolved options as one JSON-able dict: ``openrlhf`` (nested as OpenRLHF sees them) and ``gold``."""
    openrlhf = namespace_to_dict(plan.args)
    openrlhf.pop("gold", None)
    return {"openrlhf": openrlhf, "gold": plan.gold.to_dict()}


def run_dry_run(plan: LaunchPlan, out: TextIO) -> TokenizerReport:
    """Print warnings, cluster layout, resolved configuration and the tokenizer check; start nothing."""
    print("GOLD dry run: options are valid (no Ray started, no weights loaded).", file=out)
    for warning in plan.warnings:
        print(f"WARNING: {warning}", file=out)
    if plan.filled_defaults:
        which = "GOLD's reward-free" if not plan.gold.needs_reward else "OpenRLHF's"
        given = ", ".join(f"--{dest} {value}" for dest, value in plan.filled_defaults.items())
        print(f"Defaults ({which}, not given on the command line): {given}", file=out)
    print("Cluster layout:", file=out)
    for group in plan.groups:
        print(f"  {group.describe()}", file=out)
    if not plan.create_reward_model_group:
        reason = (
            "reward-free (--gold.alpha=1)"
            if not plan.gold.needs_reward
            else f"reward from {plan.reward_source}"
        )
        print(f"  (no reward-model group: {reason})", file=out)
    if not plan.create_reference_group:
        print("  (no reference model: --algo.kl.init_coef 0)", file=out)
    print("Resolved configuration:", file=out)
    print(json.dumps(resolved_configuration(plan), indent=2, default=str), file=out)
    report = check_tokenizers(plan, out)
    if plan.gold.teacher.backend == "server" and plan.gold.alpha > 0:
        check_served_teacher(plan, out)
    return report


def check_served_teacher(plan: LaunchPlan, out: TextIO) -> None:
    """Run the served teacher's start-up checks from here (reachable, model name, top-k, tokenizer, key), as the
    job will; a failure is a :class:`GoldConfigError` with the check's message."""
    from gold_plugin.teacher import TeacherServerError, build_teacher

    try:
        teacher = build_teacher(plan.gold.teacher)
    except TeacherServerError as err:
        raise GoldConfigError(str(err)) from err
    print(
        f"served teacher {teacher.served_model_name!r} at {', '.join(teacher.client.urls)}: reachable, context "
        f"{teacher.max_len} tokens, top-{teacher.topk} log-probs allowed, tokenizer matches",
        file=out,
    )
    teacher.close()
