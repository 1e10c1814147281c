"""Image inputs to the model's format: float32 [B,H,W,3] in [-1, 1] at the model's resolution."""
import numpy as np
from PIL import Image, ImageOps


def pil_to_rgb(image: Image.Image) -> np.ndarray:
  """uint8 [H,W,3] RGB of a PIL image of any mode, as it is meant to be seen: turned upright by its EXIF
  orientation (a phone photo is stored sideways), transparent pixels on white (as transformers' processors
  composite them; a plain convert("RGB") makes them black), 16-bit grayscale scaled to 8 bits (PIL's convert
  clips every value above 255, which turns a 16-bit image white)."""
  image = ImageOps.exif_transpose(image)
  if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
    return np.repeat(_from_16_bits(np.clip(np.asarray(image), 0, 65535))[..., None], 3, axis=-1)
  if image.mode == "RGB":
    return np.asarray(image, np.uint8)
  if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
    rgba = image.convert("RGBA")
    image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255)), rgba)
  return np.asarray(image.convert("RGB"), np.uint8)


def _from_16_bits(values) -> np.ndarray:
  """[0, 65535] -> uint8 [0, 255], 65535 / 255 = 257 to a level."""
  return np.round(np.asarray(values, np.float64) / 257).astype(np.uint8)


def to_rgb_array(image, size: int) -> np.ndarray:
  """A PIL image (any mode: `pil_to_rgb`) or an array of any size -> float32 [size,size,3] in [-1, 1]. Arrays:
  uint8 (or other integers) in [0, 255], uint16 in [0, 65535], or floats already in [-1, 1]; anything else is
  refused rather than fed to the model out of range."""
  if isinstance(image, Image.Image):
    image = pil_to_rgb(image)
  image = np.asarray(image)
  if image.dtype.kind not in "uif":
    raise ValueError(f"an image array must hold numbers, got dtype {image.dtype}.")
  if image.dtype == np.uint16:
    image = _from_16_bits(image)
  elif image.dtype.kind in "ui":
    if image.size and (image.min() < 0 or image.max() > 255):
      raise ValueError(f"an integer image must hold values in [0, 255] (uint16: [0, 65535]); got {image.dtype} "
                       f"values in [{image.min()}, {image.max()}].")
    image = image.astype(np.uint8)
  elif image.size and not (np.all(np.isfinite(image)) and -1.0 - 1e-3 <= image.min() and image.max() <= 1.0 + 1e-3):
    raise ValueError(f"a float image must hold values in [-1, 1] (the model's range; pass uint8 for [0, 255]); "
                     f"got {image.dtype} values in [{np.nanmin(image)}, {np.nanmax(image)}].")
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
