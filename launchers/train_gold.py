"""GOLD launcher: ``ray job submit -- python launchers/train_gold.py [OpenRLHF options] [--gold.* options]``.

``--backend openrlhf`` (default) runs OpenRLHF's Ray PPO pipeline with the GOLD experience maker, trainer and
policy actor; ``--backend local`` runs the single-machine backend (:mod:`gold_plugin.cli` picks it). ``--dry_run``
validates and prints the run. See docs/openrlhf.md and docs/local.md.
"""

from __future__ import annotations

import os
import sys

# Running from a checkout (or a Ray job's working_dir) without `pip install`: make `gold_plugin` importable.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from gold_plugin.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
