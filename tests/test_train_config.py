"""tpu_configs/*.yaml and the trainer's config loader (no training here)."""

import dataclasses
import glob
import os
import subprocess
import sys

import pytest

from tf_adamw.train import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "tpu_configs")
CONFIG_FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))
REQUIRED = ["cpu_font_digits", "cpu_local", "cpu_mirrored_4",
            "multiworker_local_2", "tpu_v4_8_bf16", "tpu_v5e_8_bf16",
            "tpu_v5p_128_bf16"]


def _write(tmp_path, text, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_every_required_config_exists():
    names = {os.path.splitext(os.path.basename(p))[0] for p in CONFIG_FILES}
    assert set(REQUIRED) <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_parses_validates_and_has_a_header(path):
    config = config_lib.load(path)
    assert config.trainer.model_dir == os.path.join(
        "runs", os.path.splitext(os.path.basename(path))[0])
    with open(path, encoding="utf-8") as f:
        header = []
        for line in f:
            if not line.startswith("#"):
                break
            header.append(line)
    text = "".join(header)
    for word in ("Hardware:", "Precision:", "Command:", "Expect:",
                 "python -m tf_adamw.train",
                 f"--config_file=tpu_configs/{os.path.basename(path)}"):
        assert word in text, f"{path}: header lacks {word!r}"


def test_tpu_configs_use_bfloat16_and_the_tpu_strategy():
    for name in ("tpu_v4_8_bf16", "tpu_v5e_8_bf16", "tpu_v5p_128_bf16"):
        config = config_lib.load(os.path.join(CONFIG_DIR, name + ".yaml"))
        assert config.runtime.distribution_strategy == "tpu"
        assert config.runtime.mixed_precision_dtype == "bfloat16"


def test_defaults_equal_cpu_local():
    loaded = config_lib.load(os.path.join(CONFIG_DIR, "cpu_local.yaml"))
    defaults = config_lib.load([])  # the built-in task's params filled in
    assert loaded.trainer.model_dir == os.path.join("runs", "cpu_local")
    loaded.trainer.model_dir = defaults.trainer.model_dir
    assert config_lib.to_dict(loaded) == config_lib.to_dict(defaults)
    expected = config_lib.Config()
    expected.task.params = dataclasses.asdict(config_lib.CharLMParams())
    expected.trainer.model_dir = defaults.trainer.model_dir
    assert config_lib.to_dict(defaults) == config_lib.to_dict(expected)


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = _write(tmp_path, "trainer:\n  train_stepz: 3\n")
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(path)
    assert "trainer.train_stepz" in str(e.value)
    assert path in str(e.value)
    assert "train_steps" in str(e.value)  # lists the known keys


def test_unknown_section_names_the_key_and_the_file(tmp_path):
    path = _write(tmp_path, "runtimes:\n  num_cpus: 2\n")
    with pytest.raises(config_lib.ConfigError, match="`runtimes`") as e:
        config_lib.load(path)
    assert path in str(e.value)


@pytest.mark.parametrize("text, key", [
    ("trainer:\n  train_steps: ten\n", "trainer.train_steps"),
    ("trainer:\n  train_steps: 2.5\n", "trainer.train_steps"),
    ("trainer:\n  train_steps: true\n", "trainer.train_steps"),
    ("task:\n  optimizer:\n    learning_rate: fast\n",
     "task.optimizer.learning_rate"),
    ("task:\n  optimizer:\n    use_ema: 1\n", "task.optimizer.use_ema"),
    ("task:\n  optimizer:\n    exclude_from_weight_decay: bias\n",
     "task.optimizer.exclude_from_weight_decay"),
    ("task:\n  optimizer:\n    exclude_from_weight_decay: [bias, 3]\n",
     "task.optimizer.exclude_from_weight_decay[1]"),
    ("runtime:\n  tpu: 7\n", "runtime.tpu"),
    ("task:\n  data: 3\n", "task.data"),
    ("task:\n  params: [3]\n", "task.params"),
    ("task:\n  params:\n    d_model: wide\n", "task.params.d_model"),
    ("task:\n  params:\n    d_modl: 64\n", "task.params.d_modl"),
])
def test_wrong_type_names_the_key_and_the_file(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(path)
    assert f"`{key}`" in str(e.value)
    assert path in str(e.value)


def test_yaml_scientific_notation_without_a_dot_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads 3e-4 as a string; the loader accepts it.
    path = _write(tmp_path, "task:\n  optimizer:\n    learning_rate: 3e-4\n")
    assert config_lib.load(path).task.optimizer.learning_rate == 3e-4


@pytest.mark.parametrize("text, key", [
    ("runtime:\n  distribution_strategy: parameter_server\n",
     "runtime.distribution_strategy"),
    ("runtime:\n  mixed_precision_dtype: float8\n",
     "runtime.mixed_precision_dtype"),
    ("trainer:\n  log_every_n_steps: 30\n", "trainer.log_every_n_steps"),
    ("task:\n  params:\n    num_heads: 3\n", "task.params.num_heads"),
    ("task:\n  params:\n    seq_len: 0\n", "task.params.seq_len"),
    ("task:\n  name: my_tasks\n", "task.name"),
    ("trainer:\n  eval_every_n_steps: 30\n", "trainer.eval_every_n_steps"),
    ("trainer:\n  eval_every_n_steps: -25\n", "trainer.eval_every_n_steps"),
    ("trainer:\n  export_weights: newest\n", "trainer.export_weights"),
    ("task:\n  optimizer:\n    use_ema: false\ntrainer:\n"
     "  export_weights: ema\n", "trainer.export_weights"),
    ("task:\n  optimizer:\n    beta_2: 1.0\n", "task.optimizer.beta_2"),
    ("task:\n  optimizer:\n    exclude_from_weight_decay: ['(']\n",
     "task.optimizer.exclude_from_weight_decay"),
    ("runtime:\n  worker_hosts: 'a:1,b'\n", "runtime.worker_hosts"),
])
def test_bad_value_names_the_key_and_the_file(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(path)
    assert f"`{key}`" in str(e.value)
    assert path in str(e.value)


def test_invalid_yaml_names_the_file(tmp_path):
    path = _write(tmp_path, "trainer: [unclosed\n")
    with pytest.raises(config_lib.ConfigError, match="not valid YAML") as e:
        config_lib.load(path)
    assert path in str(e.value)


def test_params_override_dotted_wins_over_the_file():
    config = config_lib.load(
        os.path.join(CONFIG_DIR, "cpu_local.yaml"),
        "trainer.train_steps=20,runtime.num_cpus=4,"
        "task.optimizer.exclude_from_weight_decay=[bias, scale],"
        "runtime.worker_hosts=h1:2222,h2:2222,task.optimizer.warmup_steps=5")
    assert config.trainer.train_steps == 20
    assert config.runtime.num_cpus == 4
    assert config.task.optimizer.exclude_from_weight_decay == [
        "bias", "scale"]
    assert config.runtime.worker_hosts == "h1:2222,h2:2222"


def test_params_override_yaml_mapping_and_file(tmp_path):
    config = config_lib.load([], "{trainer: {train_steps: 50}}")
    assert config.trainer.train_steps == 50
    path = _write(tmp_path, "trainer:\n  train_steps: 70\n", "o.yaml")
    assert config_lib.load([], path).trainer.train_steps == 70


def test_params_override_errors_name_the_flag():
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load([], "trainer.train_stepz=3")
    assert "--params_override" in str(e.value)
    assert "trainer.train_stepz" in str(e.value)
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load([], "trainer.train_steps=many")
    assert "--params_override" in str(e.value)
    assert "`trainer.train_steps`" in str(e.value)


def test_model_dir_and_tpu_flags_win():
    config = config_lib.load(
        os.path.join(CONFIG_DIR, "tpu_v4_8_bf16.yaml"),
        "trainer.model_dir=/from/override", model_dir="/from/flag",
        tpu="my-tpu")
    assert config.trainer.model_dir == "/from/flag"
    assert config.runtime.tpu == "my-tpu"


def test_later_config_files_win(tmp_path):
    extra = _write(tmp_path, "trainer:\n  train_steps: 1000\n", "more.yaml")
    config = config_lib.load(
        [os.path.join(CONFIG_DIR, "cpu_local.yaml"), extra])
    assert config.trainer.train_steps == 1000
    assert config.task.params["d_model"] == 128  # from cpu_local.yaml


@pytest.mark.parametrize("fused_kernel", [True, False])
def test_fused_kernel_setting_reaches_the_optimizer(fused_kernel):
    """`task.optimizer.fused_kernel: false` gives the XLA step."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from tf_adamw.train import loop  # pylint: disable=g-import-not-at-top
    config = config_lib.load(
        os.path.join(CONFIG_DIR, "cpu_local.yaml"),
        f"task.optimizer.fused_kernel={str(fused_kernel).lower()}")
    assert config.task.optimizer.fused_kernel is fused_kernel
    optimizer = loop.Run(config).make_optimizer()
    optimizer.build([tf.Variable([1.0, 2.0], name="kernel")])
    assert optimizer.uses_fused_kernel is fused_kernel


def _float_keys():
    """Every float key of the config, from the dataclasses."""
    import dataclasses  # pylint: disable=g-import-not-at-top
    import typing  # pylint: disable=g-import-not-at-top

    def walk(target, prefix):
        hints = typing.get_type_hints(type(target))
        for field in dataclasses.fields(target):
            value = getattr(target, field.name)
            if dataclasses.is_dataclass(value):
                yield from walk(value, f"{prefix}{field.name}.")
            elif hints[field.name] is float:
                yield f"{prefix}{field.name}"

    return list(walk(config_lib.Config(), ""))


def _nested(key, text):
    *sections, leaf = key.split(".")
    lines = [f"{'  ' * i}{s}:" for i, s in enumerate(sections)]
    return "\n".join(lines + [f"{'  ' * len(sections)}{leaf}: {text}"]) + "\n"


@pytest.mark.parametrize("key", _float_keys())  # a new float key too
@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", ".NaN", "-.Inf"])
def test_non_finite_numbers_are_errors_naming_the_key(tmp_path, key, text):
    """`learning_rate: .nan` used to train 60 steps of NaN and exit 0."""
    path = _write(tmp_path, _nested(key, text))
    with pytest.raises(config_lib.ConfigError, match="finite") as e:
        config_lib.load(path)
    assert f"`{key}`" in str(e.value) and path in str(e.value)
    with pytest.raises(config_lib.ConfigError, match="finite") as e:
        config_lib.load([], f"{key}={text}")
    assert f"`{key}`" in str(e.value) and "--params_override" in str(e.value)


@pytest.mark.parametrize("flag, text", [("learning_rate", ".nan"),
                                        ("learning_rate", "-.inf"),
                                        ("train_steps", "many"),
                                        ("global_batch_size", "0")])
def test_bad_flag_values_name_the_flag_and_the_key(flag, text):
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load([], flag_values={flag: text})
    assert f"--{flag}" in str(e.value)
    assert f"`{config_lib.FLAG_KEYS[flag]}`" in str(e.value)


def test_flags_win_over_the_override_and_the_file(tmp_path):
    path = _write(tmp_path, "trainer:\n  train_steps: 300\ntask:\n  data:\n"
                  "    global_batch_size: 16\n", "file.yaml")
    config = config_lib.load(
        path, "trainer.train_steps=400,task.optimizer.learning_rate=1e-3",
        flag_values={"train_steps": "500", "learning_rate": None,
                     "global_batch_size": None})
    assert config.trainer.train_steps == 500  # flag > override > file
    assert config.task.optimizer.learning_rate == 1e-3  # override > default
    assert config.task.data.global_batch_size == 16  # file > default
    config = config_lib.load(path, flag_values={"learning_rate": "3e-4",
                                                "global_batch_size": 8})
    assert config.task.optimizer.learning_rate == 3e-4
    assert config.task.data.global_batch_size == 8


def test_describe_keys_lists_every_key_with_its_default():
    text = "\n".join(config_lib.describe_keys())
    for key in config_lib.flatten(config_lib.to_dict(config_lib.Config())):
        assert f"  {key} (" in text, key
    assert "  trainer.train_steps (int) = 600" in text
    assert "  task.optimizer.learning_rate (float) = 0.003" in text
    assert "[one_device | mirrored | multi_worker_mirrored | tpu]" in text


def _cli_child(code):
    """Runs `code` in a fresh Python (no TensorFlow imported yet)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + sys.path))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.multiprocess
def test_help_exits_0_lists_the_keys_and_imports_no_tensorflow():
    proc = _cli_child(
        "import sys\n"
        "from tf_adamw.train import __main__ as cli\n"
        "try:\n"
        "    cli.run(['tf_adamw.train', '--help'])\n"
        "except SystemExit as e:\n"
        "    print('EXIT', e.code, 'tensorflow' in sys.modules)\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("EXIT 0 False"), proc.stdout[-500:]
    for text in ("--config_file", "--params_override", "--train_steps",
                 "--learning_rate", "--global_batch_size", "--verbose",
                 "trainer.train_steps (int) = 600",
                 "task.params.d_model (int) = 128",
                 "trainer.eval_every_n_steps (int) = 200",
                 "trainer.export_weights (str) = best", "Exit status"):
        assert text in proc.stdout, text
    # As users run it: exit status 0 (absl's own --help exits 1).
    proc = subprocess.run([sys.executable, "-m", "tf_adamw.train", "-h"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0 and "trainer.train_steps" in proc.stdout


@pytest.mark.multiprocess
@pytest.mark.parametrize("argv", [
    ["--config_file=tpu_configs/cpu_local.yaml",
     "--params_override=task.optimizer.learning_rate=.nan"],
    ["--config_file=tpu_configs/cpu_local.yaml", "--learning_rate=.inf"],
    ["--train_steps=ten"],
    ["--config_file=no/such/file.yaml"],
])
def test_config_errors_are_one_line_and_import_no_tensorflow(argv):
    proc = _cli_child(
        "import sys\n"
        "from tf_adamw.train import __main__ as cli\n"
        "try:\n"
        f"    cli.run(['tf_adamw.train'] + {argv!r})\n"
        "except SystemExit as e:\n"
        "    print('EXIT', e.code, 'tensorflow' in sys.modules)\n")
    assert proc.stdout.strip() == "EXIT 2 False", (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: ConfigError: ")
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_task_params_merge_key_by_key_and_another_task_drops_them(tmp_path):
    base = os.path.join(CONFIG_DIR, "cpu_local.yaml")
    config = config_lib.load(base, "task.params.d_model=64")
    assert config.task.params["d_model"] == 64
    assert config.task.params["seq_len"] == 64  # from the file, kept
    assert config.task.params["eval_batches"] == 4  # the char_lm default
    # cpu_local.yaml's char_lm keys are not the other task's.
    config = config_lib.load(base, "task.name=my_tasks:build,"
                             "task.params.noise=0.2")
    assert config.task.params == {"noise": 0.2}
    other = _write(tmp_path, "task:\n  name: my_tasks:build\n  params:\n"
                   "    noise: 0.3\n    layers: {a: 1}\n", "other.yaml")
    config = config_lib.load([base, other], "task.params.layers.b=2")
    assert config.task.params == {"noise": 0.3, "layers": {"a": 1, "b": 2}}
    assert config.task.optimizer.learning_rate == 3e-3  # the rest is kept


def test_char_lm_keys_at_their_old_places_say_where_they_are_now(tmp_path):
    path = _write(tmp_path, "task:\n  model:\n    d_model: 64\n"
                  "    num_heads: 2\n")
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(path)
    assert str(e.value) == (
        f"{path}: unknown key `task.model`: the char_lm task's keys moved "
        "under `task.params` (`task.model.d_model` -> `task.params.d_model`, "
        "`task.model.num_heads` -> `task.params.num_heads`).")
    with pytest.raises(config_lib.ConfigError,
                       match=r"`task.data.seq_len` -> `task.params.seq_len`"):
        config_lib.load([], "task.data.seq_len=32")


def test_task_params_of_a_dataclass_are_type_checked():
    params = config_lib.task_params(config_lib.CharLMParams,
                                    {"d_model": 64}, {})
    assert params.d_model == 64 and params.seq_len == 64
    with pytest.raises(config_lib.ConfigError,
                       match=r"key `task.params.d_model` must be an integer"):
        config_lib.task_params(config_lib.CharLMParams, {"d_model": "wide"})
