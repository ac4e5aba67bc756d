"""A stand-in for `gcloud`, `xpk`, `git` and `python3`: records its argument list, fakes a slice.

Installed by tests under those names in a folder put first on PATH. Every
call appends {"tool": NAME, "argv": [...]} as one JSON line to $FAKE_LOG.
The slice's state lives in $FAKE_DIR/state:

    ... create         the state becomes ACTIVE (READY for tpu-vm create)
    ... describe       prints the state; exit 1 once the slice was deleted
    ... delete         the slice is gone
    tpu-vm ssh (the trainer's command, "launch.cli run"):
        while $FAKE_DIR/preempt holds N > 0: N -= 1, state SUSPENDED, exit 255
        while $FAKE_DIR/fail holds N > 0: N -= 1, exit 1 (the slice stays ACTIVE)
        while $FAKE_DIR/notice holds N > 0: N -= 1, exit 143 (the trainer saved at a
        preemption notice; the slice still answers ACTIVE)
"""

import json
import os
import sys
from pathlib import Path

tool, argv = Path(sys.argv[0]).name, sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({"tool": tool, "argv": argv}) + "\n")

state_dir = Path(os.environ.get("FAKE_DIR", "."))


def take(counter: str) -> bool:
    path = state_dir / counter
    left = int(path.read_text()) if path.exists() else 0
    if left > 0:
        path.write_text(str(left - 1))
    return left > 0


if tool == "gcloud":
    state = state_dir / "state"
    verb = next((a for a in ("create", "describe", "delete", "ssh", "scp") if a in argv), None)
    if verb == "create":
        state.write_text("READY" if "tpu-vm" in argv else "ACTIVE")
    elif verb == "describe":
        if not state.exists() or state.read_text() == "GONE":
            sys.exit(1)
        print(state.read_text())
    elif verb == "delete":
        state.write_text("GONE")
    elif verb == "ssh" and "launch.cli run" in argv[argv.index("--command") + 1]:
        if take("preempt"):
            state.write_text("SUSPENDED")
            sys.exit(255)
        if take("fail"):
            sys.exit(1)
        if take("notice"):
            sys.exit(143)
