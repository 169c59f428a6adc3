"""`python -m tf_adamw.kernels [--force]`: builds the kernel, prints its path.

`--force` rebuilds even if a verified library is cached. The build writes
the library's checksum, so later processes load it without rebuilding. The
library is also loaded here, so a build TensorFlow cannot load fails now
rather than at the first training step.
"""

import sys

import tensorflow as tf

from tf_adamw.kernels import builder


def main():
    """Builds (unless cached), loads and prints the library's path."""
    path = builder.build(force="--force" in sys.argv[1:])
    tf.load_op_library(path)
    print(path)


if __name__ == "__main__":
    main()
