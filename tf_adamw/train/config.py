"""The trainer's configuration: schema, YAML loading, overrides, validation.

A config has three sections, as in the TF Model Garden: `runtime` (where and
how to run: strategy, devices, precision), `task` (what to learn: the task,
its own keys under `task.params`, the batch size, the optimizer) and `trainer`
(how long, how often to log, evaluate and checkpoint). Every key has a
default; a YAML file (read with `yaml.safe_load`) and then `--params_override`
change some of them, and explicit flags such as `--model_dir` win over both.

`task.params` is a free mapping: the task checks it (see `task.py`). The
built-in `char_lm` task's keys are typed here (`CharLMParams`), so they are
checked, with the key and its source named, before TensorFlow is imported;
a task given by import path checks its own when the trainer builds it.

Errors are `ConfigError`s naming the key (dotted) and where its value came
from (the file, or `--params_override`): an unknown key, a wrong type, or a
value out of range, or a number that is not finite (`.nan`, `.inf`).

Precedence, lowest first: the dataclass defaults, the config files (in
order), `--params_override`, then the plain flags (`--model_dir`, `--tpu`,
`--train_steps`, `--learning_rate`, `--global_batch_size`). A file or
override that names another `task.name` drops the `task.params` set before
it (they were the other task's).
"""

import dataclasses
import math
import os
import re
import typing

import yaml

# The optimizer's own argument rules; importing them does not start
# TensorFlow.
from tf_adamw import options as adamw_options


class ConfigError(ValueError):
    """A config file or override is invalid; the message names key and source."""


STRATEGIES = ("one_device", "mirrored", "multi_worker_mirrored", "tpu")
PRECISIONS = ("float32", "bfloat16", "float16")
LOSS_SCALES = ("none", "dynamic")
EXPORT_WEIGHTS = ("best", "ema", "raw")
# Keys with a fixed set of values (listed by `--help`).
CHOICES = {"runtime.distribution_strategy": STRATEGIES,
           "runtime.mixed_precision_dtype": PRECISIONS,
           "task.optimizer.loss_scale": LOSS_SCALES,
           "trainer.export_weights": EXPORT_WEIGHTS}
# The built-in tasks, by the name `task.name` may give instead of an import
# path, and the import path each one stands for.
BUILTIN_TASKS = {"char_lm": "tf_adamw.train.char_lm:build"}
DEFAULT_TASK = "char_lm"
# `package.module:callable` (the callable may be an attribute path).
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*"
                          r"(\.[A-Za-z_]\w*)*")
# The plain CLI flags that set a config key; they win over the files and
# `--params_override`.
FLAG_KEYS = {"train_steps": "trainer.train_steps",
             "learning_rate": "task.optimizer.learning_rate",
             "global_batch_size": "task.data.global_batch_size"}


@dataclasses.dataclass
class RuntimeConfig:
    """Where the job runs."""
    # one_device | mirrored | multi_worker_mirrored | tpu
    distribution_strategy: str = "one_device"
    # Logical CPU devices to create before TensorFlow starts (mirrored on a
    # CPU-only machine); 1 leaves the devices alone.
    num_cpus: int = 1
    # float32 | bfloat16 | float16 (16-bit compute, float32 variables and
    # slots). float16 needs task.optimizer.loss_scale: dynamic, or small
    # gradients underflow.
    mixed_precision_dtype: str = "float32"
    # TPU name for TPUClusterResolver: "local" on a TPU VM, the TPU (pod) name
    # from a client VM or for a multi-host pod slice, or a grpc:// address.
    # Empty: the --tpu flag, else the TPU_NAME environment variable.
    tpu: str = ""
    tpu_zone: str = ""
    gcp_project: str = ""
    # Multi-worker: "host:port,host:port,..." builds TF_CONFIG for this
    # process; empty means TF_CONFIG comes from the environment.
    worker_hosts: str = ""
    task_index: int = 0


@dataclasses.dataclass
class DataConfig:
    """The batches the trainer draws from the task's datasets."""
    # Examples per optimizer update (per micro-batch with accumulation),
    # summed over every replica and worker.
    global_batch_size: int = 32


