"""Image inputs to the model's format: float32 [B,H,W,3] in [-1, 1] at the model's resolution."""
import numpy as np
from PIL import Image


def to_rgb_array(image, size: int) -> np.ndarray:
  """A PIL image or array of any size/mode (uint8 [0,255], or float already in [-1,1]) -> float32 [size,size,3]."""
  if isinstance(image, Image.Image):
    image = np.asarray(image.convert("RGB"))
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"an image must be [H,W], [H,W,1], [H,W,3] or [H,W,4]; got shape {image.shape}.")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  image = image[..., :3]
  if image.dtype == np.uint8:
    if image.shape[:2] != (size, size):
      image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    return image.astype(np.float32) / 127.5 - 1.0
  image = image.astype(np.float32)
  if image.shape[:2] != (size, size):
    channels = [np.asarray(Image.fromarray(image[..., c]).resize((size, size), Image.BILINEAR)) for c in range(3)]
    image = np.stack(channels, axis=-1)
  return image


def to_model_input(images, size: int) -> np.ndarray:
  """A batch (list of images, or an array [B,H,W,C]) -> float32 [B,size,size,3] in [-1, 1]."""
  if isinstance(images, np.ndarray) and images.ndim not in (3, 4):
    raise ValueError(f"images must be a batch [B,H,W,3] (or a list of images); got shape {images.shape}.")
  if isinstance(images, np.ndarray) and images.ndim == 3:
    raise ValueError(f"images must be a batch [B,H,W,3]; got one image of shape {images.shape} "
                     "(wrap it in a list or add a batch axis).")
  return np.stack([to_rgb_array(im, size) for im in images])
