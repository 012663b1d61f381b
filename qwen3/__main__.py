"""`python -m qwen3` is the same as the `qwen3` console script (and what torchrun launches)."""

from qwen3.cli import main

if __name__ == "__main__":
    main()
