"""The hidden-state signal (OPRD across tokenizers): layer pairing, the teacher's sketch, the frozen bridge, the loss
and its gradient, the group ends of an aligned batch, the hf teacher's states, the options, and the local backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gold_plugin.alignment.flat import FlatAlignment
from gold_plugin.alignment.result import Alignment
from gold_plugin.config import GoldConfig, GoldConfigError, TeacherConfig
from gold_plugin.signals.hidden_states import (
    HiddenStateBridge,
    bridge_statistics,
    explained_variance,
    hidden_state_loss,
    layers_at_depths,
    teacher_sketch,
)
from gold_plugin.step import AlignedBatch, per_unit_means
from gold_plugin.step.hidden_states import HiddenStateSignal, hidden_state_targets
from gold_plugin.teacher.types import TeacherRequest, TeacherResult


def test_layers_are_paired_by_relative_depth():
    assert layers_at_depths(2, 1) == (2,)  # one pair: the last layers
    assert layers_at_depths(2, 2) == (1, 2)
    assert layers_at_depths(28, 3) == (9, 19, 28)  # 9.33, 18.67, 28 rounded
    assert layers_at_depths(36, 4) == (9, 18, 27, 36)
    assert layers_at_depths(5, 2) == (3, 5)  # 2.5 rounds half up
    assert len(set(layers_at_depths(7, 7))) == 7
    with pytest.raises(ValueError, match="Pair 1..2 layers"):
        layers_at_depths(2, 3)


def test_the_teacher_sketch_is_orthonormal_and_fixed():
    sketch = teacher_sketch(40, 8)
    assert sketch.shape == (40, 8)
    torch.testing.assert_close(sketch.T @ sketch, torch.eye(8), atol=1e-6, rtol=0)
    assert torch.equal(sketch, teacher_sketch(40, 8))  # every replica, every resume: the same matrix
    assert not torch.equal(sketch, teacher_sketch(40, 8, seed=1))
    assert torch.equal(teacher_sketch(6, 8), torch.eye(6))  # narrower than the rank: nothing to reduce


def test_the_bridge_is_the_ridge_map_onto_standardised_teacher_states():
    # One layer, one dimension each side, by hand: s = [1, 2, 3], t = [2, 4, 6].
    student = torch.tensor([1.0, 2.0, 3.0]).reshape(3, 1, 1)
    teacher = torch.tensor([2.0, 4.0, 6.0]).reshape(3, 1, 1)
    bridge = HiddenStateBridge.fit(student, teacher, ridge=0.0)
    # mean 4, population std sqrt(8/3); centred s = [-1, 0, 1]; W = (s.z) / (s.s) = (4 / sqrt(8/3)) / 2.
    assert float(bridge.teacher_mean) == pytest.approx(4.0)
    assert float(bridge.teacher_scale) == pytest.approx(math.sqrt(8 / 3))
    assert float(bridge.student_map) == pytest.approx(math.sqrt(3 / 2))
    torch.testing.assert_close(bridge.project(student), bridge.targets(teacher))
    # Ridge relative to the mean eigenvalue: lam = 0.5 * 2 / 1 = 1, so W = 2.449 / 3.
    shrunk = HiddenStateBridge.fit(student, teacher, ridge=0.5)
    assert float(shrunk.student_map) == pytest.approx(math.sqrt(3 / 2) * 2 / 3)
    # A state dict gives the same bridge back.
    again = HiddenStateBridge.from_state_dict(bridge.state_dict())
    torch.testing.assert_close(again.project(student), bridge.project(student))


def test_the_bridge_recovers_a_linear_relation_between_widths():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(200, 2, 6, generator=generator)
    mixing = torch.randn(2, 6, 3, generator=generator)
    teacher = torch.einsum("nld,ldr->nlr", student, mixing) + 5.0
    bridge = HiddenStateBridge.fit(student, teacher, ridge=1e-9)
    assert explained_variance(bridge.project(student), bridge.targets(teacher)) > 1 - 1e-6
    assert bridge.rank == 3 and bridge.student_map.shape == (2, 6, 3)
    with pytest.raises(ValueError, match="at least 2 group ends"):
        HiddenStateBridge.fit(student[:1], teacher[:1])


def test_the_loss_and_its_gradient_by_hand():
    projected = torch.tensor([[[1.0, 2.0]], [[0.0, 1.0]]], requires_grad=True)  # G=2, L=1, r=2
    targets = torch.tensor([[[0.0, 0.0]], [[0.0, 2.0]]])
    mse = hidden_state_loss(projected, targets, "mse")
    torch.testing.assert_close(mse, torch.tensor([(1 + 4) / 2, 1 / 2]))
    mse.sum().backward()
    torch.testing.assert_close(projected.grad, (projected - targets).detach())  # 2 (p - t) / r, r = 2
    cosine = hidden_state_loss(
        torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]]), torch.tensor([[[0.0, 3.0]], [[2.0, 2.0]]]), "cosine"
    )
    torch.testing.assert_close(cosine, torch.tensor([1.0, 0.0]))


def test_the_signal_term_is_alpha_coef_times_the_group_mean_and_flows_through_the_frozen_map():
    gold = GoldConfig(
        signal="hidden", alpha=0.5, hidden_state_coef=2.0, teacher=TeacherConfig(hidden_state_layers=1)
    )
    signal = HiddenStateSignal(gold, student_num_layers=4)
    assert signal.student_layers == (4,)
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(10, 1, 3, generator=generator)
    teacher = torch.randn(10, 1, 2, generator=generator)
    targets = _targets(torch.arange(10), teacher)
    metrics = signal.fit_states(student, teacher)
    assert 0.0 < metrics["gold/hidden_bridge_fit"] < 1.0 and metrics["gold/hidden_bridge_groups"] == 10
    states = student.clone().requires_grad_(True)
    term, part = signal.term_at_states(states, targets, batch_groups=20.0, batch_size=4)
    bridge = signal.bridge
    projected = bridge.project(student)
    per_group = (projected - bridge.targets(teacher)).pow(2).mean(-1).mean(-1)
    assert float(term.detach()) == pytest.approx(0.5 * 2.0 * float(per_group.sum()) / 20.0, rel=1e-5)
    logged = float(part["gold/hidden_state_loss/sum_per_sample"])  # 10 groups in 4 samples
    assert logged == pytest.approx(float(per_group.sum()) / 4, rel=1e-5)
    mean = per_unit_means({"gold/hidden_state_loss/sum_per_sample": logged, "gold/hidden_state_groups": 2.5})
    assert mean == {
        "gold/hidden_state_loss": pytest.approx(float(per_group.mean()), rel=1e-5),
        "gold/hidden_state_groups": 2.5,
    }
    term.backward()
    # d term / d s = scale * W (2 (p - z) / r), with W [d, r] the frozen map (it gets no gradient: a buffer).
    expected = (
        0.5
        * 2.0
        / 20.0
        * torch.einsum("glr,ldr->gld", (projected - bridge.targets(teacher)), bridge.student_map)
    )
    torch.testing.assert_close(states.grad, expected, atol=1e-5, rtol=1e-4)
    assert not bridge.student_map.requires_grad


def test_a_frozen_bridge_is_fitted_once_and_a_refitted_one_every_step():
    def signal(fit: str) -> HiddenStateSignal:
        gold = GoldConfig(
            signal="hidden", hidden_state_bridge=fit, teacher=TeacherConfig(hidden_state_layers=1)
        )
        return HiddenStateSignal(gold, student_num_layers=2)

    generator = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(12, 1, 3, generator=generator), torch.randn(12, 1, 2, generator=generator)
    frozen, refit = signal("frozen"), signal("refit")
    assert frozen.needs_fit and refit.needs_fit
    frozen.fit_states(student, teacher)
    refit.fit_states(student, teacher)
    assert not frozen.needs_fit and refit.needs_fit
    # A refit on other states replaces the map (the same sums give the same bridge as a fresh fit on them).
    moved = 2.0 * student + 1.0
    refit.fit_states(moved, teacher)
    torch.testing.assert_close(refit.bridge.student_map, HiddenStateBridge.fit(moved, teacher).student_map)
    assert not torch.allclose(refit.bridge.student_map, frozen.bridge.student_map)
    restored = signal("frozen")
    restored.load_state_dict(frozen.state_dict())
    assert not restored.needs_fit  # a resumed run keeps its frozen bridge
    with pytest.raises(GoldConfigError, match="hidden_state_bridge"):
        GoldConfig(signal="hidden", hidden_state_bridge="learned")


def _targets(samples: torch.Tensor, teacher: torch.Tensor):
    from gold_plugin.step.hidden_states import HiddenStateTargets

    return HiddenStateTargets.at(samples, torch.zeros_like(samples), teacher)


def _result(states: np.ndarray) -> TeacherResult:
    n = states.shape[0]
    return TeacherResult(
        token_ids=np.arange(n),
        token_bytes=np.ones(n, dtype=np.int64),
        logprobs=np.zeros(n, dtype=np.float32),
        hidden_states=states.astype(np.float16),
    )


def test_group_ends_of_an_aligned_batch():
    # Sample 0: student groups [0 0 1 2] / teacher [0 1 1 2]; sample 1: the teacher failed; sample 2: student
    # [0 1 -1] / teacher [0 0 1] with the teacher state after its last token NaN (masked there).
    alignments = [
        Alignment(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), 3),
        Alignment.unalignable(2, 0, "teacher: failed"),
        Alignment(np.array([0, 1, -1]), np.array([0, 0, 1]), 2),
    ]
    states0 = np.arange(4 * 1 * 2, dtype=np.float32).reshape(4, 1, 2)
    states2 = np.array([[[7.0, 7.0]], [[8.0, 8.0]], [[np.nan, np.nan]]], dtype=np.float32)
    failed = TeacherResult.failed("boom", 0)
    batch = AlignedBatch(
        alignments=alignments,
        flat=FlatAlignment.build(alignments),
        teacher_logprobs=torch.zeros(7),
        results=[_result(states0), failed, _result(states2)],
        teacher_failed=torch.tensor([False, True, False]),
        masked_tokens=torch.zeros(3),
        prompt_truncated=torch.zeros(3, dtype=torch.bool),
        empty_response=torch.zeros(3, dtype=torch.bool),
    )
    targets = hidden_state_targets(batch)
    # Sample 0's groups end at student tokens 1, 2, 3 and teacher tokens 0, 2, 3; sample 2's group 0 at student 0
    # and teacher 1 (its group 1 ends at a NaN teacher state: dropped).
    assert targets.sample.tolist() == [0, 0, 0, 2]
    assert targets.action.tolist() == [1, 2, 3, 0]
    torch.testing.assert_close(targets.teacher_states[:, 0, 0], torch.tensor([0.0, 4.0, 6.0, 8.0]))
    micro = targets.select([2, 0])  # micro-batch of samples 2 and 0, renumbered 0 and 1
    assert micro.sample.tolist() == [0, 1, 1, 1] and micro.action.tolist() == [0, 1, 2, 3]


def test_the_hf_teacher_returns_sketched_states_after_each_response_token(tmp_path):
    from transformers import AutoModelForCausalLM

    from gold_plugin.teacher import HFTeacher
    from gold_plugin.testing.tiny_teacher import save_tiny_teacher

    folder = save_tiny_teacher(tmp_path / "teacher", "qwen", num_hidden_layers=4)
    teacher = HFTeacher(str(folder), device="cpu", hidden_state_layers=2, hidden_state_rank=8)
    assert teacher.hidden_layers == (2, 4)
    plain = HFTeacher(str(folder), device="cpu")
    requests = [TeacherRequest("Sum 12 and 30.", " It is 42", False), TeacherRequest("Hi", " ok", True)]
    results = teacher.score(requests)
    for result, reference in zip(results, plain.score(requests)):
        np.testing.assert_array_equal(result.logprobs, reference.logprobs)  # scoring unchanged
        assert reference.hidden_states is None
        assert (
            result.hidden_states.shape == (result.num_tokens, 2, 8)
            and result.hidden_states.dtype == np.float16
        )
    # By hand for the first request: the text prompt, then the response tokens; states at their own positions.
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = teacher.tokenizer
    prompt = tokenizer("Sum 12 and 30.", add_special_tokens=False)["input_ids"]
    response = results[0].token_ids.tolist()
    with torch.no_grad():
        out = model(torch.tensor([prompt + response]), output_hidden_states=True)
    sketch = teacher_sketch(32, 8)
    positions = torch.arange(len(prompt), len(prompt) + len(response))
    for k, layer in enumerate((2, 4)):
        expected = out.hidden_states[layer][0, positions] @ sketch
        np.testing.assert_allclose(
            results[0].hidden_states[:, k].astype(np.float32), expected.numpy(), atol=2e-3, rtol=2e-3
        )


def test_options():
    gold = GoldConfig(signal="hidden")
    assert gold.hidden_state_coef == 1.0 and gold.uses_hidden_states
    assert not gold.uses_logit_loss and not gold.uses_advantages and gold.teacher.topk == 0
    assert gold.teacher.hidden_state_layers == 2 and gold.teacher.hidden_state_rank == 64
    added = GoldConfig(hidden_state_coef=0.3)  # added to the default logit signal
    assert added.uses_logit_loss and added.uses_hidden_states and added.teacher.hidden_state_layers == 2
    assert GoldConfig().teacher.hidden_state_layers == 0 and not GoldConfig().uses_hidden_states
    with pytest.raises(GoldConfigError, match="backend hf"):
        GoldConfig(signal="hidden", teacher=TeacherConfig(backend="vllm"))
    with pytest.raises(GoldConfigError, match="learns nothing"):
        GoldConfig(signal="hidden", hidden_state_coef=0.0)
    with pytest.raises(GoldConfigError, match="hidden_state_layers"):
        GoldConfig(hidden_state_coef=1.0, teacher=TeacherConfig(hidden_state_layers=0))
    with pytest.raises(GoldConfigError, match="spans"):
        GoldConfig(signal="hidden", alignment="positional")


def test_a_rank_above_the_teachers_width_ships_the_whole_state_and_consumers_know_it_at_start(tmp_path):
    """hidden size 32, rank 100: the teacher ships 32 dimensions (nothing to reduce), and
    ``shipped_state_width`` (what the OpenRLHF experience maker gives micro-batches without a group, before any
    state was seen) says 32 from the model's config alone; 8 at rank 8; the rank when no teacher path is set."""
    from gold_plugin.teacher import HFTeacher
    from gold_plugin.teacher.hf import shipped_state_width
    from gold_plugin.testing.tiny_teacher import save_tiny_teacher

    folder = save_tiny_teacher(tmp_path / "teacher", "qwen", num_hidden_layers=2)
    teacher = HFTeacher(str(folder), device="cpu", hidden_state_layers=1, hidden_state_rank=100)
    [result] = teacher.score([TeacherRequest("Hi", " ok", True)])
    assert result.hidden_states.shape[1:] == (1, 32) == (1, shipped_state_width(str(folder), 100))
    assert shipped_state_width(str(folder), 8) == 8
    assert shipped_state_width(None, 8) == 8


