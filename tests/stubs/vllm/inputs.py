"""Import-only stand-in (see tests/stubs/README.md)."""


class TokensPrompt(dict):
    pass
