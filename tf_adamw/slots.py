"""How each variable's slots are stored: the two `slot_layout`s.

- `"separate"` (the default): one variable per slot (`momentum`,
  `velocity`, ...).
- `"packed"`: one variable per model variable, of shape
  `[number of slot kinds, *variable.shape]`, whose rows are its slots in
  `state.slot_kinds` order. A step under XLA then passes and writes two
  buffers per variable (the variable and its slots) instead of three to
  six: XLA's cost per buffer, not arithmetic, is most of a step on many
  small variables (benchmarks/README.md, "Packed slots"). The fused CPU
  kernel reads either layout through its slot table (`packed_rows`).

With packed slots, users and checkpoints see each slot through a
`SlotView`: it has the slot's name, shape and dtype, reads and assigns its
row, and saves and restores as a variable of that shape under the same
checkpoint key, so checkpoints of both layouts are interchangeable.

The step reads and writes a variable's slots through `SeparateSlots` or
`PackedSlots` (`for_update`): the packed one reads the variable once and
writes all its rows as one value.
"""

import typing

import numpy as np
import tensorflow as tf

from tf_adamw import distribute

# The checkpoint attribute of a variable's value (`.ATTRIBUTES/VARIABLE_VALUE`).
_VALUE_KEY = "VARIABLE_VALUE"


class SlotView(tf.__internal__.tracking.Trackable):
    """One slot of a variable, as row `row` of its packed `store`.

    Reads and assigns like the slot variable of the separate layout, and
    checkpoints as one (same key, shape and dtype). A view of a distributed
    `store` assigns every replica's copy.
    """

    def __init__(self, store, row, name, shape):
        self._store = store
        self._row = row
        self._name = name  # without ":0", e.g. "adamw/dense_kernel_momentum"
        self._shape = tf.TensorShape(shape)

    @property
    def store(self):
        """The packed variable (one row per slot kind)."""
        return self._store

    @property
    def row(self):
        """This slot's row of `store`."""
        return self._row

    @property
    def name(self):
        return self._name + ":0"

    @property
    def shape(self):
        return self._shape

    @property
    def dtype(self):
        return self.store.dtype

    @property
    def device(self):
        return self.store.device

    trainable = False

    def get_shape(self):
        return self._shape

    def read_value(self):
        """The slot's value: row `row` of `store`."""
        return unstack(self.store.read_value())[self._row]

    value = read_value

    def numpy(self):
        return self.read_value().numpy()

    def __array__(self, dtype=None):
        return np.asarray(self.numpy(), dtype=dtype)

    def assign(self, value, use_locking=None, name=None, read_value=True):
        """Sets the slot to `value` (every replica's copy).

        Raises:
            ValueError: `value` does not have the slot's shape.
        """
        del use_locking, name
        value = tf.convert_to_tensor(value, dtype=self.dtype)
        if not value.shape.is_compatible_with(self._shape):
            raise ValueError(
                f"Cannot assign a value of shape {value.shape} to the slot "
                f"{self._name!r} of shape {self._shape}.")
        for copy in distribute.copies(self.store):
            with tf.device(copy.device):
                rows = unstack(copy.read_value())
                rows[self._row] = value
                copy.assign(tf.stack(rows), read_value=False)
        return self.read_value() if read_value else None

    def local(self, local):
        """This view on `local(store)` (a replica's copy of it)."""
        return SlotView(local(self.store), self._row, self._name,
                        self._shape)

    def copies(self):
        """A view of this row on each replica's copy of `store`."""
        return tuple(SlotView(copy, self._row, self._name, self._shape)
                     for copy in distribute.copies(self.store))

    def __repr__(self):
        return (f"<tf_adamw.SlotView {self.name!r} shape={self._shape} "
                f"dtype={self.dtype.name} (row {self._row} of "
                f"{self.store.name!r})>")

    def _export_to_saved_model_graph(self, object_map, tensor_map, options,
                                     **kwargs):
        # A SavedModel saves the copies of variables it makes in its own
        # graph: the view saved reads the copy of `store`.
        del tensor_map, options, kwargs
        object_map[self] = _ExportedView(self, object_map)
        return []

    # A checkpoint holds the row as a variable of the slot's shape.
    def _serialize_to_tensors(self):
        if tf.executing_eagerly():
            return {_VALUE_KEY: self.read_value()}
        # Traced (a SavedModel saves these functions): loading a SavedModel
        # runs it before it restores the store (which has a value of its
        # own there); until then it gives zeros.
        return {_VALUE_KEY: tf.cond(
            self._initialized(), self.read_value,
            lambda: tf.zeros(self._shape, self.dtype))}

    def _restore_from_tensors(self, restored_tensors):
        value = restored_tensors[_VALUE_KEY]
        if not value.shape.is_compatible_with(self._shape):
            raise ValueError(
                f"Received incompatible tensor with shape {value.shape} when "
                f"attempting to restore the slot {self._name!r} of shape "
                f"{self._shape}.")
        value = tf.cast(value, self.dtype)
        if tf.executing_eagerly():
            self.assign(value, read_value=False)
            return None

        def assign():
            self.assign(value, read_value=False)
            return tf.constant(True)

        # As above: a store not restored yet is left to its own restore.
        return tf.cond(self._initialized(), assign,
                       lambda: tf.constant(False))

    def _initialized(self):
        return tf.reduce_all([
            tf.raw_ops.VarIsInitializedOp(resource=copy.handle)
            for copy in distribute.copies(self.store)])


