"""Training augmentation (flip p, bilinear rotation within +-max degrees), jit-compiled.

It runs inside the jitted train step on grayscale pixels before normalisation (three times
cheaper than on RGB). The randomness comes only from the key the batch stream hands out, so
two heads trained with the same seed see identical augmented images.
"""

from __future__ import annotations

import dm_pix as pix
import jax
import jax.numpy as jnp


def augment(
    images: jax.Array, key: jax.Array, *, hflip_p: float = 0.5, max_rotation_deg: float = 15.0
) -> jax.Array:
    """Augment a (B, H, W) float batch; each image gets its own flip and angle."""
    keys = jax.random.split(key, images.shape[0])

    def one(image: jax.Array, k: jax.Array) -> jax.Array:
        k_flip, k_rot = jax.random.split(k)
        image = image[..., None]  # HWC for dm-pix
        image = pix.random_flip_left_right(k_flip, image, probability=hflip_p)
        if max_rotation_deg > 0:
            degrees = jax.random.uniform(
                k_rot, (), minval=-max_rotation_deg, maxval=max_rotation_deg
            )
            # dm-pix takes radians; the study's code passed degrees' numbers as radians.
            image = pix.rotate(image, jnp.deg2rad(degrees), order=1, mode="constant", cval=0.0)
        return image[..., 0]

    return jax.vmap(one)(images, keys)
