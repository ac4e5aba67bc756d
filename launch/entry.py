"""The `scaling` command's entry point: Ctrl-C exits with code 130 and one line, at any moment.

Python turns Ctrl-C into KeyboardInterrupt wherever the main thread is. launch/cli.py catches
it around every command (a run marks itself pending, a store's transaction rolls back, a TPU
slice is released), but three places crash on it instead: the imports before a command starts;
any import of a compiled extension (jaxlib, MLIR, tensorstore), whose initialiser calls back
into Python and aborts (SIGABRT or SIGSEGV) when the exception comes through; and the
interpreter's teardown after an interrupt cut a compile short, which runs XLA's C++
destructors over half-built state. In all three nothing is left to save, so the process ends
at once (os._exit) instead of raising. And where Python cannot raise at all (a GC callback,
such as XLA's, or a __del__), it would print the interrupt and go on as if none had come:
there it is sent again, and raised at the next line that can.
"""

import _thread
import os
import signal
import sys

INTERRUPTED = 130  # 128 + SIGINT, what shells report for a command stopped by Ctrl-C


def _exit_interrupted(signum, frame):
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(INTERRUPTED)


def _inside_import(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _interrupt(signum, frame):
    """KeyboardInterrupt, as Python's own handler raises, except inside an import."""
    if _inside_import(frame):
        _exit_interrupted(signum, frame)
    raise KeyboardInterrupt


def _unraisable(unraisable, _previous=sys.unraisablehook):
    """An interrupt raised where Python cannot raise it (a GC callback such as XLA's, a
    __del__) is printed and dropped by default, and the command goes on; here it is sent
    again, to be raised at the next line that can raise it."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        # From another thread, started without waiting for it (threading.Thread.start
        # waits, and the handler would run in that wait): sent from this one, Python would
        # run the handler at once, still inside the place that cannot raise.
        _thread.start_new_thread(os.kill, (os.getpid(), signal.SIGINT))
        return
    _previous(unraisable)


def _on_interrupt(handler) -> None:
    # A command started in the background by a non-interactive shell has SIGINT ignored:
    # it stays ignored, as the shell asked.
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, handler)


def finish(code: int) -> None:
    """Exit with `code`; after an interrupt, without the interpreter's teardown."""
    _on_interrupt(_exit_interrupted)
    sys.stdout.flush()
    sys.stderr.flush()
    if code == INTERRUPTED:
        os._exit(INTERRUPTED)
    sys.exit(code)


def guard_imports() -> None:
    """From here until run_guarded, Ctrl-C ends the process at once with 130 (the imports
    before a command starts have nothing to save)."""
    _on_interrupt(_exit_interrupted)


def run() -> None:
    """`scaling ...`: launch/cli.py's main() with the interrupt guarded around it."""
    guard_imports()
    from launch import cli  # imported after the guard is in place

    run_guarded(cli.main)


def run_guarded(main) -> None:
    """Run `main()` with KeyboardInterrupt outside imports, then exit with its code.

    The raising handler goes in and comes out again inside the try: an interrupt pending
    as either happens is raised right there, and outside the try it would end the process
    with a traceback (exit -2) instead of 130.
    """
    sys.unraisablehook = _unraisable
    try:
        _on_interrupt(_interrupt)
        code = main()
        _on_interrupt(_exit_interrupted)
    except KeyboardInterrupt:  # before main's own handler is in place (parsing the arguments)
        _on_interrupt(_exit_interrupted)
        print("interrupted", file=sys.stderr, flush=True)
        code = INTERRUPTED
    finish(code)