@dataclasses.dataclass
class CharLMParams:
    """`task.params` of the built-in char_lm task (the default).

    A synthetic English-like corpus made in-process, and a small
    decoder-only transformer on its characters.
    """
    seq_len: int = 64  # characters per example (and the model's positions)
    corpus_chars: int = 200_000  # training corpus
    eval_corpus_chars: int = 20_000  # held-out corpus
    eval_batches: int = 4  # of min(global_batch_size, 64) sequences
    num_layers: int = 2
    d_model: int = 128
    num_heads: int = 4
    mlp_ratio: int = 4


# The char_lm keys' places before they moved under `task.params`: an old
# config gets an error saying where the key is now.
MOVED_KEYS = {f"task.{section}.{name}": f"task.params.{name}"
              for section, names in (
                  ("data", ("corpus_chars", "eval_corpus_chars", "seq_len",
                            "eval_batches")),
                  ("model", ("num_layers", "d_model", "num_heads",
                             "mlp_ratio")))
              for name in names}


@dataclasses.dataclass
class OptimizerConfig:
    """tf_adamw.AdamW and its warmup + cosine learning-rate schedule."""
    learning_rate: float = 3e-3  # peak, reached after warmup_steps
    warmup_steps: int = 40
    # The cosine decay ends at learning_rate * end_learning_rate_ratio.
    end_learning_rate_ratio: float = 0.1
    weight_decay: float = 0.1
    beta_1: float = 0.9
    beta_2: float = 0.98
    epsilon: float = 1e-8
    global_clipnorm: float = 1.0  # 0 turns clipping off
    use_ema: bool = True
    ema_momentum: float = 0.99
    # 1 = off; k >= 2 applies one update per k micro-batches.
    gradient_accumulation_steps: int = 1
    # Regexes matched against variable names: no weight decay for these.
    exclude_from_weight_decay: typing.List[str] = dataclasses.field(
        default_factory=lambda: ["/bias", "/scale"])
    skip_nonfinite_gradients: bool = False
    # On CPU, run weight decay + Adam as tf_adamw's fused kernel (its
    # default); false: always the XLA step. TPUs always use the XLA step.
    fused_kernel: bool = True
    # Compile the optimizer's non-fused step with XLA (tf_adamw's default).
    jit_compile: bool = True
    # none | dynamic: scale the loss (and unscale the gradients) by a
    # dynamic loss scale, Keras LossScaleOptimizer's rule: for float16.
    loss_scale: str = "none"
    initial_scale: float = adamw_options.INITIAL_SCALE  # where it starts
    # Finite steps in a row after which the dynamic scale doubles.
    dynamic_growth_steps: int = adamw_options.DYNAMIC_GROWTH_STEPS

    def adamw_arguments(self):
        """The `tf_adamw.AdamW` arguments this section sets, translated once.

        `learning_rate` is the peak: the trainer passes its warmup + cosine
        schedule (`train.schedule`) in its place.
        """
        return {
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "global_clipnorm": self.global_clipnorm or None,
            "use_ema": self.use_ema,
            "ema_momentum": self.ema_momentum,
            "gradient_accumulation_steps": (
                self.gradient_accumulation_steps
                if self.gradient_accumulation_steps > 1 else None),
            "skip_nonfinite_gradients": self.skip_nonfinite_gradients,
            "fused": None if self.fused_kernel else False,
            "jit_compile": self.jit_compile,
            **self.loss_scale_arguments(),
        }

    def loss_scale_arguments(self):
        """The dynamic loss scale's `AdamW` arguments (`loss_scale: none`
        passes only `loss_scale=None`; the other two keys are AdamW errors
        without the dynamic scale)."""
        if self.loss_scale == "none":
            return {"loss_scale": None}
        return {"loss_scale": self.loss_scale,
                "initial_scale": self.initial_scale,
                "dynamic_growth_steps": self.dynamic_growth_steps}


