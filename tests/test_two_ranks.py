"""Two data-parallel ranks against one: the hidden-state bridge and loss of OpenRLHF's GOLD actor trainer.

Two processes in a real gloo group run the signal's bridge fit with the trainer's statistics sum (:func:`dp_sum`
over OpenRLHF's data-parallel group) and its term with the trainer's normaliser
(:meth:`GoldActorPPOTrainer._normaliser`), each on
its own samples (of different sizes), and average their gradients as DeepSpeed does; one process without a group
runs the same on all samples. The bridge must be the same on both ranks and equal the one-rank fit, and the averaged
gradient must equal the one-rank gradient (the loss normalised by the global count of groups, 18, not each rank's,
15 and 3). A process group of one (as other test modules leave) changes nothing on the one-rank side.
The logit loss's normaliser on two ranks is checked end to end by the two-rank stop-and-resume job
(``tests/test_openrlhf_e2e.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.append(str(Path(__file__).parent / "stubs"))  # vllm / flash_attn import stand-ins when not installed
pytest.importorskip("openrlhf")

from gold_plugin.config import GoldConfig, TeacherConfig  # noqa: E402
from gold_plugin.integrations.openrlhf.actor import GoldActorPPOTrainer, dp_sum  # noqa: E402
from gold_plugin.step import HiddenStateSignal, HiddenStateTargets, StudentForward  # noqa: E402

pytestmark = pytest.mark.slow  # two processes that import OpenRLHF, DeepSpeed and Ray

NUM_LAYERS, WIDTH, RANK, STEPS, INPUT = 4, 24, 6, 9, 10
ROWS = ((0, 1, 2), (3, 4))  # rank 0's samples, rank 1's: different counts of groups on each rank


def _gold() -> GoldConfig:
    teacher = TeacherConfig(
        model_name_or_path="unused", hidden_state_layers=2, hidden_state_rank=RANK, num_replicas=1
    )
    return GoldConfig(teacher=teacher, signal="hidden", hidden_state_coef=0.7, alpha=0.8)


def _batch() -> tuple[torch.Tensor, HiddenStateTargets, torch.Tensor]:
    """Inputs ``[B, T, L, INPUT]`` of a linear stand-in for the student (its states are ``inputs @ W``), the groups
    (several per sample, at random action columns) and the start of ``W``; the same on every rank."""
    g = torch.Generator().manual_seed(0)
    samples = sum(len(rows) for rows in ROWS)
    inputs = torch.randn(samples, STEPS, 2, INPUT, generator=g)
    counts = torch.tensor([7, 3, 5, 2, 1])  # groups per sample: 15 on rank 0, 3 on rank 1
    sample = torch.repeat_interleave(torch.arange(samples), counts)
    action = torch.randint(0, STEPS - 2, (int(counts.sum()),), generator=g)
    teacher = torch.randn(int(counts.sum()), 2, RANK, generator=g) * 3 + 1
    return (
        inputs,
        HiddenStateTargets.at(sample, action, teacher),
        torch.randn(INPUT, WIDTH, generator=g) * 0.3,
    )


def _bridge_and_gradient(rows: tuple[int, ...]) -> dict[str, torch.Tensor | dict]:
    """On this process's samples ``rows``: the trainer's bridge fit (statistics summed over the data-parallel
    ranks) and its hidden-state term's gradient in ``W``, averaged over the ranks as DeepSpeed averages."""
    inputs, targets, start = _batch()
    inputs, targets = inputs[list(rows)], targets.select(rows)
    weight = start.clone().requires_grad_(True)
    strategy = SimpleNamespace()  # no device mesh: OpenRLHF's data-parallel group is the whole world
    signal = HiddenStateSignal(_gold(), NUM_LAYERS)
    trainer = SimpleNamespace(losses={signal.name: signal}, strategy=strategy)
    # A one-token prompt: action column j is sequence token j + 1, whose state the group compares.
    experience = SimpleNamespace(
        sequences=torch.zeros(len(rows), STEPS, dtype=torch.long),
        action_mask=torch.ones(len(rows), STEPS - 1, dtype=torch.long),
    )
    states = inputs @ weight  # [B, T, L, WIDTH]
    at_groups = states[targets.sample, 1 + targets.action].detach()
    fitted = signal.fit_states(at_groups, targets.teacher_states, lambda sums: dp_sum(strategy, sums))
    dp_size = dist.get_world_size() if dist.is_initialized() else 1
    # outside ppo_train's windows: the normaliser is the micro-batch's own groups summed over the ranks
    normaliser = GoldActorPPOTrainer._normaliser(
        trainer, signal, targets, experience, {"dp_size": dp_size}, {}
    )
    forward = StudentForward(logits=None, states=states, layers=signal.student_layers, state_offset=1)
    term, _ = signal.term(forward, targets, normaliser, len(rows))
    term.backward()
    gradient = weight.grad
    if dist.is_initialized():
        dist.all_reduce(gradient)
        gradient = gradient / dp_size
    return {"bridge": signal.state_dict(), "fit": fitted, "gradient": gradient}


def _rank(rank: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=len(ROWS))
    try:
        torch.save(_bridge_and_gradient(ROWS[rank]), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_fit_one_bridge_and_give_the_one_rank_gradient(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=len(ROWS), join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(ROWS))]
    whole = _bridge_and_gradient(tuple(r for rows in ROWS for r in rows))
    for name, value in whole["bridge"].items():
        assert torch.equal(ranks[0]["bridge"][name], ranks[1]["bridge"][name]), name  # the same on both ranks
        torch.testing.assert_close(ranks[0]["bridge"][name], value, atol=1e-5, rtol=1e-4)
    assert ranks[0]["fit"] == ranks[1]["fit"]
    assert ranks[0]["fit"]["gold/hidden_bridge_groups"] == whole["fit"]["gold/hidden_bridge_groups"] == 18
    assert ranks[0]["fit"]["gold/hidden_bridge_fit"] == pytest.approx(whole["fit"]["gold/hidden_bridge_fit"])
    torch.testing.assert_close(ranks[0]["gradient"], whole["gradient"], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ranks[1]["gradient"], whole["gradient"], atol=1e-6, rtol=1e-4)
