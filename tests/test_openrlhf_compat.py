"""The places where the plugin enters OpenRLHF's own code (gold_plugin/integrations/openrlhf/compat.py): each fits
the installed OpenRLHF, a moved one is named at start, and a rebound name is OpenRLHF's again afterwards."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).parent / "stubs"))  # vllm / flash_attn import stand-ins when not installed
pytest.importorskip("openrlhf")

from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer  # noqa: E402

from gold_plugin.integrations.openrlhf import compat  # noqa: E402


def test_every_entry_fits_the_installed_openrlhf():
    assert compat.check() == []
    assert {entry.name for entry in compat.ENTRIES} == {
        "backward", "actor_output", "kl_and_entropy", "windows", "actor_trainer", "async_actors",
    }  # fmt: skip


def test_an_entry_that_moved_is_named_and_stops_the_actor_at_start(monkeypatch):
    moved = (
        compat.Entry("backward", compat._training_step, ("self.strategy.backward(total_loss",)),
        compat.Entry("windows", compat._ppo_train, (), ("iter_windows",)),
        compat.Entry("gone", lambda: ActorPPOTrainer.no_such_method, ()),
    )
    stale = compat.check(moved)
    assert stale[0] == "backward: 'self.strategy.backward(total_loss' not found"
    assert (
        stale[1] == "windows: ActorPPOTrainer.ppo_train no longer reads the module-level name 'iter_windows'"
    )
    assert stale[2].startswith("gone: ") and "no_such_method" in stale[2] and len(stale) == 3
    monkeypatch.setattr(compat, "ENTRIES", moved)
    with pytest.raises(
        RuntimeError,
        match=r"OpenRLHF 0\.11\.2's code .*\(0\.11\.2\).*backward\(total_loss.*Install openrlhf==0\.11\.2",
    ):
        compat.require_compatible()


def test_a_rebound_name_is_openrlhfs_again_after_an_error():
    namespace = ActorPPOTrainer.ppo_train.__globals__
    original = namespace["iter_grad_accum_global_norm"]
    with (
        pytest.raises(ValueError, match="inside"),
        compat.rebound(ActorPPOTrainer.ppo_train, "iter_grad_accum_global_norm", len) as seen,
    ):
        assert seen is original and namespace["iter_grad_accum_global_norm"] is len
        raise ValueError("inside")
    assert namespace["iter_grad_accum_global_norm"] is original
    with (
        pytest.raises(RuntimeError, match="no longer reads the module-level name 'no_such_name'"),
        compat.rebound(ActorPPOTrainer.ppo_train, "no_such_name", len),
    ):
        pass


def test_with_arguments_adds_its_arguments_to_every_start():
    started = []

    class Remote:
        @staticmethod
        def remote(*args, **kwargs):
            started.append((args, kwargs))
            return "handle"

    assert compat.with_arguments(Remote, teacher="t").remote("a", b=1) == "handle"
    assert started == [(("a",), {"b": 1, "teacher": "t"})]