@dataclasses.dataclass
class TaskConfig:
    """What is learned."""
    # A built-in task (char_lm) or a user's, as `package.module:callable`.
    name: str = DEFAULT_TASK
    # The task's own keys: a free mapping that the task checks.
    params: typing.Dict[str, typing.Any] = dataclasses.field(
        default_factory=dict)
    seed: int = 0
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=OptimizerConfig)


@dataclasses.dataclass
class TrainerConfig:
    """How long, and how often to log, evaluate, checkpoint and export."""
    train_steps: int = 600  # optimizer updates
    steps_per_loop: int = 25  # updates per tf.function call
    log_every_n_steps: int = 50  # a multiple of steps_per_loop
    checkpoint_every_n_steps: int = 200  # a multiple of steps_per_loop
    # Held-out evaluation (raw and EMA weights) every this many steps, a
    # multiple of steps_per_loop, and at the end; 0: only at the end.
    eval_every_n_steps: int = 200
    max_to_keep: int = 3
    # Empty: the --model_dir flag, else runs/<config file name>.
    model_dir: str = ""
    export_saved_models: bool = True
    # Which weights the serving export holds: best (the EMA weights only
    # when their final eval loss is lower) | ema | raw.
    export_weights: str = "best"
    loss_curve: bool = True


@dataclasses.dataclass
class Config:
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)


# ---------------------------------------------------------------------------
# Merging YAML data into the dataclasses, with type checks.

_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _type_name(value):
    return type(value).__name__


def _check_type(key, value, annotation, source):
    """`value` as the type `annotation`, or a ConfigError."""
    def fail(expected):
        raise ConfigError(
            f"{source}: key `{key}` must be {expected}; got {value!r} "
            f"({_type_name(value)}).")

    if annotation is bool:
        if not isinstance(value, bool):
            fail("a boolean (true/false)")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if annotation is float:
        if isinstance(value, bool):
            fail("a number")
        if isinstance(value, (int, float)):
            number = float(value)
        # YAML 1.1 reads `3e-3` (no dot) as a string; accept that spelling.
        elif isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
            number = float(value)
        else:
            fail("a number")
        # YAML's `.nan` / `.inf` are floats: refuse them here, for every
        # float key, rather than train on them.
        if not math.isfinite(number):
            fail("a finite number")
        return number
    if annotation is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    if typing.get_origin(annotation) in (list, typing.List):
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            fail(f"a list of {item_type.__name__}")
        return [_check_type(f"{key}[{i}]", v, item_type, source)
                for i, v in enumerate(value)]
    if _is_mapping(annotation):
        if not isinstance(value, dict) or not all(
                isinstance(k, str) for k in value):
            fail("a mapping of names to values")
        return value
    raise TypeError(f"unsupported annotation {annotation!r}")  # a bug here


def _is_mapping(annotation):
    return typing.get_origin(annotation) in (dict, typing.Dict)


def _merge_mapping(existing, data, key, source, sources):
    """`existing` updated by `data`, key by key (nested mappings merged), so
    an override of one `task.params` key keeps the others."""
    merged = dict(existing)
    for name, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            value = _merge_mapping(merged[name], value, f"{key}.{name}",
                                   source, sources)
        else:
            # Every leaf's source, for the task's errors; an empty mapping
            # has none: its own key then.
            for leaf in flatten({name: value}, f"{key}.") or [
                    f"{key}.{name}"]:
                sources[leaf] = source
        merged[name] = value
    return merged


def _merge(target, data, source, prefix, sources):
    """Writes `data` (a dict from YAML) into dataclass `target` in place."""
    if not isinstance(data, dict):
        where = f"section `{prefix[:-1]}`" if prefix else "the top level"
        raise ConfigError(
            f"{source}: {where} must be a mapping of keys to values; got "
            f"{data!r} ({_type_name(data)}).")
    hints = typing.get_type_hints(type(target))
    fields = {f.name for f in dataclasses.fields(target)}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            _unknown_key(key, prefix, fields, value, source)
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            if value is None:
                continue  # an empty section in YAML
            _merge(getattr(target, name), value, source, key + ".", sources)
        elif _is_mapping(annotation):
            value = {} if value is None else value  # `params:` left empty
            _check_type(key, value, annotation, source)
            setattr(target, name, _merge_mapping(
                getattr(target, name), value, key, source, sources))
        else:
            setattr(target, name, _check_type(key, value, annotation, source))
            sources[key] = source


