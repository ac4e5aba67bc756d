"""Orbax checkpoints of one run: the train state and the data position, saved together.

The data loader is stateless (batch k is a pure function of the seed and
k), so its position is the step; it is saved beside the state with the
corpus fingerprint, and a resume against different data is refused rather
than silently training on the wrong text. Orbax writes each step to a
temporary folder and renames it when complete, so a killed save never
leaves a checkpoint that looks whole.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from etils import epath

from scaling.errors import UserError


class Checkpointer:
    def __init__(self, directory: Path | epath.Path, max_to_keep: int):
        # A local folder is made absolute (orbax needs it); gs://... is used as it is.
        if not str(directory).startswith("gs://"):
            directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            epath.Path(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "data"),
        )

    def save(self, step: int, state, corpus_fingerprint: str):
        """Save (asynchronously) the state after `step` updates and the next data position."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_savable(state)),
                data=ocp.args.JsonSave({"next_step": step, "corpus": corpus_fingerprint}),
            ),
        )

    def restore_latest(self, state, shardings, corpus_fingerprint: str):
        """(state, step) from the newest checkpoint, or (state, 0) if there is none.

        The restored arrays get `shardings`, which may come from a different
        mesh than the one that saved them.
        """
        step = self._manager.latest_step()
        if step is None:
            return state, 0
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            _savable(state),
            _savable(shardings),
        )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
            ),
        )
        if restored["data"]["corpus"] != corpus_fingerprint:
            raise UserError(
                f"the checkpoint at step {step} in {self._manager.directory} was trained on "
                "different data than the config now names; restore the data settings or "
                "delete that run folder to start over"
            )
        saved = restored["state"]
        state = state.replace(step=saved["step"], params=saved["params"],
                              opt_state=saved["opt_state"])
        return state, int(restored["data"]["next_step"])

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def _savable(state):
    # The train state minus its static fields (apply_fn, tx), as a plain dict.
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}