def test_the_bridge_fit_solves_wide_students_with_few_group_ends():
    """SmolLM2's 576-wide states at 35 group ends, two layers, two threads: torch 2.13's batched LU solve on CPU
    fails on this system (MKL: "Parameter 6 was incorrect on entry to DLASWP", then a pivot error or NaN); the
    bridge's Cholesky solve gives the map numpy's solver gives."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        student = torch.randn(35, 2, 576, dtype=torch.float64) * 30
        teacher = torch.randn(35, 2, 64, dtype=torch.float64) * 200
        bridge = HiddenStateBridge.fit(student.float(), teacher.float())
    finally:
        torch.set_num_threads(threads)
    stats = bridge_statistics(student, teacher)
    n = float(stats["count"])
    mean = stats["student_sum"] / n
    gram = stats["student_outer"] - n * mean[:, :, None] * mean[:, None, :]
    cross = stats["cross"] - n * mean[:, :, None] * (stats["teacher_sum"] / n)[:, None, :]
    lam = 1e-3 * torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1) / 576
    system = (gram + lam[:, None, None] * torch.eye(576, dtype=torch.float64)).numpy()
    expected = np.linalg.solve(system, (cross / bridge.teacher_scale.double()[:, None, :]).numpy())
    assert torch.isfinite(bridge.student_map).all()
    np.testing.assert_allclose(bridge.student_map.numpy(), expected, rtol=1e-4, atol=1e-6)
