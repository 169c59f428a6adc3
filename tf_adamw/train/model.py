"""A small decoder-only transformer language model as a plain `tf.Module`.

Pre-LayerNorm blocks (causal self-attention, GELU MLP), learned position
embeddings and an output layer tied to the token embedding. Variables are
float32 and named `<scope>/<kind>` (`block_0/attention/qkv/kernel`,
`block_0/ln_1/scale`, ...), so weight decay can be excluded by name. The
forward pass takes a `compute_dtype`: with bfloat16 the matmuls run in
bfloat16 on bfloat16 copies of the float32 variables (the gradients come back
float32); LayerNorm statistics, the softmax and the logits stay float32.

Parameters are initialised from a seeded NumPy generator, so every replica,
worker and re-run starts from the same values.
"""

import numpy as np
import tensorflow as tf


class _Params:
    """Creates named, seeded variables for one model."""

    def __init__(self, seed):
        self._rng = np.random.default_rng(seed)
        self.variables = []

    def _add(self, name, value):
        variable = tf.Variable(value.astype(np.float32), name=name)
        self.variables.append(variable)
        return variable

    def normal(self, name, shape, stddev):
        return self._add(name, self._rng.normal(0.0, stddev, size=shape))

    def zeros(self, name, shape):
        return self._add(name, np.zeros(shape))

    def ones(self, name, shape):
        return self._add(name, np.ones(shape))


class TransformerLM(tf.Module):
    """Character-level causal transformer language model.

    Args:
        vocab_size: number of token ids.
        seq_len: the longest input (size of the position embedding).
        d_model: width of the residual stream.
        num_layers: number of transformer blocks.
        num_heads: attention heads (must divide d_model).
        mlp_ratio: hidden width of the MLP as a multiple of d_model.
        seed: initialisation seed.
        compute_dtype: the dtype of the forward pass unless a call says
            otherwise ("float32", "bfloat16" or "float16").
    """

    def __init__(self, *, vocab_size, seq_len, d_model, num_layers,
                 num_heads, mlp_ratio, seed, compute_dtype="float32",
                 name="transformer_lm"):
        super().__init__(name=name)
        self._compute_dtype = tf.as_dtype(compute_dtype)
        if d_model % num_heads:
            raise ValueError(
                f"d_model={d_model} must be divisible by "
                f"num_heads={num_heads}.")
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.d_model = d_model
        self.num_layers = num_layers
        self.num_heads = num_heads
        p = _Params(seed)
        std = 0.02
        # GPT-2 style: residual projections scaled by 1/sqrt(2 * layers).
        out_std = std / np.sqrt(2.0 * num_layers)
        hidden = mlp_ratio * d_model
        self.embeddings = p.normal("embedding/embeddings",
                                   (vocab_size, d_model), std)
        self.positions = p.normal("position_embedding/embeddings",
                                  (seq_len, d_model), std)
        self.blocks = []
        for i in range(num_layers):
            s = f"block_{i}"
            self.blocks.append(dict(
                ln_1_scale=p.ones(f"{s}/ln_1/scale", (d_model,)),
                ln_1_bias=p.zeros(f"{s}/ln_1/bias", (d_model,)),
                qkv_kernel=p.normal(f"{s}/attention/qkv/kernel",
                                    (d_model, 3 * d_model), std),
                qkv_bias=p.zeros(f"{s}/attention/qkv/bias", (3 * d_model,)),
                out_kernel=p.normal(f"{s}/attention/output/kernel",
                                    (d_model, d_model), out_std),
                out_bias=p.zeros(f"{s}/attention/output/bias", (d_model,)),
                ln_2_scale=p.ones(f"{s}/ln_2/scale", (d_model,)),
                ln_2_bias=p.zeros(f"{s}/ln_2/bias", (d_model,)),
                mlp_in_kernel=p.normal(f"{s}/mlp/in/kernel",
                                       (d_model, hidden), std),
                mlp_in_bias=p.zeros(f"{s}/mlp/in/bias", (hidden,)),
                mlp_out_kernel=p.normal(f"{s}/mlp/out/kernel",
                                        (hidden, d_model), out_std),
                mlp_out_bias=p.zeros(f"{s}/mlp/out/bias", (d_model,)),
            ))
        self.ln_f_scale = p.ones("final_ln/scale", (d_model,))
        self.ln_f_bias = p.zeros("final_ln/bias", (d_model,))
        # The list the optimizer and checkpoints see, in a fixed order.
        self.params = p.variables

    @property
    def trainable_variables(self):
        """`params`, in creation order.

        The optimizer's slots (and their checkpoint keys) follow this order,
        and the gradients' global norm sums in it; tf.Module's own property
        would sort the variables by attribute name instead.
        """
        return tuple(self.params)

    @staticmethod
    def _layer_norm(x, scale, bias, dtype):
        x = tf.cast(x, tf.float32)
        mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
        x = (x - mean) * tf.math.rsqrt(variance + 1e-5)
        return tf.cast(x * scale + bias, dtype)

    def _attention(self, x, block, dtype):
        batch, length = tf.shape(x)[0], tf.shape(x)[1]
        heads, width = self.num_heads, self.d_model // self.num_heads
        qkv = tf.matmul(x, tf.cast(block["qkv_kernel"], dtype)) + tf.cast(
            block["qkv_bias"], dtype)
        qkv = tf.reshape(qkv, [batch, length, 3, heads, width])
        q, k, v = tf.unstack(qkv, axis=2)
        scores = tf.einsum("bqhd,bkhd->bhqk", q, k)
        scores = tf.cast(scores, tf.float32) * (1.0 / np.sqrt(width))
        causal = tf.linalg.band_part(tf.ones([length, length], tf.bool), -1, 0)
        scores = tf.where(causal, scores, tf.constant(-1e9, tf.float32))
        weights = tf.cast(tf.nn.softmax(scores, axis=-1), dtype)
        out = tf.einsum("bhqk,bkhd->bqhd", weights, v)
        out = tf.reshape(out, [batch, length, self.d_model])
        return tf.matmul(out, tf.cast(block["out_kernel"], dtype)) + tf.cast(
            block["out_bias"], dtype)

    def _mlp(self, x, block, dtype):
        h = tf.matmul(x, tf.cast(block["mlp_in_kernel"], dtype)) + tf.cast(
            block["mlp_in_bias"], dtype)
        h = tf.nn.gelu(h, approximate=True)
        return tf.matmul(h, tf.cast(block["mlp_out_kernel"], dtype)) + tf.cast(
            block["mlp_out_bias"], dtype)

    def __call__(self, tokens, training=False, compute_dtype=None):
        """Logits (float32, [batch, length, vocab]) for int `tokens`.

        `training` changes nothing (no dropout); `compute_dtype` None is the
        model's own.
        """
        del training
        dtype = tf.as_dtype(compute_dtype or self._compute_dtype)
        length = tf.shape(tokens)[1]
        x = tf.gather(self.embeddings, tokens) + self.positions[:length]
        x = tf.cast(x, dtype)
        for block in self.blocks:
            x += self._attention(self._layer_norm(
                x, block["ln_1_scale"], block["ln_1_bias"], dtype), block,
                dtype)
            x += self._mlp(self._layer_norm(
                x, block["ln_2_scale"], block["ln_2_bias"], dtype), block,
                dtype)
        x = self._layer_norm(x, self.ln_f_scale, self.ln_f_bias, dtype)
        logits = tf.matmul(x, tf.cast(self.embeddings, dtype),
                           transpose_b=True)
        return tf.cast(logits, tf.float32)

