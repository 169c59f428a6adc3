"""Packaging for tf_adamw: Keras's AdamW as a fused or XLA `tf.Module`."""

import setuptools

setuptools.setup(
    name="tf_adamw",
    version="0.1.0",
    description=(
        "Keras's AdamW as a tf.Module: XLA-compiled, tf.distribute-correct, "
        "checkpointable."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["tf_adamw", "tf_adamw.*"]),
    # The fused kernel's C++ source, compiled on first use (tf_adamw.kernels).
    package_data={"tf_adamw": ["cc/*.cc"]},
    python_requires=">=3.10",
    install_requires=[
        "tensorflow==2.21.0",
        "absl-py",
        # The trainer (python -m tf_adamw.train): configs and the loss curve.
        "pyyaml",
        "matplotlib",
    ],
    extras_require={
        # tensorboard: Keras's TensorBoard callback in the fit() tests.
        "test": ["pytest", "tensorboard"],
        # TFP 0.25 imports tf_keras; both are needed for tfp.math.minimize.
        "tfp": ["tensorflow-probability==0.25.0", "tf-keras==2.21.0"],
    },
)
