"""Import-only stand-in (see tests/stubs/README.md)."""


def all_gather(*args, **kwargs):
    raise RuntimeError("flash-attn is not installed: ring attention is unavailable on this machine.")
