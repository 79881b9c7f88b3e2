"""Self-contained GOLD demo (nothing from a hub): 2-digit addition, teacher and student with different tokenizers.

1. Byte-level BPE tokenizers trained here (:data:`~gold_plugin.demo.tokenizers.PAIRS`). The demo's pair is the
   hard case: the teacher writes numbers digit by digit (like Qwen), the student's tokenizer merges digit runs
   into multi-digit tokens (like Llama-3); no token has the same id in both and their EOS tokens differ, so the
   teacher reaches the student only through the byte alignment, and the logit loss must project the student onto
   the teacher's digits by bytes (``--gold.logit_projection bytes``, the default; docs/signals.md).
2. A tiny Llama teacher is fine-tuned on the training sums to high held-out accuracy (cached in the run dir).
3. A tiny Llama student is fine-tuned briefly (stopped at 25% accuracy), then trained on-policy with GOLD,
   reward-free, by the local backend.
4. A table of held-out greedy accuracy (student before, student after, teacher) and a plot of the student's
   accuracy at every evaluation against the teacher's (``<run_dir>/demo_accuracy.png``).

The demo prints the table, the plot's path and one progress bar, nothing else (``environment.quiet``: no Ray,
DeepSpeed or transformers messages, no warnings; only while the demo runs), and pins what makes its figures move
between runs (``environment.pinned``: one torch thread, seeds, torch's deterministic algorithms).

One concept per module: ``task`` (the addition task, its reward and dataset files), ``task_reward`` (that reward
as a ``--reward.remote_url`` file), ``tokenizers`` (the tokenizer kinds and pairs), ``models`` (the tiny Llama and
its supervised fine-tuning), ``prepare`` (the cached teacher and student), ``environment`` (quiet and pinned),
``report`` (table and plot), ``run`` (the ``--demo`` option values and the run). The demo builds on the local
backend; the local backend imports the demo only for ``--demo``, from its command line.
"""