class _ExportedView(SlotView):
    """A `SlotView` in a SavedModel's graph: of the copy made there of its
    store (found when used: the store may be copied after the view)."""

    def __init__(self, view, object_map):
        super().__init__(view.store, view.row, view._name, view.shape)  # pylint: disable=protected-access
        self._object_map = object_map

    @property
    def store(self):
        return self._object_map.get(self._store, self._store)


def unstack(store_value):
    """The rows of a packed variable's value, as a list.

    One `Unpack` op, not a slice per row: traced for XLA, each slice
    (`StridedSlice`, `Gather`) costs tf2xla ~0.7 ms per node, against
    ~0.3 ms for unpacking and re-stacking all rows (1,000 variables of
    3 rows, `experimental_get_compiler_ir`).
    """
    return tf.unstack(store_value, num=store_value.shape[0])


def _view_to_tensor(view, dtype=None, name=None, as_ref=False):
    del name, as_ref
    value = view.read_value()
    if dtype is not None and not dtype.is_compatible_with(value.dtype):
        raise ValueError(
            f"Incompatible type conversion requested to type {dtype.name} "
            f"for the slot {view.name!r} of type {value.dtype.name}.")
    return value


tf.register_tensor_conversion_function(SlotView, _view_to_tensor)


class Stores(tf.__internal__.tracking.Trackable):
    """The packed variables of an optimizer, as one SavedModel child.

    Checkpoints hold the slots through their views; a SavedModel also
    needs the variables its functions capture, and these are they.
    """

    def __init__(self, stores):
        self._stores = stores  # the engine's list, extended by build()

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        del save_type, kwargs
        return {str(i): store for i, store in enumerate(self._stores)}

    def _lookup_dependency(self, name, cached_dependencies=None):
        del cached_dependencies
        if name.isdigit() and int(name) < len(self._stores):
            return self._stores[int(name)]
        return None


def create_packed(variable, tf_var, kinds, dtype, prefix, slot_name,
                  zeros=tf.zeros):
    """The packed variable of `tf_var`'s slots `kinds` (zeros, `dtype`)
    and a `SlotView` of each: `(store, {kind: view})`. Made where the
    caller's scope and colocation say.

    `slot_name(variable, kind)` names the slots as the separate layout
    does; the store is named for the kind `"slots"`. `zeros(shape, dtype)`
    makes its initial value.
    """
    shape = tf_var.shape.as_list()
    store = tf.Variable(
        zeros([len(kinds)] + shape, dtype), trainable=False,
        name=f"{prefix}/{slot_name(variable, 'slots')}",
        aggregation=tf.VariableAggregation.NONE)
    return store, {kind: SlotView(store, row,
                                  f"{prefix}/{slot_name(variable, kind)}",
                                  shape)
                   for row, kind in enumerate(kinds)}


