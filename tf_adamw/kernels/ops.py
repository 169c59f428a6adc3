"""The fused AdamW kernel's ops, as the optimizer calls them.

Each wrapper runs an op of the library `tf_adamw.kernels.loader` loads; it
raises RuntimeError when the kernel is unavailable (check `load()` first).
"""

from tf_adamw.kernels import loader


def slot_table(momentums, velocities, velocity_hats):
    """A `TfAdamwSlotTable`: one device's slots, for `fused_apply`.

    Args:
        momentums, velocities: float32 resource variables, one of each per
            model variable, on one device.
        velocity_hats: `[]`, or AMSGrad's maxima, one per model variable.

    Returns:
        A scalar resource tensor on that device (make it eagerly, under
        `tf.init_scope()`). It keeps the slot variables' storage alive and
        sees every later assignment to them.
    """
    return _loaded().tf_adamw_slot_table(
        momentums=[v.handle for v in momentums],
        velocities=[v.handle for v in velocities],
        velocity_hats=[v.handle for v in velocity_hats])


def fused_apply(variables, table, slot_indices, grads, *, alpha,
                one_minus_beta_1, one_minus_beta_2, epsilon, decay,
                use_decay):
    """Runs the fused op: one AdamW step for all `variables`.

    Args:
        variables: resource variables (float32/bfloat16/float16).
        table: a `slot_table` on the variables' device.
        slot_indices: for each variable, the position of its slots in
            `table`.
        grads: float32 tensors, one per variable, of its shape (the op
            checks full shapes, not only element counts).
        alpha, one_minus_beta_1, one_minus_beta_2, epsilon, decay: float32
            scalars as in `tf_adamw.update.adamw_update`.
        use_decay: list of bools, one per variable.

    Returns:
        The op (graph mode) or None (eager).
    """
    return _loaded().tf_adamw_fused_apply(
        variables=[v.handle for v in variables], slot_table=table,
        grads=grads, alpha=alpha, one_minus_beta_1=one_minus_beta_1,
        one_minus_beta_2=one_minus_beta_2, epsilon=epsilon, decay=decay,
        use_decay=list(use_decay), slot_indices=list(slot_indices))


def _loaded():
    module = loader.load()
    if module is None:
        raise RuntimeError(
            "The fused AdamW kernel is unavailable: "
            + str(loader.unavailable_reason()))
    return module
