"""`python -m vtprune ...`, `torchrun -m vtprune ...` and `accelerate launch -m vtprune ...` run the CLI."""

from vtprune.cli import main

if __name__ == "__main__":
    main()
