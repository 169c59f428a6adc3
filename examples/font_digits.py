"""An example task: classify images of the digits 0-9 (MNIST-like, 28x28).

`task.name: examples.font_digits:build` (run the trainer from the
repository root, so that `examples` imports). Config:
`tpu_configs/cpu_font_digits.yaml`.

The data is on disk already, nothing is downloaded: the digits are drawn
from the TrueType fonts that matplotlib (a dependency of the trainer) ships
in `matplotlib/mpl-data/fonts/ttf` -- DejaVu Sans, Serif and Mono, STIX and
Computer Modern, in their regular, bold and italic cuts: 21 fonts with
digits. Each font's digits are rendered with Pillow (matplotlib's own
dependency) many times, each a little rotated, scaled, shifted and
thickened, then anti-aliased down to 28x28 grey levels. The eval fonts
(`eval_fonts`, by default the four STIX fonts) are held out: the eval loss
measures how well the classifier reads digits of a typeface it never saw.

The training batches are a pure function of the batch number (stateless
random indices), so a resumed run sees the batches of an uninterrupted one.
"""

import dataclasses
import os
import typing

import numpy as np
import tensorflow as tf

from tf_adamw.train import config as config_lib
from tf_adamw.train import task as task_lib

DIGITS = "0123456789"
# matplotlib's fonts whose "0"-"9" are digits (cmex10, cmsy10 put symbols
# there, cmmi10 old-style figures; the STIX size and non-Unicode variants
# and the *Display fonts have none).
FONTS = (
    "DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique",
    "DejaVuSans-BoldOblique", "DejaVuSansMono", "DejaVuSansMono-Bold",
    "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique", "DejaVuSerif",
    "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
    "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic",
    "STIXGeneralBolIta", "cmr10", "cmb10", "cmti10", "cmss10", "cmtt10")
_SUPERSAMPLE = 4  # render at 4x, then average down: anti-aliased strokes


@dataclasses.dataclass
class FontDigitsParams:
    """`task.params` of this task."""
    image_size: int = 28
    variants: int = 48  # renderings per training font and digit
    eval_variants: int = 16  # per held-out font and digit
    # Held out for evaluation (file names without .ttf); the rest train.
    # By default the STIX family: a typeface the model never sees.
    eval_fonts: typing.List[str] = dataclasses.field(default_factory=lambda: [
        "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic",
        "STIXGeneralBolIta"])
    conv_channels: int = 16  # the second convolution has twice as many
    hidden: int = 64


def build(params, context):
    """The task factory (`task.name: examples.font_digits:build`).

    Raises:
        config.ConfigError: a key of `task.params` is unknown, of the wrong
            type, or out of range (e.g. an eval font that is not in FONTS).
    """
    p = config_lib.task_params(FontDigitsParams, params)
    for key in ("image_size", "variants", "eval_variants", "conv_channels",
                "hidden"):
        if getattr(p, key) <= 0:
            raise config_lib.ConfigError(
                f"key `task.params.{key}` must be > 0; got "
                f"{getattr(p, key)}.")
    if p.image_size % 4:
        raise config_lib.ConfigError(
            "key `task.params.image_size` must be a multiple of 4 (two 2x2 "
            f"poolings); got {p.image_size}.")
    unknown = sorted(set(p.eval_fonts) - set(FONTS))
    if unknown or not p.eval_fonts or set(p.eval_fonts) == set(FONTS):
        raise config_lib.ConfigError(
            "key `task.params.eval_fonts` must name some (not all) of "
            f"{', '.join(FONTS)}; got {p.eval_fonts}.")
    return FontDigitsTask(p, context)


def font_path(name):
    """The TrueType file of font `name` in matplotlib's data directory."""
    import matplotlib  # pylint: disable=g-import-not-at-top
    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf",
                        name + ".ttf")


def render(font_name, count, size, seed):
    """`count` renderings of each digit in one font: uint8 [10 * count,
    size, size] (white on black) and their int32 labels."""
    # Pillow: matplotlib's own dependency, needed only to draw.
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
    from PIL import ImageFont  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(seed)
    big = size * _SUPERSAMPLE
    fonts = {}  # loading a font costs more than drawing with it
    images, labels = [], []
    for label, digit in enumerate(DIGITS):
        for _ in range(count):
            points = int(big * rng.uniform(0.6, 0.85))
            if points not in fonts:
                fonts[points] = ImageFont.truetype(font_path(font_name),
                                                   points)
            font = fonts[points]
            canvas = Image.new("L", (big, big), 0)
            centre = big / 2 + rng.uniform(-0.08, 0.08, 2) * big
            ImageDraw.Draw(canvas).text(
                tuple(centre), digit, fill=255, font=font, anchor="mm",
                stroke_width=int(rng.integers(0, 3)), stroke_fill=255)
            canvas = canvas.rotate(rng.uniform(-12, 12),
                                   resample=Image.BILINEAR)
            images.append(np.asarray(canvas.resize((size, size),
                                                   Image.BOX)))
            labels.append(label)
    return np.stack(images), np.array(labels, np.int32)


def _render_fonts(fonts, count, size, seed):
    """`render` for each font, concatenated; each font draws from its own
    random stream, so one font's images do not depend on the others'."""
    parts = [render(name, count, size, seed * 1000 + FONTS.index(name))
             for name in fonts]
    return (np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]))


