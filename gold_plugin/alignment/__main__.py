"""``python -m gold_plugin.alignment --student DIR --teacher DIR (--text "..." | --dataset FILE.jsonl)``."""

from gold_plugin.alignment.inspector import main

if __name__ == "__main__":
    raise SystemExit(main())
