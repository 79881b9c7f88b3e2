"""Import-only stand-in for vLLM on CPU (see tests/stubs/README.md)."""

__version__ = "0.0.0+cpu-stub"


class SamplingParams:
    """Holds the keyword arguments OpenRLHF passes; never used to sample."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("vLLM is not installed: this is the CPU import stand-in from tests/stubs.")


LLM = AsyncLLMEngine = AsyncEngineArgs = _Unavailable
