"""tpu_configs/*.yaml and the trainer's config loader (no training here)."""

import glob
import os

import pytest

from tf_adamw.train import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "tpu_configs")
CONFIG_FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))
REQUIRED = ["cpu_local", "cpu_mirrored_4", "multiworker_local_2",
            "tpu_v4_8_bf16", "tpu_v5e_8_bf16", "tpu_v5p_128_bf16"]


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
    loaded.trainer.model_dir = ""
    assert config_lib.to_dict(loaded) == config_lib.to_dict(
        config_lib.Config())


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
    ("task:\n  model: 3\n", "task.model"),
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
    ("runtime:\n  mixed_precision_dtype: float16\n",
     "runtime.mixed_precision_dtype"),
    ("trainer:\n  log_every_n_steps: 30\n", "trainer.log_every_n_steps"),
    ("task:\n  model:\n    num_heads: 3\n", "task.model.num_heads"),
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
    assert config.task.model.d_model == 128  # from cpu_local.yaml


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
