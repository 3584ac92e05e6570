"""Orbax checkpoints of a training run: the train state and a JSON record beside it.

Both trainers keep theirs this way (`train`, the transformer; `vqgan_train`, the VQGAN),
one directory per step under WORKDIR/checkpoints:

    N/state/   the train state pytree (StandardSave), restored straight into the
               shardings of an abstract state
    N/meta/    a JSON object: the data position and whatever else the trainer needs to
               resume exactly

Orbax writes step N into `N.orbax-checkpoint-tmp*` and renames it to `N` once complete;
`latest_step()` lists complete steps only, so a run killed during a save resumes from the
previous complete checkpoint.

Asynchronous saves and the donated state. Both train steps donate the state
(`donate_argnums=0`), so the arrays handed to `save` are deleted by the next step while
an async save may still be writing. That is safe with Orbax 0.12: in `save`, before it
returns, every array is copied to host memory in the caller's thread
(`replica_slices.transfer_arrays_to_host`, which blocks on `np.asarray`); only the file
writes from those host copies run in the background. (Orbax moves some of the copies to
the background only when `save_device_host_concurrent_bytes` is set; this module does not
set it.) On the CPU backend the "host copy" can be a view of the device buffer itself;
XLA's CPU client then copies the buffer instead of donating it, because a buffer with an
outside reference cannot be donated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The JSON item's name. Transformer checkpoints written before both trainers shared this
# module call it "data" (e.g. runs/*/checkpoints/N/data): `restore` reads either.
META = "meta"
LEGACY_META = ("data",)


class Checkpoints:
    """An Orbax CheckpointManager over one directory of (state, JSON metadata) steps.

    Args:
      directory: WORKDIR/checkpoints; created if missing.
      keep: how many of the latest checkpoints to keep.
      async_save: write in a background thread while training goes on (module docstring:
        safe with a donated state). `wait_until_finished` or `close` waits for it.
    """

    def __init__(self, directory: str | Path, keep: int, *, async_save: bool = False):
        import orbax.checkpoint as ocp  # noqa: PLC0415 - heavy import, needed by trainers only

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        """The latest complete step; None when there is none."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Checkpoint `state` (a pytree of arrays) and `meta` (JSON-able) as step `step`.

        A step already on disk is kept as it is (a trainer may ask twice for its last
        step: at `checkpoint_every` and at the end).
        """
        if step in self.manager.all_steps():
            return
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), **{META: ocp.args.JsonSave(meta)}), force=True)

    def restore(self, step: int, abstract: Any) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of step `step`, the state shaped and sharded like `abstract`.

        Args:
          abstract: a pytree like the saved state: ShapeDtypeStructs with shardings, or
            arrays (their shardings are used).
        """
        ocp = self._ocp
        # Which name the JSON item has on disk: each item is a folder of the step's folder,
        # named `N` by the manager's default step names. (Not `manager.metadata(step)`: it
        # logs a warning for every item this fresh manager has no handler for yet.)
        step_dir = self.directory / str(step)
        name = next((n for n in (META, *LEGACY_META) if (step_dir / n).is_dir()), META)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), **{name: ocp.args.JsonRestore()}))
        return out["state"], dict(out[name])

    def wait_until_finished(self) -> None:
        """Block until a background save is complete on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for background saves, then release the manager."""
        self.manager.close()