class ConvNet(tf.Module):
    """Two 3x3 convolutions (ReLU, 2x2 max-pool each), a hidden dense layer
    and 10 logits. Seeded initial values; computes in `compute_dtype`."""

    def __init__(self, image_size, channels, hidden, seed, compute_dtype):
        super().__init__(name="conv_net")
        rng = np.random.default_rng(seed)
        self._dtype = tf.as_dtype(compute_dtype)
        flat = (image_size // 4) ** 2 * 2 * channels
        shapes = {"conv_1/kernel": (3, 3, 1, channels),
                  "conv_2/kernel": (3, 3, channels, 2 * channels),
                  "dense_1/kernel": (flat, hidden),
                  "logits/kernel": (hidden, len(DIGITS))}
        self.params = []
        for name, shape in shapes.items():
            fan_in = int(np.prod(shape[:-1]))
            self.params.append(tf.Variable(
                rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(
                    np.float32), name=name))
            self.params.append(tf.Variable(
                np.zeros(shape[-1], np.float32),
                name=name.replace("kernel", "bias")))

    @property
    def trainable_variables(self):
        """`params` in creation order (tf.Module's would sort by name): the
        order the optimizer's slots and checkpoints are keyed by."""
        return tuple(self.params)

    def __call__(self, images, training=False):
        """Logits [batch, 10] (float32) for images [batch, size, size] in
        [0, 1]."""
        del training  # no dropout
        w = [tf.cast(v, self._dtype) for v in self.params]
        x = tf.cast(images, self._dtype)[..., None]
        for kernel, bias in (w[0:2], w[2:4]):
            x = tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME") + bias)
            x = tf.nn.max_pool2d(x, 2, 2, "VALID")
        x = tf.reshape(x, [tf.shape(x)[0], -1])
        x = tf.nn.relu(tf.matmul(x, w[4]) + w[5])
        return tf.cast(tf.matmul(x, w[6]) + w[7], tf.float32)


class FontDigitsTask(task_lib.Task):
    """Digit classification on font renderings; held-out fonts for eval."""

    def __init__(self, params, context):
        self.params = params
        self._seed = context.seed
        self._compute_dtype = context.compute_dtype
        self._train_fonts = [f for f in FONTS if f not in params.eval_fonts]
        self._data = {}  # rendered on first use: split -> (images, labels)

    def _split(self, name):
        """(uint8 images, int32 labels) of "train" or "eval", drawn once."""
        if name not in self._data:
            p = self.params
            fonts, count, seed = (
                (self._train_fonts, p.variants, self._seed) if name == "train"
                else (p.eval_fonts, p.eval_variants, self._seed + 1))
            self._data[name] = _render_fonts(fonts, count, p.image_size, seed)
        return self._data[name]

    def build_model(self):
        p = self.params
        return ConvNet(p.image_size, p.conv_channels, p.hidden, self._seed,
                       self._compute_dtype)

    def train_dataset(self, global_batch_size, start_step):
        images, labels = self._split("train")
        images, labels = tf.constant(images), tf.constant(labels)
        seed = self._seed

        def batch(step):
            index = tf.random.stateless_uniform(
                [global_batch_size], seed=tf.stack([tf.constant(
                    seed, tf.int64), step]), maxval=labels.shape[0],
                dtype=tf.int64)
            x = tf.cast(tf.gather(images, index), tf.float32) / 255.0
            return x, tf.gather(labels, index)

        dataset = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)
        return _options(dataset.map(batch))

    def eval_dataset(self, global_batch_size):
        images, labels = self._split("eval")
        dataset = tf.data.Dataset.from_tensor_slices(
            (images.astype(np.float32) / 255.0, labels))
        return _options(dataset.batch(global_batch_size))

    def loss(self, targets, outputs):
        """Cross-entropy of each image: [batch]."""
        return tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=targets, logits=outputs)

    def serving_module(self, model):
        return ServingModule(model, self.params.image_size)

    def export_summary(self, serving):
        images, labels = self._split("eval")
        digits = serving.serve(tf.constant(images, tf.float32) / 255.0)[
            "digit"].numpy()
        return (f"Held-out fonts ({', '.join(self.params.eval_fonts)}): "
                f"{np.mean(digits == labels):.1%} of {len(labels)} digits "
                "read right by the exported model.")

    def describe_example(self):
        size = self.params.image_size
        return f"{size}x{size} images"


def _options(dataset):
    options = tf.data.Options()
    # Every worker makes the same batches; each keeps its share of them.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return dataset.with_options(options)


class ServingModule(tf.Module):
    """`serve(images)`: float32 [batch, size, size] in [0, 1] (white digit
    on black) to `probabilities` [batch, 10] and the `digit` [batch]."""

    def __init__(self, model, image_size):
        super().__init__(name="serving")
        self.model = model
        self.serve = tf.function(self._serve, input_signature=[
            tf.TensorSpec([None, image_size, image_size], tf.float32,
                          name="images")], autograph=False)

    def _serve(self, images):
        logits = self.model(images)
        return {"probabilities": tf.nn.softmax(logits),
                "digit": tf.argmax(logits, -1, output_type=tf.int32)}
