"""Import-only stand-in (see tests/stubs/README.md)."""

import uuid


def random_uuid() -> str:
    return uuid.uuid4().hex
