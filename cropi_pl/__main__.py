"""``python -m cropi_pl fit|validate|test --config configs/X.yaml``."""

from cropi_pl.cli import main

if __name__ == "__main__":
    main()
