"""Import TensorFlow once, CPU only: `from vla_train.data.tf_setup import tf`."""

import vla_train  # noqa: F401  (torch / torchvision / timm first)

# isort: split

import tensorflow as tf

tf.config.set_visible_devices([], "GPU")  # TensorFlow never grabs a GPU: torch owns them
