"""Import-only stand-in (see gold_plugin/testing/stubs/README.md): packing needs the real flash-attn."""


def _unavailable(*args, **kwargs):
    raise RuntimeError("flash-attn is not installed: sample packing is unavailable on this machine.")


index_first_axis = pad_input = rearrange = unpad_input = _unavailable
