"""`python -m vtprune ...`, `torchrun -m vtprune ...` and `accelerate launch -m vtprune ...` run the CLI."""

from __future__ import annotations


def _main() -> None:
    try:
        import vtprune.cli as cli
    except ModuleNotFoundError as exc:
        if exc.name != "vtprune.cli":
            raise
        # Without vtprune/cli.py, the evaluation commands alone.
        from vtprune.eval.commands import build_app

        build_app()(prog_name="vtprune")
        return
    if hasattr(cli, "main"):
        cli.main()
    else:
        cli.app(prog_name="vtprune")


if __name__ == "__main__":
    _main()
