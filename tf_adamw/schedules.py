"""Learning-rate schedules from Keras 3 and tf_keras: detection and config.

Neither library is imported unless a schedule from it is in use: `keras`
and `tf_keras` are looked up in `sys.modules`, because a user who passes a
schedule has already imported the library it came from.

Deserialisation never runs code named by a config: a class is looked up by
name among the user's `custom_objects`, then Keras 3's (or tf_keras's)
built-in schedules, and built with its `from_config`. No module named in the
config is imported and no serialised function is revived.
"""

import sys

_TF_KERAS_MODULE = "tf_keras.optimizers.schedules"
_KERAS_MODULE = "keras.optimizers.schedules"


def _schedule_bases():
    bases = []
    keras = sys.modules.get("keras")
    if keras is not None:
        bases.append(keras.optimizers.schedules.LearningRateSchedule)
    tf_keras = sys.modules.get("tf_keras")
    if tf_keras is not None:
        bases.append(tf_keras.optimizers.schedules.LearningRateSchedule)
    return tuple(bases)


def is_schedule(value):
    """True if `value` is a Keras 3 or tf_keras `LearningRateSchedule`."""
    bases = _schedule_bases()
    return bool(bases) and isinstance(value, bases)


def _is_tf_keras(schedule):
    tf_keras = sys.modules.get("tf_keras")
    return tf_keras is not None and isinstance(
        schedule, tf_keras.optimizers.schedules.LearningRateSchedule
    )


def serialize(schedule):
    """A JSON-compatible dict for a schedule, in Keras's format.

    Keras 3 schedules serialise exactly as `keras.optimizers.schedules.
    serialize` does; tf_keras schedules carry `module:
    "tf_keras.optimizers.schedules"` so they come back as tf_keras objects.
    """
    if _is_tf_keras(schedule):
        return {
            "module": _TF_KERAS_MODULE,
            "class_name": type(schedule).__name__,
            "config": schedule.get_config(),
            "registered_name": None,
        }
    import keras  # pylint: disable=g-import-not-at-top

    return keras.optimizers.schedules.serialize(schedule)


def deserialize(config, custom_objects=None):
    """Rebuilds a schedule from `serialize`'s output, without running code.

    Args:
        config: dict with `class_name` and `config` (and optionally
            `module`, `registered_name`).
        custom_objects: optional dict mapping names to user schedule classes.

    Raises:
        ValueError: the config is malformed or names an unknown class.
    """
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(
            "Argument `learning_rate` in the config must be a number or a "
            "serialised LearningRateSchedule dict with `class_name` and "
            f"`config`. Received: learning_rate={config!r}"
        )
    class_name = config["class_name"]
    inner = config.get("config", {})
    custom_objects = custom_objects or {}
    registered = config.get("registered_name")
    for key in (registered, class_name):
        if key and key in custom_objects:
            return custom_objects[key].from_config(inner)
    module = config.get("module") or _KERAS_MODULE
    if module == _TF_KERAS_MODULE:
        import tf_keras  # pylint: disable=g-import-not-at-top

        namespace = tf_keras.optimizers.schedules
        base = namespace.LearningRateSchedule
    else:
        import keras  # pylint: disable=g-import-not-at-top

        namespace = keras.optimizers.schedules
        base = namespace.LearningRateSchedule
    cls = getattr(namespace, str(class_name), None)
    if not (isinstance(cls, type) and issubclass(cls, base)) or cls is base:
        raise ValueError(
            f"Unknown learning-rate schedule class_name={class_name!r} "
            f"(module={module!r}) in the config's `learning_rate`. Built-in "
            "schedules are found by name; pass your own classes with "
            "`custom_objects={'Name': cls}`."
        )
    return cls.from_config(inner)
