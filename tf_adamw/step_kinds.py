"""Which step runs, and how: one pure choice and one runner.

Three kinds of step (docs/semantics.md, "Step kinds"):

- `FUSED`: weight decay + Adam as the fused CPU kernel, the rest as TF ops.
- `OPS`: the same pipeline with TF ops only, not compiled. It rounds exactly
  like `FUSED` and needs no kernel library, so a SavedModel traced from an
  optimizer running `FUSED` resumes bit-identically wherever it is loaded.
- `XLA`: the pipeline compiled by XLA (`jit_compile`), everywhere the kernel
  cannot run.

`choose` decides from facts about the call (a truth table, tested as one);
`current_context` reads those facts from TensorFlow; `StepRunner` runs the
chosen step and owns the compiled functions.
"""

import typing

import tensorflow as tf
# Whether the step is being traced for a SavedModel: no public API says so
# (nor whether it is traced for XLA: `update.traced_for_xla`); both decide
# whether the fused kernel may be used.
from tensorflow.python.saved_model import save_context

from tf_adamw import distribute
from tf_adamw import kernels
from tf_adamw import update

FUSED = "fused"
OPS = "ops"
XLA = "xla"

# How the chosen step is run.
INLINE = "inline"  # its ops straight into the caller's graph, or eagerly
FUNCTION = "function"  # a `tf.function` of ours, compiled once per kind


class Choice(typing.NamedTuple):
    kind: str
    how: str


class CallContext(typing.NamedTuple):
    """Facts about the call being dispatched (see `current_context`)."""
    eager: bool
    # Traced inside an XLA cluster (jit_compile, TPU replica); never eager.
    in_xla: bool
    saving: bool  # traced for a SavedModel


def choose(kernel_ready, only_kernel, context):
    """The step for a call: a pure function of the call's facts.

    Args:
        kernel_ready: the optimizer is built and the fused kernel can run
            its variables (`AdamW.uses_fused_kernel`).
        only_kernel: the pipeline has no per-variable op besides the kernel
            (`pipeline.only_decay_and_adam`).
        context: a `CallContext`.

    Returns:
        A `Choice`.
    """
    if context.in_xla and not context.eager:
        # A custom op has no XLA lowering: inside a jit-compiled function
        # or a TPU replica XLA compiles the step, with the caller's
        # function. Its ops go straight into that graph: a nested function
        # would capture every handle twice (1,000 variables with EMA:
        # 1.5 s more tracing and 180 MB more at the first call).
        return Choice(XLA, INLINE)
    if not kernel_ready or context.in_xla:
        return Choice(XLA, FUNCTION)
    kind = OPS if context.saving else FUSED
    if not context.eager:
        # Traced straight into the caller's graph: a nested function would
        # capture every variable handle twice (a placeholder in each graph)
        # and add a call op with all of them as inputs.
        return Choice(kind, INLINE)
    if kind == FUSED and only_kernel:
        # One kernel and a few scalar ops: running them eagerly costs less
        # than a function call with every variable's handle as an input.
        return Choice(kind, INLINE)
    return Choice(kind, FUNCTION)


def current_context():
    """The `CallContext` of the code running now."""
    return CallContext(
        eager=tf.executing_eagerly(), in_xla=update.traced_for_xla(),
        saving=save_context.in_save_context())


class StepRunner:
    """Runs a chosen step; owns our compiled functions.

    Args:
        step: `step(grads, external, fused)`, one replica's whole step.
        scalars: `scalars(iterations, external, dtype)`, the step's scalars;
            eager fused steps run it as one small function.
        jit_compile: compile the `XLA` kind with XLA (False: debug).
    """

    def __init__(self, step, scalars, jit_compile):
        self._step = step
        self._scalars = scalars
        self._jit_compile = jit_compile
        self.functions = {}  # kind (or "scalars") -> tf.function

    def run(self, choice, grads, external):
        """Runs `choice` on `grads`; returns what the step returns."""
        if choice.how == INLINE:
            return self._step(grads, external, choice.kind == FUSED)
        return self._function(choice.kind)(grads, external)

    def scalars(self, iterations, external, dtype):
        """The step's scalars: one function call when eager (instead of ~20
        eager op dispatches, ~30 us each here), else traced inline."""
        if tf.executing_eagerly():
            return self._function("scalars")(iterations, external, dtype)
        return self._scalars(iterations, external, dtype)

    def _function(self, kind):
        if kind not in self.functions:
            if kind == "scalars":
                function = self._scalars
            else:
                fused = kind == FUSED

                def adamw_step(grads, external):
                    return self._step(grads, external, fused)
                function = adamw_step
            # autograph=False: the step has no Python control flow on
            # tensors (branches are explicit tf.conds), and autograph's
            # source conversion dominated tracing time (15 s for 200
            # variables).
            self.functions[kind] = tf.function(
                function, jit_compile=self._jit_compile if kind == XLA
                else False, reduce_retracing=True, autograph=False)
        return self.functions[kind]


def kernel_blocker(fused, tf_vars, compute_dtypes):
    """Why the fused kernel cannot update `tf_vars`, or None if it can.

    Args:
        fused: the `fused` option (None, True or False).
        tf_vars: the model variables (possibly mirrored).
        compute_dtypes: their compute dtypes.
    """
    if fused is False:
        return "`fused=False`"
    for variable, dtype in zip(tf_vars, compute_dtypes):
        if dtype != tf.float32:
            return (f"variable {variable.name!r} has dtype "
                    f"{variable.dtype.name} (the kernel updates float32, "
                    "bfloat16 and float16 variables)")
        for copy in distribute.copies(variable):
            device = tf.DeviceSpec.from_string(copy.device or "")
            if device.device_type not in (None, "CPU"):
                return (f"variable {variable.name!r} is on {copy.device} "
                        "(the kernel runs on CPU)")
    if kernels.load() is None:
        return "the kernel is unavailable: " + kernels.unavailable_reason()
    return None
