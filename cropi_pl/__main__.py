"""``python -m cropi_pl fit|validate|test --config configs/X.yaml``."""

from cropi_pl.host_memory import huge_pages_for_large_tensors

huge_pages_for_large_tensors()  # before cropi_pl.cli imports torch: PyTorch reads it once

from cropi_pl.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
