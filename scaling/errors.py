"""The exception type for mistakes a user can fix, and the one for a preempted run.

The command line catches a UserError once and prints it as a single line
(``error: ...``) with its exit code (2 unless a subclass says otherwise), and
a Preempted as one line with exit code 143; anything else is a bug and keeps
its traceback.
"""


def first_line(error: BaseException, limit: int | None = 160) -> str:
    """The first line of ``error``'s message (at most ``limit`` characters), or its type's
    name when the message is empty: how a library's long error is quoted in one line.

    A longer line keeps its start and its end: libraries such as TensorStore nest their
    errors as "what failed: inside which step: ... : the cause", so the end is the part
    that says what to do about it.
    """
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if limit is None or len(line) <= limit:
        return line
    head = limit * 2 // 5
    return f"{line[:head]} ... {line[len(line) - (limit - head - 5) :]}"


class UserError(Exception):
    """A bad input: the message names the problem and the fix."""

    exit_code = 2


class Preempted(Exception):
    """A run stopped at a preemption notice after saving a checkpoint at `step`
    (launch/preemption.py): not a mistake and not a failure; the relaunch resumes it."""

    # 128 + SIGTERM: what a shell reports for a process that SIGTERM ended, so a notice
    # answered and a process the notice killed read alike to every backend's retry logic.
    exit_code = 143

    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}; the checkpoint there resumes it")
        self.step = step
