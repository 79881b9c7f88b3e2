"""The hidden-state signal (OPRD) across tokenizers: layer pairing, the frozen low-rank bridge, the loss.

Where both models are compared: at the end of every aligned group both have read the same bytes of the response,
so the student's hidden state after its last token of the group and the teacher's after its last token describe
the same prefix. Which layers: ``count`` pairs at the relative depths ``k / count`` (``k = 1..count``) of each
model. The bridge between the two widths (docs/signals.md, "Hidden states"):

- the teacher reduces each state with a fixed orthonormal sketch to ``rank`` dimensions (:func:`teacher_sketch`,
  seeded: the same on every replica and after a resume, nothing fitted on the teacher's side), so what it ships
  is ``layers x rank`` numbers per response token;
- the consumer fits, once, on the first batch's group ends, a standardisation of the teacher's sketched states
  and a ridge map from the student's states onto them (:class:`HiddenStateBridge`); both are frozen afterwards
  and saved with the checkpoint. The student's states are then pulled towards the teacher's through a map that
  does not move, so the student cannot satisfy the loss by changing the map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gold_plugin.config import HiddenStateLoss

SKETCH_SEED = 20260603
"""Seed of the teacher's sketch; any fixed value works, every replica only has to use the same one."""


def layers_at_depths(num_layers: int, count: int) -> tuple[int, ...]:
    """Hidden-state indices at the relative depths ``k / count``, ``k = 1..count``, rounded half up.

    Indices follow ``transformers``' ``output_hidden_states`` numbering (0 = the embeddings, ``num_layers`` = the
    last layer's output), so ``count = 1`` pairs the two models' last layers. Distinct when ``count <= num_layers``.
    """
    if not 1 <= count <= num_layers:
        raise ValueError(f"Pair 1..{num_layers} layers of a {num_layers}-layer model, got {count}.")
    return tuple((2 * k * num_layers + count) // (2 * count) for k in range(1, count + 1))


def teacher_sketch(width: int, rank: int, seed: int = SKETCH_SEED) -> torch.Tensor:
    """float32 ``[width, min(width, rank)]`` with orthonormal columns, a function of ``(width, rank, seed)`` only
    (QR of a seeded Gaussian, signs fixed by R's diagonal). ``width <= rank``: the identity (nothing to reduce)."""
    if width < 1 or rank < 1:
        raise ValueError(f"width and rank must be >= 1, got {width} and {rank}.")
    if width <= rank:
        return torch.eye(width)
    generator = torch.Generator().manual_seed(int(seed))
    gaussian = torch.randn(width, rank, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).float()


@dataclass
class HiddenStateBridge:
    """The frozen map of both models' states into one standardised ``rank``-dimensional space, per layer pair.

    ``targets(t) = (t - teacher_mean) / teacher_scale`` (the teacher's sketched states, each dimension
    standardised) and ``project(s) = (s - student_mean) @ student_map``.
    """

    student_mean: torch.Tensor
    """``[L, d_student]``."""
    student_map: torch.Tensor
    """``[L, d_student, r]``."""
    teacher_mean: torch.Tensor
    """``[L, r]``."""
    teacher_scale: torch.Tensor
    """``[L, r]``, > 0."""

    @classmethod
    def fit(cls, student: torch.Tensor, teacher: torch.Tensor, ridge: float = 1e-3) -> HiddenStateBridge:
        """Fit on paired states ``student [N, L, d_s]`` and ``teacher [N, L, r]`` (the teacher's sketched states).

        Per layer: the map minimises ``|(S - mean_S) W - Z|^2 + lam |W|^2`` with ``Z`` the standardised teacher
        states and ``lam = ridge * trace(Sc^T Sc) / d_s`` (ridge relative to the mean eigenvalue, so it does not
        depend on the states' scale). Computed in float64 from :func:`bridge_statistics` (sums: several
        processes' statistics add up, then :meth:`from_statistics` gives every one the same bridge).
        """
        return cls.from_statistics(bridge_statistics(student, teacher), ridge)

    @classmethod
    def from_statistics(cls, stats: dict[str, torch.Tensor], ridge: float = 1e-3) -> HiddenStateBridge:
        """The bridge :meth:`fit` gives on the paired states whose :func:`bridge_statistics` (summed over any
        number of parts) are ``stats``."""
        n = float(stats["count"])
        if n < 2:
            raise ValueError(f"Fitting the bridge needs at least 2 group ends, got {int(n)}.")
        student_mean = stats["student_sum"] / n  # [L, d_s]
        teacher_mean = stats["teacher_sum"] / n  # [L, r]
        variance = (stats["teacher_square"] / n - teacher_mean**2).clamp_min(0.0)
        teacher_scale = variance.sqrt().clamp_min(1e-6)
        gram = (
            stats["student_outer"] - n * student_mean[:, :, None] * student_mean[:, None, :]
        )  # [L, d_s, d_s]
        cross = stats["cross"] - n * student_mean[:, :, None] * teacher_mean[:, None, :]  # [L, d_s, r]
        width = gram.shape[-1]
        lam = ridge * torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1) / width  # [L]
        eye = torch.eye(width, dtype=gram.dtype, device=gram.device)
        # gram + lam I is symmetric positive definite: a Cholesky solve (torch 2.13's batched LU solve on CPU failed
        # here on such float64 systems with 2 threads, raising a pivot error or returning NaN).
        factor = torch.linalg.cholesky(gram + lam[:, None, None] * eye)
        student_map = torch.cholesky_solve(cross / teacher_scale[:, None, :], factor)
        return cls(student_mean.float(), student_map.float(), teacher_mean.float(), teacher_scale.float())

    @property
    def rank(self) -> int:
        return int(self.student_map.shape[-1])

    def targets(self, teacher: torch.Tensor) -> torch.Tensor:
        """The teacher's sketched states ``[..., L, r]`` standardised: what the student's projections should be."""
        return (teacher.float() - self.teacher_mean) / self.teacher_scale

    def project(self, student: torch.Tensor) -> torch.Tensor:
        """The student's states ``[G, L, d_s]`` in the bridge's space ``[G, L, r]`` (differentiable in them)."""
        return torch.einsum("gld,ldr->glr", student - self.student_mean.to(student.dtype), self.student_map)

    def to(self, device: torch.device | str) -> HiddenStateBridge:
        return HiddenStateBridge(*(x.to(device) for x in self.state_dict().values()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted tensors (what a checkpoint stores; :meth:`from_state_dict` gives the same bridge back)."""
        return {
            "student_mean": self.student_mean,
            "student_map": self.student_map,
            "teacher_mean": self.teacher_mean,
            "teacher_scale": self.teacher_scale,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> HiddenStateBridge:
        return cls(**{name: state[name] for name in cls.__dataclass_fields__})


def bridge_statistics(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sums the bridge is fitted from (float64, on the states' device), for paired states ``student
    [N, L, d_s]`` and ``teacher [N, L, r]``: ``count``, ``student_sum [L, d_s]``, ``student_outer [L, d_s, d_s]``,
    ``teacher_sum [L, r]``, ``teacher_square [L, r]``, ``cross [L, d_s, r]`` (sum of ``s t^T``). Statistics of
    disjoint parts add up (an all-reduce across data-parallel ranks)."""
    if student.ndim != 3 or teacher.ndim != 3 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"Paired states [N, L, width] expected, got {tuple(student.shape)} and {tuple(teacher.shape)}."
        )
    s = student.detach().double().transpose(0, 1)  # [L, N, d_s]
    t = teacher.detach().to(s.device).double().transpose(0, 1)  # [L, N, r]
    return {
        "count": torch.tensor(float(student.shape[0]), dtype=torch.float64, device=s.device),
        "student_sum": s.sum(1),
        "student_outer": s.transpose(1, 2) @ s,
        "teacher_sum": t.sum(1),
        "teacher_square": t.pow(2).sum(1),
        "cross": s.transpose(1, 2) @ t,
    }


def hidden_state_loss(projected: torch.Tensor, targets: torch.Tensor, kind: HiddenStateLoss) -> torch.Tensor:
    """Per-group distance ``[G]`` between the student's projections and the teacher's targets (both ``[G, L, r]``),
    averaged over the layer pairs: ``mse`` = the mean squared difference over the ``r`` dimensions, ``cosine`` =
    ``1 - cos``."""
    if projected.shape != targets.shape:
        raise ValueError(f"Shapes differ: {tuple(projected.shape)} vs {tuple(targets.shape)}.")
    if kind == "mse":
        per_layer = (projected - targets).pow(2).mean(-1)
    elif kind == "cosine":
        per_layer = 1.0 - torch.nn.functional.cosine_similarity(projected, targets, dim=-1, eps=1e-8)
    else:
        raise ValueError(f"Hidden-state loss must be 'mse' or 'cosine', got {kind!r}.")
    return per_layer.mean(-1)


def explained_variance(projected: torch.Tensor, targets: torch.Tensor) -> float:
    """``1 - |P - Z|^2 / |Z - mean Z|^2`` over all groups, layers and dimensions: how much of the teacher's
    standardised states the student's projections account for (1 = all; 0 = no better than the mean)."""
    residual = (projected.detach().float() - targets.float()).pow(2).sum()
    total = (targets.float() - targets.float().mean(0)).pow(2).sum().clamp_min(1e-12)
    return float(1.0 - residual / total)