def _unknown_key(key, prefix, fields, value, source):
    """The error for an unknown key; a char_lm key at its old place (or a
    section of them) is told where it is now."""
    moved = [(old, new) for old, new in MOVED_KEYS.items()
             if old == key or (old.startswith(key + ".")
                               and isinstance(value, dict)
                               and old.rsplit(".", 1)[1] in value)]
    if moved:
        places = ", ".join(f"`{old}` -> `{new}`" for old, new in moved)
        raise ConfigError(
            f"{source}: unknown key `{key}`: the char_lm task's keys moved "
            f"under `task.params` ({places}).")
    known = ", ".join(sorted(fields))
    raise ConfigError(
        f"{source}: unknown key `{key}`. Known keys"
        f"{' in `' + prefix[:-1] + '`' if prefix else ''}: {known}.")


def _load_yaml_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return {} if data is None else data


def _split_top_level(text, sep=","):
    """Splits on `sep` outside brackets and quotes."""
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p for p in (p.strip() for p in parts) if p]


def parse_override(text):
    """`--params_override` text to a nested dict.

    Accepts a dotted list (`trainer.train_steps=20,runtime.num_cpus=4`,
    values read as YAML: `task.optimizer.exclude_from_weight_decay=[bias]`;
    a comma not followed by `key=` belongs to the value, as in
    `runtime.worker_hosts=h1:2222,h2:2222`),
    a YAML/JSON mapping (`{trainer: {train_steps: 20}}` or
    `"trainer:\\n  train_steps: 20"`), or the path of a YAML file.
    """
    text = text.strip()
    if not text:
        return {}
    if text.endswith((".yaml", ".yml")) and os.path.isfile(text):
        return _load_yaml_file(text)
    if "=" in text and not text.startswith("{"):
        out = {}
        items = []
        for item in _split_top_level(text):
            key = item.split("=", 1)[0].strip()
            if "=" in item and re.fullmatch(r"[A-Za-z_][\w.]*", key):
                items.append(item)
            elif items:
                # `runtime.worker_hosts=h1:1,h2:2`: a comma inside a value.
                items[-1] += "," + item
            else:
                raise ConfigError(
                    f"--params_override: `{item}` is not of the form "
                    "key.subkey=value.")
        for item in items:
            key, raw = item.split("=", 1)
            key = key.strip()
            if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
                raise ConfigError(
                    f"--params_override: `{key}` is not a dotted key.")
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError as e:
                raise ConfigError(
                    f"--params_override: the value of `{key}` is not valid "
                    f"YAML: {e}") from e
            node = out
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(
                        f"--params_override: `{key}` conflicts with another "
                        "override.")
            node[parts[-1]] = value
        return out
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--params_override: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(
            "--params_override must be key=value pairs, a YAML mapping or a "
            f"YAML file; got {text!r}.")
    return data


def _validate(config, sources):
    """Range and consistency checks; errors name the key and its source."""
    def fail(key, message):
        source = sources.get(key, "the defaults")
        raise ConfigError(f"{source}: key `{key}` {message}")

    _check_runtime(config.runtime, fail)
    _check_task(config.task, sources, fail)
    _check_sizes(config, fail)
    _check_optimizer(config.task.optimizer, config.trainer, fail)
    t = config.trainer
    for key in ("log_every_n_steps", "checkpoint_every_n_steps",
                "eval_every_n_steps"):
        if getattr(t, key) % t.steps_per_loop:
            fail(f"trainer.{key}", f"must be a multiple of "
                 f"trainer.steps_per_loop = {t.steps_per_loop}; got "
                 f"{getattr(t, key)}.")
    if t.export_weights not in EXPORT_WEIGHTS:
        fail("trainer.export_weights", f"must be one of "
             f"{', '.join(EXPORT_WEIGHTS)}; got {t.export_weights!r}.")
    if t.export_weights == "ema" and not config.task.optimizer.use_ema:
        fail("trainer.export_weights", "is ema, but task.optimizer.use_ema "
             "is false: there are no EMA weights to export.")


