"""Import-only stand-in for flash-attn on CPU (see tests/stubs/README.md)."""

__version__ = "0.0.0+cpu-stub"
