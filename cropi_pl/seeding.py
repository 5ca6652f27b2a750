"""The run's one seed, and the one seed-derivation function of the package.

A user sets one seed, ``seed_everything``. Every component with a seed of its own (the module's
sampling, the trajectory cache, the projection, the selection and data order) takes that seed
unless its own is set explicitly (:func:`run_seed`), and mixes in its own tag when it derives
streams, so the components do not share a stream. Sampling seeds (per prompt and sample),
projection streams (per block and chunk) and curriculum draws are all derived by
:func:`derive_seed`, so every process and machine gets the same stream for the same parts.
"""

from __future__ import annotations

import hashlib
import os

GLOBAL_SEED_VARIABLE = "PL_GLOBAL_SEED"  # where Lightning's ``seed_everything`` leaves the seed


def run_seed(explicit: int | None = None) -> int:
    """``explicit`` when it is set, else the run's seed (``seed_everything``, which the CLI
    applies before it builds any component), else 0."""
    if explicit is not None:
        return explicit
    return int(os.environ.get(GLOBAL_SEED_VARIABLE, 0))


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of ``str`` of its parts (unlike Python's salted
    ``hash``), usable for ``torch.Generator.manual_seed`` and ``random.Random``."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
