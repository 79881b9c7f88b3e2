"""Single-machine GOLD backend: HF ``generate`` rollouts, a Ray (or in-process) teacher, AdamW; CPU or one GPU.

Entry point: :func:`gold_plugin.local.cli.main` (``launchers/train_gold.py --backend local ...``).
"""