def _check_task(task, sources, fail):
    """`task.name`'s form; a built-in task's `task.params`, which are
    completed with their defaults (config.yaml then records every one)."""
    if task.name not in BUILTIN_TASKS and not _IMPORT_PATH.fullmatch(
            task.name):
        fail("task.name", "must be a built-in task "
             f"({', '.join(BUILTIN_TASKS)}) or an import path "
             f"`package.module:callable`; got {task.name!r}.")
    if task.name == DEFAULT_TASK:
        params = task_params(CharLMParams, task.params, sources)
        check_char_lm_params(params, fail)
        task.params = dataclasses.asdict(params)


def task_params(schema, params, sources=None, prefix="task.params"):
    """`params` (a mapping) as the dataclass `schema`, type-checked.

    For tasks whose keys are a flat dataclass of bool, int, float, str and
    list fields: unknown keys and wrong types are errors naming the key
    (`task.params.<name>`) and, when `sources` has it, where it was set.

    Raises:
        ConfigError: an unknown key or a value of the wrong type.
    """
    result = schema()
    for name, value in (params or {}).items():
        key = f"{prefix}.{name}"
        where = (sources or {}).get(key, "the config")
        _merge(result, {name: value}, where, prefix + ".", {})
    return result


def check_char_lm_params(p, fail):
    """The char_lm task's sizes, and how they fit together.

    Args:
        p: a `CharLMParams`.
        fail: `fail(key, message)` raises the error.
    """
    key = "task.params."
    for name, value in dataclasses.asdict(p).items():
        if value <= 0:
            fail(key + name, f"must be > 0; got {value!r}.")
    for name in ("corpus_chars", "eval_corpus_chars"):
        if getattr(p, name) < 2 * (p.seq_len + 1):
            fail(key + name, f"must be at least 2 * (seq_len + 1) = "
                 f"{2 * (p.seq_len + 1)}; got {getattr(p, name)}.")
    if p.d_model % p.num_heads:
        fail(key + "num_heads", f"must divide task.params.d_model = "
             f"{p.d_model}; got {p.num_heads}.")


def _check_runtime(r, fail):
    if r.distribution_strategy not in STRATEGIES:
        fail("runtime.distribution_strategy",
             f"must be one of {', '.join(STRATEGIES)}; got "
             f"{r.distribution_strategy!r}.")
    if r.mixed_precision_dtype not in PRECISIONS:
        fail("runtime.mixed_precision_dtype",
             f"must be one of {', '.join(PRECISIONS)}; got "
             f"{r.mixed_precision_dtype!r}.")
    if r.num_cpus <= 0:
        fail("runtime.num_cpus", f"must be > 0; got {r.num_cpus!r}.")
    if r.task_index < 0:
        fail("runtime.task_index", f"must be >= 0; got {r.task_index}.")
    if r.worker_hosts:
        hosts = [h.strip() for h in r.worker_hosts.split(",")]
        for host in hosts:
            if not re.fullmatch(r"[^\s:,]+:\d+", host):
                fail("runtime.worker_hosts",
                     f"must be comma-separated host:port; got {host!r}.")
        if r.task_index >= len(hosts):
            fail("runtime.task_index",
                 f"is {r.task_index} but runtime.worker_hosts lists "
                 f"{len(hosts)} workers.")


