"""Ctrl-C at any moment of a command ends it with exit code 130: no traceback, no crash."""

import signal
import subprocess
import sys
import time

import pytest

from launch import entry
from scaling.store import RunRecord, Store

READY = "started"  # the child's first line on stderr, once the interpreter is up


def _store(path):
    """Six finished runs on a power law: something for `scaling fit` to bootstrap."""
    with Store(str(path)) as store:
        for i in range(6):
            run_id = f"run{i}"
            n = 1000 * 3**i
            store.register_run(RunRecord(run_id, {}, n, 2 * n, 1, 8, 1, 16, 10**6, 1e12), sweep="s")
            store.log_eval(run_id, 100, {"eval_loss": 2.0 + 5.0 * n**-0.3})
            store.set_status(run_id, "finished", step=100)
        store.add_sweep("s", {}, [f"run{i}" for i in range(6)])


def _interrupted(argv, after_s):
    """SIGINT `after_s` after the child says it is past the interpreter's own start-up.

    Counted from that line, not from the fork: on a busy machine start-up alone can outlast
    the first moments, and an interrupt inside `site` is Python's own fatal error, which no
    code of ours runs early enough to guard."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stderr.readline()
    assert first == f"{READY}\n", first
    time.sleep(after_s)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def _fit_argv(start: str, store, preload: str = "") -> list[str]:
    """`scaling fit` of `_store`'s sweep, started by the Python code `start`.

    SIGINT goes back to Python's own handler first: a runner started in the background by a
    script hands its children SIGINT ignored (and a preexec_fn would fork this JAX process).
    `preload` runs before the child says it is ready: the import of the module that holds
    the guard, which no code of that module can guard.
    """
    reset = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        + (f"{preload}; " if preload else "")
        + f"print({READY!r}, file=sys.stderr, flush=True); "
    )
    fit = ["fit", "--store", str(store), "--sweep", "s", "--law", "saturating"]
    return [sys.executable, "-c", reset + start, *fit]


def test_ctrl_c_during_fit_exits_130_at_every_moment(tmp_path):
    # The moments cover the imports (launch.cli, then jax inside the command), XLA's
    # compile and the bootstrap; before the guard, 2 of 9 such moments ended in SIGABRT
    # or SIGSEGV (an interrupt inside a compiled extension's initialiser) and others in
    # a traceback.
    _store(tmp_path / "s.sqlite")
    # Counted from launch.entry imported, as `scaling` imports it: an interrupt while Python
    # reads that module (slow on a busy machine's first run) comes before its guard exists.
    argv = _fit_argv("run()", tmp_path / "s.sqlite", preload="from launch.entry import run")
    argv += ["--what", "final", "--bootstrap", "3000"]
    codes = []
    for after_s in (0.05, 0.2, 0.35, 0.45, 0.6, 0.8, 1.2):
        code, out, err = _interrupted(argv, after_s)
        codes.append(code)
        assert code in (0, 130), (after_s, code, err[-2000:])
        assert "Traceback" not in err, (after_s, err[-2000:])
        if code == 130:
            assert err.strip().splitlines()[-1].startswith("interrupted"), err
    assert codes.count(130) >= 3, codes  # most moments land before the fit ends


def test_ctrl_c_while_a_backends_trainer_starts_exits_130(tmp_path):
    """`python -m launch.cli` (how every backend starts a trainer) guards its own imports."""
    _store(tmp_path / "s.sqlite")
    argv = _fit_argv(
        "import runpy; runpy.run_module('launch.cli', run_name='__main__', alter_sys=True)",
        tmp_path / "s.sqlite",
    )
    # From 0.15 s: before it, runpy is compiling cli.py, which no code of ours can guard
    # (nor can `scaling`, for its first few milliseconds).
    for after_s in (0.15, 0.2, 0.25, 0.3, 0.4):
        code, out, err = _interrupted(argv, after_s)
        assert code in (0, 130), (after_s, code, err[-2000:])
        assert "Traceback" not in err, (after_s, err[-2000:])


# A child whose signal.signal sends SIGINT to itself as run_guarded swaps a handler: "in"
# just after the raising handler goes in, "out" just before it comes out again (main has
# returned). os.kill to its own process runs the handler before returning, so the interrupt
# lands at the exact moment a slow machine can only hit by chance.
_SWAP_CHILD = """
import os, signal, sys
from launch import entry
real, sent = signal.signal, []
def send_once():
    if not sent:
        sent.append(True)
        print("sent", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGINT)
def swap(signum, handler):
    if WHEN == "out" and handler is entry._exit_interrupted:
        send_once()
    previous = real(signum, handler)
    if WHEN == "in" and handler is entry._interrupt:
        send_once()
    return previous
signal.signal = swap
entry.run_guarded(lambda: 0)
"""


@pytest.mark.parametrize("when", ["in", "out"])
def test_an_interrupt_as_the_handler_goes_in_or_out_exits_130(when):
    child = subprocess.run(
        [sys.executable, "-c", f"WHEN = {when!r}\n" + _SWAP_CHILD],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.stderr.startswith("sent\n"), child.stderr
    assert child.returncode == 130, (child.returncode, child.stderr)
    assert "Traceback" not in child.stderr, child.stderr
    assert child.stderr.strip().splitlines()[-1] == "interrupted"


def test_an_interrupt_inside_an_import_is_recognised():
    import importlib
    import inspect

    frames = []

    class Probe:
        def find_spec(self, name, path=None, target=None):
            if name == "probe_for_interrupt_test":
                frames.append(inspect.currentframe())
            return None

    sys.meta_path.insert(0, Probe())
    try:
        try:
            importlib.import_module("probe_for_interrupt_test")
        except ModuleNotFoundError:
            pass
    finally:
        sys.meta_path.pop(0)
    assert frames and entry._inside_import(frames[0])
    assert not entry._inside_import(inspect.currentframe())


def test_an_interrupt_python_could_not_raise_is_sent_again():
    """Raised inside a GC callback or a __del__, KeyboardInterrupt is only printed by default
    and the command goes on; the hook sends SIGINT again instead."""
    import types

    got, other = [], []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        entry._unraisable(types.SimpleNamespace(exc_value=KeyboardInterrupt()), other.append)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:  # sent from a thread, raised here
            time.sleep(0.01)
        entry._unraisable(types.SimpleNamespace(exc_value=ValueError("x")), other.append)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert got == [signal.SIGINT]
    assert len(other) == 1 and isinstance(other[0].exc_value, ValueError)
