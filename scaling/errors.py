"""The one exception type for mistakes a user can fix.

The command line catches it once and prints it as a single line
(``error: ...``) with exit code 2; anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """A bad input: the message names the problem and the fix."""
