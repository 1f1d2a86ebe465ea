"""`python -m vtprune.eval eval|sweep|compare|tasks ...` -- the evaluation commands without vtprune/cli.py."""

from vtprune.eval.commands import main

if __name__ == "__main__":
    main()
