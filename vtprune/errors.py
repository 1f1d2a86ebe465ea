"""The errors vtprune raises for bad user input (a bottom module: imports nothing).

Every command turns a `UserInputError` into a one-line `error: ...` and exit status 2 (vtprune/cli_common.py).
"""


class UserInputError(ValueError):
    """Bad input from the user, found before any work starts; the message names the valid choices."""


class PruneConfigError(UserInputError):
    """Bad user input to prune(): unknown method, impossible budget, layer out of range, unsupported model, ..."""
