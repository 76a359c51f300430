"""Frame-level transforms (facts §7.5): decode and resize images after the shuffle, then seeded augmentation.

Resizing is the reference's: `tf.image.resize(lanczos3, antialias)` straight to the target size, rounded, clipped and
cast to uint8. Augmentation is the reference's recipe with two fixes: every op is seeded statelessly from the frame's
seed (a pure function of the pipeline seed and the frame's position), and the random-resized-crop draws independent
height and width offsets (the reference reused one seed, sliding every crop along the diagonal).
"""

import math
from typing import Any

from vla_train.data.tf_setup import tf

REFERENCE_AUGMENTATION: dict[str, Any] = {
    "random_resized_crop": {"scale": [0.9, 0.9], "ratio": [1.0, 1.0]},
    "random_brightness": [0.2],
    "random_contrast": [0.8, 1.2],
    "random_saturation": [0.8, 1.2],
    "random_hue": [0.05],
    "augment_order": ["random_resized_crop", "random_brightness", "random_contrast", "random_saturation",
                      "random_hue"],
}


def resize_uint8(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """`[H, W, C]` uint8 -> `[h, w, C]` uint8 with lanczos3 + antialias, rounded and clipped.

    An image already at the target size is returned as is: at scale 1 the lanczos kernel only samples its own pixels,
    so the resize would reproduce it exactly, at a cost.
    """

    def resize() -> tf.Tensor:
        resized = tf.image.resize(tf.cast(image, tf.float32), size, method="lanczos3", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

    same_size = tf.reduce_all(tf.equal(tf.shape(image)[:2], tf.constant(size)))
    return tf.ensure_shape(tf.cond(same_size, lambda: tf.cast(image, tf.uint8), resize), (*size, None))


def decode_image(encoded: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """Encoded bytes (or "" for a missing image, which becomes black) -> `[h, w, 3]` uint8."""

    def decode() -> tf.Tensor:
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
        return resize_uint8(image, size)

    return tf.cond(tf.equal(tf.strings.length(encoded), 0), lambda: tf.zeros((*size, 3), tf.uint8), decode)


def decode_frame_images(frame: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    """Decode every `observation.image_*` of a frame (`[window]` encoded -> `[window, h, w, 3]` uint8)."""
    observation = dict(frame["observation"])
    for key in [k for k in observation if k.startswith("image_")]:
        observation[key] = _per_window_step(lambda encoded: decode_image(encoded, size), observation[key])
    return {**frame, "observation": observation}


def _per_window_step(fn, values: tf.Tensor) -> tf.Tensor:
    """Apply `fn` to each entry of a `[window, ...]` tensor (unrolled when the window size is static)."""
    window = values.shape[0]
    if window is None:
        return tf.map_fn(fn, values, fn_output_signature=tf.uint8)
    return tf.stack([fn(values[i]) for i in range(window)])


def _random_resized_crop(image: tf.Tensor, seed: tf.Tensor, scale: list[float], ratio: list[float]) -> tf.Tensor:
    seeds = tf.random.experimental.stateless_split(seed, num=4)
    area = tf.random.stateless_uniform([], seeds[0], scale[0], scale[1])
    log_ratio = tf.random.stateless_uniform([], seeds[1], math.log(ratio[0]), math.log(ratio[1]) + 1e-12)
    aspect = tf.exp(log_ratio)
    height = tf.clip_by_value(tf.sqrt(area / aspect), 0.0, 1.0)
    width = tf.clip_by_value(tf.sqrt(area * aspect), 0.0, 1.0)
    top = tf.random.stateless_uniform([], seeds[2], 0.0, 1.0) * (1.0 - height)
    left = tf.random.stateless_uniform([], seeds[3], 0.0, 1.0) * (1.0 - width)
    box = tf.stack([top, left, top + height, left + width])[None]
    shape = tf.shape(image)[:2]
    return tf.image.crop_and_resize(image[None], box, [0], shape)[0]


def augment_image(image: tf.Tensor, seed: tf.Tensor, kwargs: dict[str, Any]) -> tf.Tensor:
    """uint8 `[h, w, 3]` -> augmented uint8, ops in `augment_order`, each with its own stateless seed."""
    image = tf.image.convert_image_dtype(image, tf.float32)
    for index, op in enumerate(kwargs["augment_order"]):
        op_seed = tf.random.experimental.stateless_fold_in(seed, index)
        args = kwargs[op]
        if op == "random_resized_crop":
            image = _random_resized_crop(image, op_seed, args["scale"], args["ratio"])
        elif op == "random_brightness":
            image = tf.image.stateless_random_brightness(image, args[0], op_seed)
        elif op == "random_contrast":
            image = tf.image.stateless_random_contrast(image, args[0], args[1], op_seed)
        elif op == "random_saturation":
            image = tf.image.stateless_random_saturation(image, args[0], args[1], op_seed)
        elif op == "random_hue":
            image = tf.image.stateless_random_hue(image, args[0], op_seed)
        else:
            raise ValueError(f"Unknown augmentation {op!r}; supported: {REFERENCE_AUGMENTATION['augment_order']}.")
        image = tf.clip_by_value(image, 0.0, 1.0)
    return tf.image.convert_image_dtype(image, tf.uint8, saturate=True)


def augment_frame(frame: dict[str, Any], seed: tf.Tensor, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Augment each real (non-padding) image of a decoded frame; camera i uses `fold_in(seed, i)` in sorted order."""
    observation = dict(frame["observation"])
    for view_index, key in enumerate(sorted(k for k in observation if k.startswith("image_"))):
        view_seed = tf.random.experimental.stateless_fold_in(seed, view_index)
        images = observation[key]
        augmented = _per_window_step(lambda image, s=view_seed: augment_image(image, s, kwargs), images)
        is_padding = tf.reduce_all(tf.equal(images, 0), axis=[1, 2, 3])
        observation[key] = tf.where(is_padding[:, None, None, None], images, augmented)
    return {**frame, "observation": observation}