def _check_sizes(config, fail):
    """Counts and sizes that must be positive (or, for the eval interval,
    not negative)."""
    t, d = config.trainer, config.task.data
    o = config.task.optimizer
    for key, value in (("task.data.global_batch_size", d.global_batch_size),
                       ("task.optimizer.learning_rate", o.learning_rate),
                       ("task.optimizer.gradient_accumulation_steps",
                        o.gradient_accumulation_steps),
                       ("trainer.train_steps", t.train_steps),
                       ("trainer.steps_per_loop", t.steps_per_loop),
                       ("trainer.log_every_n_steps", t.log_every_n_steps),
                       ("trainer.checkpoint_every_n_steps",
                        t.checkpoint_every_n_steps),
                       ("trainer.max_to_keep", t.max_to_keep)):
        if value <= 0:
            fail(key, f"must be > 0; got {value!r}.")
    if t.eval_every_n_steps < 0:
        fail("trainer.eval_every_n_steps", "must be >= 0 (0: only at the "
             f"end); got {t.eval_every_n_steps}.")


# `tf_adamw.AdamW` arguments whose config key has another name.
_OPTIMIZER_KEYS = {"fused": "fused_kernel"}


def _check_optimizer(o, t, fail):
    """The trainer's own rules (schedule, clipping as 0 = off), then every
    AdamW argument by the optimizer's own rules (`tf_adamw.options`)."""
    if o.warmup_steps < 0:
        fail("task.optimizer.warmup_steps", f"must be >= 0; got "
             f"{o.warmup_steps}.")
    if o.warmup_steps >= t.train_steps:
        fail("task.optimizer.warmup_steps", f"must be < trainer.train_steps "
             f"= {t.train_steps}; got {o.warmup_steps}.")
    if not 0.0 <= o.end_learning_rate_ratio <= 1.0:
        fail("task.optimizer.end_learning_rate_ratio",
             f"must be in [0, 1]; got {o.end_learning_rate_ratio}.")
    if o.global_clipnorm < 0:
        fail("task.optimizer.global_clipnorm",
             f"must be >= 0 (0 turns clipping off); got {o.global_clipnorm}.")
    if o.loss_scale not in LOSS_SCALES:
        fail("task.optimizer.loss_scale", f"must be one of "
             f"{', '.join(LOSS_SCALES)}; got {o.loss_scale!r}.")
    for argument, value in o.adamw_arguments().items():
        key = "task.optimizer." + _OPTIMIZER_KEYS.get(argument, argument)
        try:
            # use_ema=True: the config's ema_momentum is checked even when
            # the EMA is off (it is in [0, 1] in every config we write).
            adamw_options.check_argument(argument, value, use_ema=True)
        except (TypeError, ValueError) as e:
            fail(key, f"is not a valid AdamW argument: {e}")
    for argument in ("initial_scale", "dynamic_growth_steps"):
        try:  # checked when not in use too: a typo is an error either way
            adamw_options.check_argument(argument, getattr(o, argument))
        except (TypeError, ValueError) as e:
            fail("task.optimizer." + argument,
                 f"is not a valid AdamW argument: {e}")
    try:
        adamw_options.check_patterns(o.exclude_from_weight_decay)
    except (TypeError, ValueError) as e:
        fail("task.optimizer.exclude_from_weight_decay", f"is invalid: {e}")


def _apply_flags(config, flag_values, sources):
    """The plain flags (`FLAG_KEYS`): text read as YAML, like an override."""
    for name, raw in (flag_values or {}).items():
        if raw is None:
            continue
        if name not in FLAG_KEYS:
            raise ConfigError(f"--{name} is not a config flag; known: "
                              f"{', '.join('--' + n for n in FLAG_KEYS)}.")
        value = raw
        if isinstance(raw, str):
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError as e:
                raise ConfigError(f"--{name}: not valid YAML: {e}") from e
        *sections, leaf = FLAG_KEYS[name].split(".")
        data = {leaf: value}
        for section in reversed(sections):
            data = {section: data}
        _merge(config, data, f"--{name}", "", sources)


def _merge_source(config, data, source, sources):
    """Merges one file's (or the override's) data into `config`.

    When it names another task, the `task.params` that earlier sources set
    are dropped: they were another task's (e.g. cpu_local.yaml's char_lm
    keys under `--params_override=task.name=my_tasks:build`).
    """
    name = config.task.name
    _merge(config, data, source, "", sources)
    if config.task.name == name:
        return
    prefix = "task.params."
    kept = {}
    for key, value in flatten(config.task.params, prefix).items():
        if sources.get(key) == source:
            kept[key] = value
        else:
            sources.pop(key, None)
    params = {}
    for key, value in kept.items():
        *parents, leaf = key[len(prefix):].split(".")
        node = params
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    config.task.params = params


