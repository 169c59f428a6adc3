"""Crash safety: restore the newest checkpoint that reads back intact.

`restore_latest_good` is for resuming with a `tf.train.CheckpointManager`
after a crash: it verifies every tensor's checksum before restoring, and
falls back to the previous checkpoint, with a warning naming the damaged
file, when the newest is truncated, corrupted or missing a file. Nothing on
disk is deleted or rewritten.
"""

import os
import re
import warnings

import tensorflow as tf
# What a save of the live objects would write (keys, shapes, dtypes), to
# compare with a checkpoint before restoring anything. No public API gives
# the keys of a live object graph.
from tensorflow.python.checkpoint import graph_view
from tensorflow.python.checkpoint import save_util
from tensorflow.core.protobuf import trackable_object_graph_pb2

from tf_adamw import state as state_lib

__all__ = ["restore_latest_good"]

# Errors the checkpoint reader raises for damaged files. It is not only
# `tf.errors.OpError`: a truncated data file gives an `IndexError` ("Read less
# bytes than requested") on TF 2.21.
_READ_ERRORS = (tf.errors.OpError, OSError, IndexError, ValueError,
                RuntimeError)


def _checkpoint_problem(prefix):
    """Why the checkpoint at `prefix` cannot be trusted, or None if intact.

    Opens the index and reads every tensor: the reader verifies each
    tensor's CRC32C against the index, so truncated or corrupted data files
    are caught here, before anything is restored.
    """
    index = prefix + ".index"
    if not tf.io.gfile.exists(index):
        return f"checkpoint {prefix!r}: its index file {index!r} is missing"
    try:
        reader = tf.train.load_checkpoint(prefix)
    except _READ_ERRORS as e:
        return (f"checkpoint {prefix!r}: its index file {index!r} cannot be "
                f"read ({type(e).__name__}: {_first_line(e)})")
    data_files = sorted(tf.io.gfile.glob(prefix + ".data-*"))
    if not data_files:
        return (f"checkpoint {prefix!r}: its data file "
                f"{prefix + '.data-00000-of-00001'!r} (or any "
                f"{prefix + '.data-*'!r}) is missing")
    for key in sorted(reader.get_variable_to_shape_map()):
        try:
            reader.get_tensor(key)
        except _READ_ERRORS as e:
            files = ", ".join(repr(f) for f in data_files)
            what = ("is missing a shard" if isinstance(
                e, tf.errors.NotFoundError) else "is truncated or corrupted")
            return (f"checkpoint {prefix!r}: its data file {files} {what}: "
                    f"reading {key!r} failed ({type(e).__name__}: "
                    f"{_first_line(e)})")
    return None


def trackable_paths(root):
    """Every object reachable from `root` as a checkpoint would see it.

    Returns:
        A list of `(path, object)`, breadth first; `path` is the checkpoint
        key prefix ("optimizer", "model/_layers/1", ...), "" for `root`.
    """
    seen = {id(root)}
    out = [("", root)]
    queue = [("", root)]
    while queue:
        path, obj = queue.pop(0)
        try:
            children = tf.train.TrackableView.children(obj)
        except (AttributeError, TypeError):
            continue  # not trackable: a leaf
        for name, child in children.items():
            if id(child) in seen:
                continue
            seen.add(id(child))
            child_path = f"{path}/{name}" if path else name
            out.append((child_path, child))
            queue.append((child_path, child))
    return out


# ----------------------------------------------------------------------------
# Slots follow their variables: what a checkpoint holds for an optimizer's
# slots, checked against the variables it is built with.


def pending_slots(slot_lists, recorded=None):
    """What a restore into an unbuilt optimizer left waiting for its slots.

    Args:
        slot_lists: `{kind: tracked list}` of the (empty) slot lists.
        recorded: the slot guard's record of the same restore
            (`slot_guard.SlotGuard.pending`), or None: the names of slots
            whose checkpoint attributes name none (a `slots.SlotView` is no
            variable, and TF records names of variables only).

    Returns:
        `{kind: {index: (saved name, saved shape)}}`; empty when no restore
        is pending.
    """
    out = {}
    for kind, slot_list in slot_lists.items():
        # Deferred restorations TF keeps per child name until it is created.
        deferred = getattr(slot_list, "_deferred_dependencies", {})
        for name, positions in deferred.items():
            attributes = positions[0].object_proto.attributes
            if attributes and name.isdigit():
                key = attributes[0].checkpoint_key
                full_name = attributes[0].full_name
                if not full_name and recorded:
                    full_name = recorded.get(kind, {}).get(
                        int(name), ("", None))[0]
                out.setdefault(kind, {})[int(name)] = (
                    full_name, list(positions[0].checkpoint.shape_map[key]))
    return out


