"""Orbax checkpoints of the train state and the data iterator.

Saves are asynchronous (the device-to-host copy happens before ``save`` returns, so the donated
state may be reused at once) and atomic: Orbax writes into a temporary directory and renames it
when every item is complete, and ``latest_step`` only sees finished checkpoints, so a process
killed mid-save resumes from the previous one. The last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import pathlib

import grain
import orbax.checkpoint as ocp


class Checkpointer:
  """The train state (``state``) and the grain iterator's position (``data``) under one step."""

  def __init__(self, directory: str | pathlib.Path, keep: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                           create=True)
    self._manager = ocp.CheckpointManager(
        pathlib.Path(directory).absolute(), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iterator) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)))

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Returns the state at ``step`` (in ``abstract_state``'s shardings).

    With ``data_iterator`` the iterator is also moved to the saved position, in place.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def wait(self) -> None:
    """Blocks until every pending save is finished on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
