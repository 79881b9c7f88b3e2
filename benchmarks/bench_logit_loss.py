"""Time and peak memory of the aligned logit loss (forward + backward) on the same inputs, in one process:

1. ``chunked``: :func:`gold_plugin.signals.aligned_logit_loss` (chunked, analytic backward);
2. ``full-vocab``: :func:`gold_plugin.testing.references.aligned_logit_loss_reference`, the same loss written
   straightforwardly over the whole vocabulary with autograd;
3. ``projected``: :func:`gold_plugin.signals.projected_logit_loss`, the byte projection of the student onto the
   teacher's candidates at every teacher position (real tokenizers: Qwen student, GPT-2 teacher, on
   number-heavy text; as many teacher positions as ``--positions``, top-k = ``--topk``), side by side with 1;
4. ``trl``: TRL 1.16's hybrid ULD loss (``trl.experimental.gold.gold_trainer.ULDLoss``, its real code, built from a
   minimal config object and two vocabularies) on the full teacher logits the top-k were taken from.

Peak memory is the peak *above* what was allocated before the call (the inputs): CUDA via
``torch.cuda.max_memory_allocated``; CPU via the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``, with glibc told to return large blocks to the OS at once). Times are medians.

Run (GPU):  python3 benchmarks/bench_logit_loss.py --device cuda
Run (CPU):  python3 benchmarks/bench_logit_loss.py --device cpu --positions 1024
Only torch (and numpy) are required; without ``trl`` the TRL column is skipped with a message.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gold_plugin.signals import aligned_logit_loss  # noqa: E402
from gold_plugin.signals.logit import LogitLossOptions, ProjectionVocab, projected_logit_loss  # noqa: E402
from gold_plugin.testing.references import aligned_logit_loss_reference  # noqa: E402
from gold_plugin.testing.trl_reference import trl_uld_config  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--positions", type=int, default=4096, help="aligned positions in total")
    parser.add_argument(
        "--samples", type=int, default=4, help="sequences the positions are split into (TRL loops over them)"
    )
    parser.add_argument("--vocab", type=int, default=151_936, help="student vocabulary (Qwen2/3 size)")
    parser.add_argument("--teacher-vocab", type=int, default=151_936)
    parser.add_argument(
        "--matched-share", type=float, default=0.66, help="share of teacher ids that map to a student id"
    )
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument(
        "--chunk-size", type=int, nargs="+", default=[1024, 256], help="one or more chunk sizes to measure"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per implementation (default 3 cuda, 1 cpu)"
    )
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["chunked", "full-vocab", "projected", "trl"]
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class Memory:
    """Peak memory above the current allocation, for CUDA or for the CPU process."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cpu":
            try:
                libc = ctypes.CDLL("libc.so.6")
                libc.mallopt(
                    -3, 1 << 16
                )  # M_MMAP_THRESHOLD: large blocks are mmapped, so freeing returns them
                self._trim = libc.malloc_trim
            except OSError:
                self._trim = None

    def _rss_kib(self, key: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key):
                    return int(line.split()[1])
        raise RuntimeError(f"{key} not in /proc/self/status")

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            if self._trim is not None:
                self._trim(0)
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # reset the peak resident set (VmHWM) to the current one
            self.base = self._rss_kib("VmRSS:") * 1024

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return self._rss_kib("VmHWM:") * 1024 - self.base


def synthetic_vocabularies(
    vocab: int, teacher_vocab: int, matched_share: float, gen: torch.Generator
) -> tuple[dict[str, int], dict[str, int], torch.Tensor]:
    """Token strings for both sides: a share of the teacher ids have a student token with the same string."""
    student = {f"s{i}": i for i in range(vocab)}
    num_matched = min(int(round(matched_share * teacher_vocab)), vocab)
    targets = torch.randperm(vocab, generator=gen)[:num_matched].tolist()
    matched_teacher_ids = torch.randperm(teacher_vocab, generator=gen)[:num_matched].tolist()
    teacher_to_student = torch.full((teacher_vocab,), -1, dtype=torch.int64)
    names = [f"t{i}" for i in range(teacher_vocab)]
    for t_id, s_id in zip(matched_teacher_ids, targets):
        names[t_id] = f"s{s_id}"
        teacher_to_student[t_id] = s_id
    teacher = {name: i for i, name in enumerate(names)}
    return student, teacher, teacher_to_student