def saved_slots(reader, optimizer_path):
    """`{kind: {index: (saved name, saved shape)}}` of the optimizer at
    `optimizer_path` in a checkpoint (`tf.train.load_checkpoint`)."""
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    names = {a.checkpoint_key: a.full_name
             for node in graph.nodes for a in node.attributes}
    shapes = reader.get_variable_to_shape_map()
    out = {}
    for kind, attribute in state_lib.SLOT_ATTRIBUTES.items():
        pattern = re.compile(re.escape(f"{optimizer_path}/{attribute}/")
                             + r"(\d+)/\.ATTRIBUTES/VARIABLE_VALUE$")
        for key, shape in shapes.items():
            match = pattern.match(key)
            if match:
                out.setdefault(kind, {})[int(match.group(1))] = (
                    names.get(key, ""), list(shape))
    return out


def slot_problem(saved, expected):
    """Why `saved` slots cannot be the slots of `expected`, or None.

    Args:
        saved: `{kind: {index: (name, shape)}}` from a checkpoint.
        expected: the same for the optimizer's own variables.

    Returns:
        A message naming the variables involved, or None when every saved
        slot has its variable: same kinds, count, shapes and order.
    """
    if not saved:
        return None  # the checkpoint holds no slots (saved before build)
    if set(saved) != set(expected):
        return (f"the checkpoint holds slots {sorted(saved)} but this "
                f"optimizer keeps {sorted(expected)} (e.g. `amsgrad`, "
                "`use_ema` or `gradient_accumulation_steps` differ)")
    for kind in sorted(saved):
        got, want = saved[kind], expected[kind]
        if sorted(got) != list(range(len(want))):
            return (f"the checkpoint holds {kind} slots for {len(got)} "
                    f"variables but this optimizer is built with "
                    f"{len(want)}")
        names = [got[i][0] for i in range(len(want))]
        own = [want[i][0] for i in range(len(want))]
        if names != own and sorted(names) == sorted(own) and len(
                set(own)) == len(own):
            i = next(i for i in range(len(own)) if names[i] != own[i])
            return (f"the variables are in another order: {kind} slot {i} "
                    f"is {names[i]!r} in the checkpoint but {own[i]!r} here; "
                    "build the optimizer with the variables in the order "
                    "they had when the checkpoint was written")
        for i in range(len(want)):
            if got[i][1] != want[i][1]:
                return (f"{kind} slot {i} has shape {got[i][1]} in the "
                        f"checkpoint ({got[i][0]!r}) but {want[i][1]} here "
                        f"({want[i][0]!r})")
    return None


def _slot_problems(checkpoint, reader):
    """`slot_problem` of every built `tf_adamw.AdamW` in `checkpoint`'s
    object graph (an unbuilt one checks its pending slots at `build()`)."""
    from tf_adamw import optimizer as optimizer_lib  # pylint: disable=import-outside-toplevel
    problems = []
    for path, obj in trackable_paths(checkpoint):
        if isinstance(obj, optimizer_lib.AdamW) and obj.built:
            own = {}
            for i, variable in enumerate(obj.var_list):
                for kind, slot in obj.slots_for(variable).items():
                    own.setdefault(kind, {})[i] = (
                        re.sub(r":\d+$", "", slot.name), slot.shape.as_list())
            problem = slot_problem(saved_slots(reader, path), own)
            if problem:
                problems.append(f"the optimizer at {path!r}: {problem}")
    return problems


def _live_tensors(checkpoint):
    """`{checkpoint key: (shape, dtype)}` a save of `checkpoint` would write
    now (objects not created yet, e.g. an unbuilt optimizer's slots, are
    not there: they restore when created)."""
    serialized = save_util.serialize_graph_view(
        graph_view.ObjectGraphView(checkpoint))[0]
    out = {}
    for tensors in serialized.values():
        for key, value in tensors.items():
            if isinstance(value, dict):  # {slice spec: tensor}
                value = next(iter(value.values()))
            tensor = getattr(value, "tensor", value)  # a SaveSpec or a tensor
            if callable(tensor):
                tensor = tensor()
            out[key] = (tensor.shape.as_list(), tensor.dtype.base_dtype)
    return out


def _mismatch(checkpoint, prefix):
    """Why restoring `prefix` into `checkpoint` would fail or be partial: a
    live value the checkpoint lacks, or one of another shape or dtype.
    None when every live value has its match."""
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    problems = []
    for key, (shape, dtype) in sorted(_live_tensors(checkpoint).items()):
        if key == "_CHECKPOINTABLE_OBJECT_GRAPH":
            continue
        if key not in shapes:
            problems.append(f"{key!r} is not in the checkpoint")
        elif list(shapes[key]) != shape or dtypes[key] != dtype:
            problems.append(
                f"{key!r} is {dtypes[key].name}{list(shapes[key])} in the "
                f"checkpoint but {dtype.name}{shape} here")
    problems.extend(_slot_problems(checkpoint, reader))
    if not problems:
        return None
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return "; ".join(problems[:5]) + more


