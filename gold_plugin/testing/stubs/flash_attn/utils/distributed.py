"""Import-only stand-in (see gold_plugin/testing/stubs/README.md)."""


def all_gather(*args, **kwargs):
    raise RuntimeError("flash-attn is not installed: ring attention is unavailable on this machine.")