def make_trl_loss(
    student_vocab: dict[str, int], teacher_vocab: dict[str, int], beta: float, device: torch.device
):
    """TRL's ULDLoss with the hybrid loss on, positional pairing (use_extended_uld=False), no CE term."""
    try:
        from trl.experimental.gold.gold_trainer import ULDLoss
    except Exception as error:  # noqa: BLE001 - any import failure means: no TRL column
        print(f"[trl] skipped: cannot import trl.experimental.gold ({type(error).__name__}: {error})")
        return None
    config = trl_uld_config(beta=beta)

    class VocabOnly:
        def __init__(self, vocab: dict[str, int]) -> None:
            self._vocab = vocab

        def get_vocab(self) -> dict[str, int]:
            return dict(self._vocab)

    return ULDLoss(config, VocabOnly(student_vocab), VocabOnly(teacher_vocab), device=device)


def run_timed(
    name: str, fn: Callable[[], torch.Tensor], leaf: torch.Tensor, memory: Memory, repeats: int, warmup: bool
) -> dict[str, float] | None:
    def once() -> tuple[float, int, float]:
        leaf.grad = None
        memory.start()
        start = time.perf_counter()
        loss = fn()
        loss.backward()
        if leaf.device.type == "cuda":
            torch.cuda.synchronize(leaf.device)
        elapsed = time.perf_counter() - start
        peak = memory.peak_bytes()
        value = float(loss.detach())
        del loss
        return elapsed, peak, value

    try:
        if warmup:
            once()
        runs = [once() for _ in range(repeats)]
    except torch.OutOfMemoryError as error:
        print(f"[{name}] out of memory: {str(error).splitlines()[0]}")
        leaf.grad = None
        return None
    result = {
        "time_s": statistics.median(r[0] for r in runs),
        "peak_bytes": max(r[1] for r in runs),
        "loss": runs[-1][2],
    }
    print(
        f"[{name}] loss {result['loss']:.6f}  time {result['time_s'] * 1e3:9.1f} ms  "
        f"peak extra memory {result['peak_bytes'] / 2**20:9.1f} MiB",
        flush=True,
    )
    return result


def projection_inputs_for(positions: int, samples: int, per_sample: int, topk: int, device: torch.device):
    """Projection inputs of ``positions`` teacher positions over ``samples`` rows of ``per_sample`` actions.

    Student: the Qwen tokenizer (single digits, whole CJK words; its logits are padded to --vocab), teacher:
    GPT-2 (multi-digit tokens, CJK as byte pieces), so both segment the same text differently in both
    directions. Teacher top-k: the teacher's own token plus random ids with random log-probs (the cost does
    not depend on the values).
    """
    import numpy as np

    from gold_plugin.alignment import align, encode_continuation, text_for_teacher
    from gold_plugin.alignment.sorted_vocab import sorted_vocab
    from gold_plugin.packaged_tokenizers import load_packaged_tokenizer
    from gold_plugin.signals.logit import projection_inputs

    student, teacher = load_packaged_tokenizer("qwen"), load_packaged_tokenizer("gpt2")
    rng = np.random.default_rng(0)
    vocab = sorted_vocab(student, teacher)
    alignments, ids, top_ids, top_lp = [], [], [], []
    quota = positions // samples
    for _ in range(samples):
        vocabulary = [" total", "東京都", "価格は", "北京大学", "の人口は"]
        words = [f"{w}{rng.integers(0, 1000)}" for w in rng.choice(vocabulary, 400)]
        s_ids = student.encode(" ".join(words), add_special_tokens=False)[:per_sample]
        t_ids = encode_continuation(teacher, text_for_teacher(student, s_ids))
        alignment = align(student, s_ids, teacher, t_ids)
        cand = rng.integers(0, len(teacher), size=(len(t_ids), topk))
        cand[:, 0] = t_ids
        if len(t_ids) < quota:
            raise SystemExit(f"only {len(t_ids)} teacher tokens in a sample of {per_sample}; need {quota}")
        cand[quota:] = -1  # exactly `quota` teacher positions per sample
        lp = np.log(rng.dirichlet(np.ones(topk), size=len(t_ids)) * 0.95).astype(np.float32)
        alignments.append(alignment)
        ids.append(np.asarray(s_ids))
        top_ids.append(cand)
        top_lp.append(lp)
    mask = torch.ones(samples, per_sample, dtype=torch.bool)
    start = time.perf_counter()
    inputs = projection_inputs(vocab, alignments, ids, top_ids, top_lp, mask.to(device))
    print(
        f"[projected] {inputs.num_positions} teacher positions ({int((inputs.consumed > 0).sum())} inside a student "
        f"token), {int((inputs.range_lo < inputs.range_hi).sum())} candidate ranges; inputs built on the CPU in "
        f"{(time.perf_counter() - start) * 1e3:.0f} ms"
    )
    return inputs, ProjectionVocab.from_sorted(vocab, device)