def _first_line(error):
    text = getattr(error, "message", None) or str(error)
    return text.strip().splitlines()[0] if text.strip() else repr(error)


def _checkpoint_number(prefix):
    match = re.search(r"-(\d+)$", prefix)
    return int(match.group(1)) if match else -1


def _candidates(manager_or_directory):
    """Checkpoint prefixes, oldest first, and the directory they are in."""
    if isinstance(manager_or_directory, tf.train.CheckpointManager):
        directory = manager_or_directory.directory
        listed = list(manager_or_directory.checkpoints)
        latest = manager_or_directory.latest_checkpoint
    elif isinstance(manager_or_directory, (str, os.PathLike)):
        directory = os.fspath(manager_or_directory)
        listed, latest = [], None
        try:
            state = tf.train.get_checkpoint_state(directory)
        except _READ_ERRORS as e:
            state = None
            warnings.warn(
                f"The checkpoint state file in {directory!r} cannot be read "
                f"({_first_line(e)}); looking for checkpoints on disk.",
                RuntimeWarning, stacklevel=3)
        if state is not None:
            listed = list(state.all_model_checkpoint_paths)
            latest = state.model_checkpoint_path or None
    else:
        raise TypeError(
            "Argument `manager_or_directory` must be a "
            "`tf.train.CheckpointManager` or a directory path. Received: "
            f"{manager_or_directory!r} of type "
            f"{type(manager_or_directory).__name__}."
        )
    if latest and latest not in listed:
        listed.append(latest)
    if not listed:
        # No state file (or an empty one): checkpoints may still be on disk,
        # e.g. the state file was lost. Starting from scratch would overwrite
        # them, so use what is there.
        found = sorted(
            (p[:-len(".index")] for p in
             tf.io.gfile.glob(os.path.join(directory, "*.index"))),
            key=lambda p: (_checkpoint_number(p), p))
        if found:
            warnings.warn(
                f"No checkpoint state file lists the checkpoints in "
                f"{directory!r}; using the {len(found)} found on disk.",
                RuntimeWarning, stacklevel=3)
        listed = found
    return listed, directory


def _restore_matching(checkpoint, prefix):
    """Restores the intact checkpoint `prefix` if it fits `checkpoint`.

    Raises:
        ValueError: it does not fit; refused before anything is restored.
    """
    mismatch = _mismatch(checkpoint, prefix)
    if mismatch:
        raise ValueError(
            f"Checkpoint {prefix!r} does not match the objects of "
            f"`checkpoint`, so nothing was restored: {mismatch}")
    status = checkpoint.restore(prefix)
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise ValueError(
            f"Checkpoint {prefix!r} does not match the objects of "
            f"`checkpoint`: {e}") from e


def restore_latest_good(checkpoint, manager_or_directory):
    """Restores the newest intact checkpoint; falls back past damaged ones.

    For resuming after a crash. The candidates are the checkpoints the
    `tf.train.CheckpointManager` (or the directory's `checkpoint` state file)
    lists, newest first. Each is verified before anything is restored: the
    index must exist and parse, and every tensor must read back with a
    matching checksum. A damaged checkpoint is skipped with a
    `RuntimeWarning` naming the file and what is wrong, and the previous one
    is tried. Nothing on disk is deleted or modified: the next save with the
    same number overwrites a damaged checkpoint.

    A SIGKILL during `CheckpointManager.save` does not leave a damaged
    checkpoint in the list (TF writes the data, then the index, then
    atomically the state file); the verification is for files damaged after
    the fact (a full disk, a bad copy, truncation by other tools). Such a
    kill does leave a `<prefix>-N_temp/` directory holding a partly written
    data file, which TensorFlow never removes (not even when checkpoint N
    is saved again); it is never read, and it is safe to delete when no
    save is running.

    Verification reads every tensor once more than a plain restore does.

    Args:
        checkpoint: the `tf.train.Checkpoint` to restore into.
        manager_or_directory: a `tf.train.CheckpointManager`, or the
            directory it writes to.

    Returns:
        The prefix of the checkpoint restored, or None if there is no
        checkpoint (a fresh start).

    Raises:
        ValueError: there are checkpoints but none is intact (the message
            lists each one and its problem), or the checkpoint does not match
            `checkpoint`'s objects.
    """
    candidates, directory = _candidates(manager_or_directory)
    problems = []
    for prefix in reversed(candidates):
        problem = _checkpoint_problem(prefix)
        if problem is not None:
            problems.append(problem)
            warnings.warn(f"Skipping a damaged checkpoint: {problem}.",
                          RuntimeWarning, stacklevel=2)
            continue
        _restore_matching(checkpoint, prefix)
        return prefix
    if problems:
        raise ValueError(
            f"No intact checkpoint in {directory!r}; refusing to start from "
            "scratch over saved state. Problems: " + "; ".join(problems))
    return None
