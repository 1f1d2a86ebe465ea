"""`python -m vtprune ...`, `torchrun -m vtprune ...` and `accelerate launch -m vtprune ...` run the CLI."""

from vtprune.cli import app

if __name__ == "__main__":
    app(prog_name="vtprune")