def trl_parity(trl_fn, mapping: torch.Tensor, vocab: int, teacher_vocab: int, device: torch.device) -> float:
    """|ours - TRL| on a few positions where the definitions coincide.

    Top-k = the whole teacher vocabulary, TRL's normalisation, float64, and logits spread little enough that no
    probability falls under the 1e-8 that TRL clamps probabilities to before taking logs.
    """
    rows = 4
    gen = torch.Generator(device=device).manual_seed(1)
    s = torch.randn(1, rows, vocab, generator=gen, device=device, dtype=torch.float64) * 0.5
    t = torch.randn(1, rows, teacher_vocab, generator=gen, device=device, dtype=torch.float64) * 0.5
    labels = torch.zeros(1, rows, dtype=torch.long, device=device)
    with torch.no_grad():
        trl_value = float(trl_fn(s, t, labels, labels, labels, labels))
        values, ids = torch.log_softmax(t[0], dim=-1).topk(teacher_vocab, dim=-1)
        ours = aligned_logit_loss(
            s,
            ids,
            values,
            mapping,
            positions=torch.stack([torch.zeros(rows, dtype=torch.int64), torch.arange(rows)], 1).to(device),
            options=LogitLossOptions(beta=trl_fn.beta, matched_normalization="none", chunk_size=rows),
        ).loss.mean()
    return abs(float(ours) - trl_value)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "CUDA is not available here: run with --device cpu (and --positions 1024 for a quick run)."
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if device.type == "cuda" else 1)
    dtype = getattr(torch, args.dtype)
    if args.positions % args.samples:
        raise SystemExit("--positions must be a multiple of --samples")
    per_sample = args.positions // args.samples
    gen = torch.Generator().manual_seed(args.seed)
    student_vocab, teacher_vocab, mapping = synthetic_vocabularies(
        args.vocab, args.teacher_vocab, args.matched_share, gen
    )
    mapping = mapping.to(device)
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), torch "
        f"{torch.__version__}, dtype {args.dtype}; positions {args.positions} in {args.samples} samples, student "
        f"vocab {args.vocab}, teacher vocab {args.teacher_vocab}, matched share {args.matched_share}, top-k "
        f"{args.topk}, chunk sizes {args.chunk_size}, beta {args.beta}"
    )
    torch.manual_seed(args.seed)
    student_logits = (torch.randn(args.samples, per_sample, args.vocab, device=device) * 2).to(dtype)
    teacher_logits = (torch.randn(args.samples, per_sample, args.teacher_vocab, device=device) * 2).to(dtype)
    with torch.no_grad():
        values, ids = torch.log_softmax(teacher_logits.float(), dim=-1).topk(args.topk, dim=-1)
    top_ids, top_values = ids.reshape(args.positions, -1), values.reshape(args.positions, -1)
    flat = torch.arange(args.positions, device=device)
    positions = torch.stack([flat // per_sample, flat % per_sample], 1)  # (sample, column) of every position
    leaf = student_logits.requires_grad_()
    memory = Memory(device)
    warmup = device.type == "cuda"
    results: dict[str, dict[str, float] | None] = {}

    chunked_names = []
    for chunk_size in [] if "chunked" in args.skip else args.chunk_size:
        name = f"chunked({chunk_size})"
        chunked_names.append(name)
        results[name] = run_timed(
            name,
            lambda chunk_size=chunk_size: aligned_logit_loss(
                leaf,
                top_ids,
                top_values,
                mapping,
                positions=positions,
                options=LogitLossOptions(beta=args.beta, chunk_size=chunk_size),
            ).loss.mean(),
            leaf,
            memory,
            repeats,
            warmup,
        )
    if "projected" not in args.skip:
        inputs, projection_vocab = projection_inputs_for(
            args.positions, args.samples, per_sample, args.topk, device
        )
        for chunk_size in args.chunk_size:
            name = f"projected({chunk_size})"
            results[name] = run_timed(
                name,
                lambda chunk_size=chunk_size: projected_logit_loss(
                    leaf,
                    inputs,
                    projection_vocab,
                    options=LogitLossOptions(beta=args.beta, chunk_size=chunk_size),
                ).loss.mean(),
                leaf,
                memory,
                repeats,
                warmup,
            )
    if "full-vocab" not in args.skip:
        results["full-vocab"] = run_timed(
            "full-vocab",
            lambda: aligned_logit_loss_reference(
                leaf.reshape(args.positions, -1),
                top_ids,
                top_values,
                mapping,
                options=LogitLossOptions(beta=args.beta),
            ).mean(),
            leaf,
            memory,
            repeats,
            warmup,
        )
    trl_fn = None if "trl" in args.skip else make_trl_loss(student_vocab, teacher_vocab, args.beta, device)
    if trl_fn is not None:
        labels = torch.zeros(args.samples, per_sample, dtype=torch.long, device=device)
        results["trl"] = run_timed(
            "trl",
            lambda: trl_fn(leaf, teacher_logits, labels, labels, labels, labels),
            leaf,
            memory,
            repeats,
            warmup,
        )
        print(
            "[parity] |ours - TRL| where the definitions coincide (4 positions, top-k = whole teacher vocabulary, "
            f"matched_normalization='none', float64): "
            f"{trl_parity(trl_fn, mapping, args.vocab, args.teacher_vocab, device):.2e} (target <= 1e-5)"
        )

    full = results.get("full-vocab")
    for name in chunked_names:
        if results.get(name) and full:
            print(
                f"[check] {name} vs full-vocab loss: |diff| = {abs(results[name]['loss'] - full['loss']):.2e} "
                "(same definition)"
            )
    print("\nratios, lower is better:")
    for chunk_size in args.chunk_size:
        ours, base = results.get(f"projected({chunk_size})"), results.get(f"chunked({chunk_size})")
        if ours and base:
            print(
                f"  projected({chunk_size}) vs chunked({chunk_size}): peak memory "
                f"{ours['peak_bytes'] / base['peak_bytes']:.3f} (target <= 1.2)  time "
                f"{ours['time_s'] / base['time_s']:.3f} (target <= 1.5)"
            )
    for name in chunked_names:
        for other in ("full-vocab", "trl"):
            ours, theirs = results.get(name), results.get(other)
            if ours and theirs:
                print(
                    f"  {name:15s} vs {other:10s}: peak memory {ours['peak_bytes'] / theirs['peak_bytes']:.3f}  "
                    f"time {ours['time_s'] / theirs['time_s']:.3f}"
                )
            else:
                print(f"  {name:15s} vs {other:10s}: not measured")


if __name__ == "__main__":
    main()
