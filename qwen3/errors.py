"""One exception type for mistakes a user can fix (a bad path, value or file).

The command line prints its message alone and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """An error caused by the user's input; its message says what is wrong and where."""