def local_slot(slot, local):
    """`local(slot)` for a slot variable; a view on the local copy of its
    store for a `SlotView`."""
    if isinstance(slot, SlotView):
        return slot.local(local)
    return local(slot)


def copies(slot):
    """Every replica's copy of a slot variable or view."""
    if isinstance(slot, SlotView):
        return slot.copies()
    return distribute.copies(slot)


# ----------------------------------------------------------------------------
# The step's access to one variable's momentum, velocity, velocity hat
# (AMSGrad) and average (EMA): `read()`, then one `write()` of new values
# (and of its accumulator, with gradient accumulation).
# They are `tf.function` arguments of the traced update (NamedTuples: the
# variables become inputs, the rows part of the trace's signature).


class SeparateSlots(typing.NamedTuple):
    """Slot variables (None for a kind not in use, or not written)."""
    momentum: typing.Any
    velocity: typing.Any
    velocity_hat: typing.Any = None
    average: typing.Any = None
    accumulator: typing.Any = None  # written, never read here

    def read(self):
        """`(None, [value or None for momentum, velocity, velocity hat,
        average])`."""
        return None, [None if s is None else s.read_value()
                      for s in self[:4]]

    def write(self, read, values):
        """Assigns `values`, one per field (None: leave that slot alone);
        `read` is what `read()` returned first."""
        del read
        for slot, value in zip(self, values):
            if slot is not None and value is not None:
                slot.assign(value, read_value=False)


class PackedSlots(typing.NamedTuple):
    """Rows of one packed variable (None for a kind not in use, or not
    written)."""
    store: typing.Any
    # (momentum, velocity, velocity_hat, average, accumulator) rows.
    rows: tuple
    count: int  # rows of `store`
    # Every row's value, when the step has read the store already (for its
    # accumulator, `read_slot`): not read a second time.
    values: typing.Any = None

    def read(self):
        """`(every row, [row value or None for momentum, velocity,
        velocity hat, average])`: one read of the variable."""
        # `value()`: the read alone (`read_value()` adds an Identity, one op
        # more per variable to trace).
        rows = (unstack(self.store.value()) if self.values is None
                else list(self.values))
        return rows, [None if r is None else rows[r] for r in self.rows[:4]]

    def write(self, read, values):
        """Writes the store once: `values` in their rows (None: unchanged),
        the other rows as `read` (`read()`'s first value) holds them."""
        by_row = {r: v for r, v in zip(self.rows, values)
                  if r is not None and v is not None}
        self.store.assign(tf.stack([by_row[r] if r in by_row else read[r]
                                    for r in range(self.count)]),
                          read_value=False)


def read_slot(slot):
    """`(value, rows)`: the value of a slot variable or view, and for a
    view every row of its store as read with it (`for_update`'s `values`),
    else None."""
    if isinstance(slot, SlotView):
        rows = unstack(slot.store.value())
        return rows[slot.row], rows
    return slot.read_value(), None


def for_update(momentum, velocity, velocity_hat=None, average=None,
               accumulator=None, values=None):
    """`PackedSlots` when the slots are views of one store, else
    `SeparateSlots`; `values`: the store's rows if read already
    (`read_slot`)."""
    slots = (momentum, velocity, velocity_hat, average, accumulator)
    if isinstance(momentum, SlotView):
        store = momentum.store
        return PackedSlots(
            store, tuple(None if s is None else s.row for s in slots),
            int(store.shape[0]), values)
    return SeparateSlots(*slots)
