"""Import-only stand-in for flash-attn on CPU (see gold_plugin/testing/stubs/README.md)."""

__version__ = "0.0.0+cpu-stub"
