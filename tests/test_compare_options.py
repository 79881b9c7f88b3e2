"""The local experiments' method options (examples/local/compare_pairs.py, compare_methods.py) parse and validate as
GOLD configs, and mean what their names say: a renamed or newly refused option fails here, not after an hour of runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "local"))

import compare_methods  # noqa: E402
import compare_pairs  # noqa: E402

from gold_plugin.config import gold_config_from_args  # noqa: E402
from gold_plugin.local.cli import build_parser  # noqa: E402

ALL = {
    **{f"pairs:{slug}": extra for slug, extra in compare_pairs.METHODS.values()},
    **{f"methods:{slug}": extra for slug, extra in compare_methods.METHODS.values()},
    **{f"normalisation:{slug}": extra for slug, extra in compare_methods.NORMALISATION.values()},
}


def _gold(extra: list[str]):
    return gold_config_from_args(build_parser().parse_args([*compare_pairs.SHARED, *extra]))


@pytest.mark.parametrize("name", sorted(ALL))
def test_method_options_are_accepted(name: str) -> None:
    _gold(ALL[name])


def test_pairs_methods_mean_what_they_say() -> None:
    methods = {slug: _gold(extra) for slug, extra in compare_pairs.METHODS.values()}
    hidden, both = methods["hidden"], methods["bytes_hidden"]
    assert hidden.uses_hidden_states and not hidden.uses_logit_loss and hidden.teacher.topk == 0
    assert both.uses_hidden_states and both.uses_logit_loss and both.logit_projection == "bytes"
    assert both.hidden_state_coef == 1.0 and methods["bytes_hidden01"].hidden_state_coef == 0.1
    assert both.hidden_state_loss == hidden.hidden_state_loss == "mse"
    cosine, cosine_added = methods["hidden_cos"], methods["bytes_hidden01_cos"]
    assert cosine.hidden_state_loss == cosine_added.hidden_state_loss == "cosine"
    assert cosine.uses_hidden_states and not cosine.uses_logit_loss and cosine.hidden_state_coef == 1.0
    assert cosine_added.uses_logit_loss and cosine_added.hidden_state_coef == 0.1
    bridges = {
        slug: methods[slug] for slug in ("hidden_rank16", "hidden_rank128", "hidden_last", "hidden_refit")
    }
    assert all(b.uses_hidden_states and not b.uses_logit_loss for b in bridges.values())
    assert [b.teacher.hidden_state_rank for b in bridges.values()] == [16, 128, 64, 64]
    assert [b.teacher.hidden_state_layers for b in bridges.values()] == [2, 2, 1, 2]
    assert [b.hidden_state_bridge for b in bridges.values()] == ["frozen", "frozen", "frozen", "refit"]
    summed, normalised = methods["advantages_discount1"], methods["advantages_lennorm"]
    assert (
        summed.kl_discount == normalised.kl_discount == 1.0
        and summed.signal == normalised.signal == "advantage"
    )
    assert not summed.kl_length_normalised and normalised.kl_length_normalised
    teacher_written = methods["bytes_teacher_lmbda"]
    assert teacher_written.lmbda == 0.5 and teacher_written.teacher_generates
    assert teacher_written.logit_projection == "bytes" and not teacher_written.uses_hidden_states
    lennorm, plain = methods["advantages_lennorm"], methods["advantages"]
    assert lennorm.kl_length_normalised and lennorm.kl_discount == 1.0 and lennorm.signal == "advantage"
    assert not plain.kl_length_normalised and plain.kl_discount == 0.0
    for slug in ("bytes", "vocab", "uld", "advantages", "grpo", "reference"):
        assert not methods[slug].uses_hidden_states and methods[slug].lmbda == 1.0


def test_the_real_pair_uses_the_default_top_k_and_each_pair_its_learning_rate() -> None:
    def parsed(pair: str, slug: str):
        [extra] = [extra for key, extra in compare_pairs.METHODS.values() if key == slug]
        return build_parser().parse_args(compare_pairs.pair_options(pair, extra))

    assert vars(parsed("real", "bytes"))["gold.teacher.topk"] == 64  # the default k
    assert vars(parsed("real", "vocab"))["gold.teacher.topk"] == 64
    assert vars(parsed("real", "advantages"))["gold.teacher.topk"] == 0  # no logit loss: no top-k asked
    assert vars(parsed("merged_student", "bytes"))["gold.teacher.topk"] == 8
    assert vars(parsed("real", "bytes"))["actor.adam.lr"] == 1e-3
    assert vars(parsed("digits", "bytes"))["actor.adam.lr"] == 2e-4
