"""Slots follow their variables in a plain `tf.train.Checkpoint` restore.

`tf.train.Checkpoint` restores an optimizer's slot lists (`_momentums/0`,
...) by position. In checkpoints, `AdamW` therefore has one more child, a
`SlotGuard` (`_slot_guard`), recording which variables the slots belong to:
per slot kind and position, the slot's name (which holds its variable's
name, e.g. `adamw/dense_kernel_momentum`) and shape. Restored into a built
optimizer, it compares that with the optimizer's own slots
(`checkpoints.slot_problem`) and refuses a mismatch with a `ValueError`.

The record is the name of the guard's one child, in the checkpoint's object
graph: no tensor is written, so the checkpoint's keys and values are those
of before, and nothing changes for code that lists or compares them.

Why the refusal comes before anything is assigned (TF 2.21,
`tensorflow/python/checkpoint/restore.py`): a restore first walks the object
graph, breadth first (`CheckpointPosition._restore_descendants`), binding
each saved object to a live one (`_queue_children_for_restoration`, which
asks each live object `_lookup_dependency(saved child name)`); only then,
in one call (`_CheckpointRestoreCoordinator.restore_saveables`), does it
read and assign every value. The guard checks in `_lookup_dependency`, during
the walk, so a refusal leaves every object of that restore unchanged, the
model's variables included. The guard is the optimizer's first child, so
the walk reaches it before the slot lists: a saved slot without a live one
(a checkpoint of more variables) is not left waiting on the list for a
`build()` that never comes (`_deferred_dependencies`). Objects the restore
could not bind because they did not exist yet (deferred restoration, e.g.
an unbuilt Keras layer, or any object the walk reached before the guard)
are not covered: they may still get the refused checkpoint's values when
created.

Checkpoints written before the guard existed have no `_slot_guard`: they
restore as before, by position, unchecked. Neither the guard nor its child
has a value, so `assert_consumed()` does not miss them in old checkpoints,
and code without the guard ignores them in new ones. SavedModels do not
hold the guard (`AdamW._trackable_children` adds it for checkpoints only).
"""

import json
import re

import tensorflow as tf

from tf_adamw import checkpoints

# The guard's name among the optimizer's checkpoint children.
CHILD_NAME = "_slot_guard"
_FORMAT = 1


def describe(slot_lists):
    """`{kind: {index: (slot name, shape)}}` of the slots in `slot_lists`
    (`{kind: list}`); kinds without slots (not in use, or not built yet)
    are left out."""
    return {kind: {i: (re.sub(r":\d+$", "", slot.name),
                       slot.shape.as_list())
                   for i, slot in enumerate(slots)}
            for kind, slots in slot_lists.items() if len(slots)}


def _as_text(slots):
    """`describe`'s result as the JSON the guard records."""
    return json.dumps(
        {"format": _FORMAT,
         "slots": {kind: [list(by_index[i]) for i in range(len(by_index))]
                   for kind, by_index in slots.items()}},
        sort_keys=True, separators=(",", ":"))


def parse(text):
    """A record of `_as_text` as `{kind: {index: (name, shape)}}`; None for
    text that is not one (another format: not checked)."""
    try:
        saved = json.loads(text)
    except ValueError:
        return None
    if not isinstance(saved, dict) or saved.get("format") != _FORMAT:
        return None
    return {kind: {i: (name, list(shape))
                   for i, (name, shape) in enumerate(slots)}
            for kind, slots in saved["slots"].items()}


class SlotGuard(tf.__internal__.tracking.Trackable):
    """Records which variables an optimizer's slots belong to; refuses a
    restore of other variables' slots into the built optimizer.

    Args:
        slot_lists: `{kind: tracked list}` of the optimizer's slot lists
            (made empty in `__init__`, extended by `build()`).
    """

    def __init__(self, slot_lists):
        self._slot_lists = slot_lists
        # The record a restore into the unbuilt optimizer brought: `build()`
        # takes the slots' names from it where the checkpoint's attributes
        # name none (packed slots, `checkpoints.pending_slots`).
        self.pending = None
        # The child whose name is the record. It holds no value.
        self._record = tf.__internal__.tracking.Trackable()

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        del save_type, kwargs
        return {_as_text(describe(self._slot_lists)): self._record}

    def _lookup_dependency(self, name, cached_dependencies=None):
        """Called by a restore with the saved record, before any value is
        assigned (see the module docstring).

        Raises:
            ValueError: the saved slots belong to other variables.
        """
        saved = parse(name)
        own = describe(self._slot_lists)
        if saved is not None and not own:
            self.pending = saved
        # Unbuilt: `build()` checks the slots the restore left waiting
        # (`checkpoints.pending_slots`).
        if saved is not None and own:
            problem = checkpoints.slot_problem(saved, own)
            if problem:
                raise ValueError(
                    "The checkpoint's optimizer slots belong to other "
                    "variables than this optimizer's, so nothing was "
                    f"restored: {problem}.")
        children = cached_dependencies or self._trackable_children()
        return children.get(name)
