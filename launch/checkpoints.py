"""Orbax checkpoints of one run: the train state and the data position, saved together.

The data loader is stateless (batch k is a pure function of the seed and
k), so its position is the step; it is saved beside the state with the
corpus fingerprint, and a resume against different data is refused rather
than silently training on the wrong text. Orbax writes each step to a
temporary folder and renames it when complete, so a killed save never
leaves a checkpoint that looks whole; the temporary folders a kill leaves
are removed on the next start.

A checkpoint can still be damaged after it was written (a truncated copy, a
disk error, a half-synced folder): one without orbax's commit marker
(`commit_success.txt`, written last) or one that fails to restore is moved
aside to `damaged_checkpoints/` next to the checkpoint folder, the fact is
printed on stderr, and the run resumes from the next older one.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from etils import epath

from scaling import faults
from scaling.errors import UserError, first_line

COMMIT_MARKER = "commit_success.txt"  # orbax writes it into a step folder when the save is done
# Bytes per parameter of one checkpoint: float32 params and AdamW's two
# float32 moments. The margin covers orbax's metadata and the state the
# estimate leaves out (the step counter, the schedule's count).
BYTES_PER_PARAM = 3 * 4
DISK_MARGIN = 1.5


def check_disk_space(directory: Path, n_params: int) -> int:
    """Bytes one checkpoint of `n_params` parameters needs; UserError if `directory` (or the
    folder it will be created in) has less free space than that."""
    need = int(n_params * BYTES_PER_PARAM * DISK_MARGIN)
    existing = Path(directory).absolute()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < need:
        raise UserError(
            f"checkpoint directory {str(directory)!r} has {_size(free)} free but one checkpoint "
            f"of {n_params:,} parameters needs about {_size(need)} (float32 params and two Adam "
            f"moments, x{DISK_MARGIN} margin); free some space or point --config.workdir=PATH "
            "at a larger disk"
        )
    return need


def _size(n_bytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n_bytes < 1000:
            return f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.1f} TB"


class Checkpointer:
    def __init__(self, directory: Path | epath.Path, max_to_keep: int):
        # A local folder is made absolute (orbax needs it); gs://... is used as it is.
        if not str(directory).startswith("gs://"):
            directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            epath.Path(directory),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
            ),
            item_names=("state", "data"),
        )
        self.restored_loop: dict = {}

    def save(self, step: int, state, corpus_fingerprint: str, loop: dict | None = None):
        """Save (asynchronously) the state after `step` updates and the next data position;
        `loop` (JSON) is what the training loop needs to log on resume as it would have."""
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(_savable(state)),
                    data=ocp.args.JsonSave(
                        {"next_step": step, "corpus": corpus_fingerprint, "loop": loop or {}}
                    ),
                ),
            )
        except Exception as e:  # this save, or the previous one still in flight
            raise self._save_failed(e) from e
        faults.point("checkpoint_save")  # tests: a kill here leaves an uncommitted save

    def steps(self) -> list[int]:
        """The steps saved here, oldest first."""
        return sorted(self._manager.all_steps())

    def restore_latest(self, state, shardings, corpus_fingerprint: str):
        """(state, step) from the newest good checkpoint, or (state, 0) if there is none;
        the `loop` it was saved with is then in `self.restored_loop`.

        A damaged checkpoint is moved aside (see the module doc) and the next
        older one tried. The restored arrays get `shardings`, which may come
        from a different mesh than the one that saved them.
        """
        savable, savable_shardings = _savable(state), _savable(shardings)
        for key in savable.keys() - savable_shardings.keys():
            # A part the shardings do not name (the noise-scale scalars) keeps its own.
            savable_shardings[key] = jax.tree.map(lambda x: x.sharding, savable[key])
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            savable,
            savable_shardings,
        )
        for step in reversed(self.steps()):
            restored, problem = self._try_restore(step, target)
            if problem:
                self._set_aside(step, problem)
                continue
            if restored["data"]["corpus"] != corpus_fingerprint:
                raise UserError(
                    f"the checkpoint at step {step} in {self._manager.directory} was trained on "
                    "different data than the config now names; restore the data settings or "
                    "delete that run folder to start over"
                )
            self.restored_loop = restored["data"].get("loop", {})
            saved = restored["state"]
            state = state.replace(**saved)
            return state, int(restored["data"]["next_step"])
        return state, 0

    def _try_restore(self, step: int, target):
        """(restored, None), or (None, what is wrong with the checkpoint at `step`)."""
        if not (epath.Path(self._manager.directory) / str(step) / COMMIT_MARKER).exists():
            return None, f"no {COMMIT_MARKER}: its save never finished"
        try:
            return self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
                ),
            ), None
        # Orbax and TensorStore report a damaged file as a bare Exception, an
        # OSError, a KeyError (missing item) or a ValueError (bad JSON): any of
        # them means this checkpoint cannot be used, and an older one may be.
        except Exception as e:  # noqa: BLE001
            first_line = (str(e).strip().splitlines() or [""])[0][:160]
            return None, f"restore failed: {type(e).__name__}: {first_line}"

    def _set_aside(self, step: int, problem: str):
        directory = epath.Path(self._manager.directory)  # a local folder or gs://...
        aside = directory.parent / "damaged_checkpoints" / f"{step}-{time.time_ns()}"
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            _move_tree(directory / str(step), aside)
            print(
                f"checkpoint at step {step} in {directory} is damaged ({problem}); moved it "
                f"to {aside} and resuming from the previous one",
                file=sys.stderr,
                flush=True,
            )
        else:
            while (directory / str(step)).exists():  # process 0 moves it; wait and agree
                time.sleep(0.1)
        self._manager.reload()

    def close(self):
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # the last save failed in the background
            raise self._save_failed(e) from e
        self._manager.close()

    def _save_failed(self, error: Exception) -> UserError:
        """One line for a save that could not be written (storage unreachable after its
        client's retries, a full disk): the steps saved before it are whole, and an unfinished
        save is never restored (it has no commit marker), so a relaunch resumes from those."""
        return UserError(
            f"saving a checkpoint to {self._manager.directory} failed ({first_line(error, 200)}); "
            "the run resumes from its last complete checkpoint: relaunch once that storage is "
            "reachable"
        )


def _move_tree(source: epath.Path, target: epath.Path):
    """Rename a folder; in a bucket, copy each object and then delete the folder (what a
    rename there is anyway, without the move API an HNS bucket or an emulator may lack)."""
    if not str(source).startswith("gs://"):
        source.rename(target)
        return
    for path in source.iterdir():  # epath refuses rglob in a bucket: one listing a level
        if path.is_dir():
            _move_tree(path, target / path.name)
        else:
            path.copy(target / path.name)
    source.rmtree()


def _savable(state):
    # The train state minus its static fields (apply_fn, tx), as a plain dict;
    # with the gradient noise scale on, its moving averages too, so a resumed
    # run logs the same noise_scale as an uninterrupted one.
    savable = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    if getattr(state, "noise_ema", None) is not None:
        savable["noise_ema"] = state.noise_ema
    return savable
