"""The one exception type for mistakes a user can fix.

The command line catches it once and prints it as a single line
(``error: ...``) with its exit code (2 unless a subclass says otherwise);
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A bad input: the message names the problem and the fix."""

    exit_code = 2
