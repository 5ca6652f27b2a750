"""The one seed-derivation function of the package.

Sampling seeds (per prompt and sample), projection streams (per block and chunk) and curriculum
draws are all derived here, so every process and machine gets the same stream for the same parts.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of ``str`` of its parts (unlike Python's salted
    ``hash``), usable for ``torch.Generator.manual_seed`` and ``random.Random``."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