def load(config_files=(), params_override="", model_dir=None, tpu=None,
         flag_values=None):
    """Builds and validates a `Config`.

    Args:
        config_files: YAML files, applied in order (later ones win).
        params_override: `--params_override` text (see `parse_override`).
        model_dir: the `--model_dir` flag (wins over `trainer.model_dir`).
        tpu: the `--tpu` flag (wins over `runtime.tpu`).
        flag_values: `{flag name: value}` for the `FLAG_KEYS` flags (text is
            read as YAML; None means not given); they win over the files
            and `params_override`.

    Raises:
        ConfigError: naming the key and the file (or flag) it came from.
    """
    if isinstance(config_files, (str, os.PathLike)):
        config_files = [config_files]
    config = Config()
    sources = {}
    for path in config_files:
        _merge_source(config, _load_yaml_file(path), os.fspath(path),
                      sources)
    if params_override:
        _merge_source(config, parse_override(params_override),
                      "--params_override", sources)
    _apply_flags(config, flag_values, sources)
    if model_dir:
        config.trainer.model_dir = model_dir
        sources["trainer.model_dir"] = "--model_dir"
    if tpu:
        config.runtime.tpu = tpu
        sources["runtime.tpu"] = "--tpu"
    if not config.trainer.model_dir:
        name = (os.path.splitext(os.path.basename(config_files[-1]))[0]
                if config_files else "default")
        config.trainer.model_dir = os.path.join("runs", name)
    _validate(config, sources)
    return config


def from_dict(data, source):
    """A `Config` from a nested dict (e.g. a saved config.yaml), unvalidated.

    Keys the dict lacks keep their defaults.

    Raises:
        ConfigError: an unknown key or a wrong type, naming `source`.
    """
    config = Config()
    _merge(config, data or {}, source, "", {})
    return config


def to_dict(config):
    return dataclasses.asdict(config)


def flatten(data, prefix=""):
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists are values)."""
    out = {}
    for name, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _type_text(annotation):
    if typing.get_origin(annotation) in (list, typing.List):
        return f"list of {typing.get_args(annotation)[0].__name__}"
    if _is_mapping(annotation):
        return "mapping"
    return {bool: "bool", int: "int", float: "float", str: "str"}[annotation]


def describe_keys(target=None, prefix=""):
    """Every config key with its type and default, from the dataclasses.

    Returns:
        Lines for `--help`: a heading per section (its docstring) and one
        line per key, `  key (type) = default`.
    """
    target = Config() if target is None else target
    hints = typing.get_type_hints(type(target))
    lines = []
    for field in dataclasses.fields(target):
        key, value = f"{prefix}{field.name}", getattr(target, field.name)
        if dataclasses.is_dataclass(value):
            doc = (type(value).__doc__ or "").strip().splitlines()[0]
            lines.append(f"{key}: {doc}")
            lines.extend(describe_keys(value, key + "."))
            continue
        default = yaml.safe_dump(value, default_flow_style=True).strip()
        default = default.removesuffix("\n...").removesuffix("...").strip()
        line = f"  {key} ({_type_text(hints[field.name])}) = {default}"
        if key in CHOICES:
            line += f"  [{' | '.join(CHOICES[key])}]"
        if key == "task.name":
            names = " | ".join(BUILTIN_TASKS)
            line += f"  [{names} | package.module:callable]"
        lines.append(line)
        if key == "task.params":
            lines.append(f"    checked by the task; those of {DEFAULT_TASK} "
                         "(the default task):")
            lines.extend("  " + line
                         for line in describe_keys(CharLMParams(), key + "."))
    return lines


def to_yaml(config):
    return yaml.safe_dump(to_dict(config), sort_keys=False)
