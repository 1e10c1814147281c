"""Image files and arrays to the model's input: every PIL mode as it is meant to be seen, arrays range-checked."""
import numpy as np
import pytest
from PIL import Image

from vlm_jax.data.image import pil_to_rgb, to_rgb_array
from vlm_jax.data.llava_json import load_image


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
  values = (np.arange(48 * 48).reshape(48, 48) * 28).astype(np.uint16)  # 0 .. 64484
  Image.fromarray(values).save(tmp_path / "g16.png")
  assert Image.open(tmp_path / "g16.png").mode.startswith("I")
  rgb = load_image(str(tmp_path / "g16.png"))
  np.testing.assert_array_equal(rgb[..., 0], np.round(values / 257).astype(np.uint8))
  assert (rgb[..., 0] == rgb[..., 2]).all() and rgb.min() == 0 and rgb.max() == 251  # PIL's convert: all 255


def test_exif_orientation_turns_the_image_upright(tmp_path):
  stored = np.zeros((40, 80, 3), np.uint8)
  stored[:, :10] = 255  # a white band on the stored image's left edge
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to display": a phone held upright
  Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
  rgb = load_image(str(tmp_path / "phone.jpg"))
  assert rgb.shape == (80, 40, 3)  # as displayed
  assert rgb[:10].mean() > 200 and rgb[-10:].mean() < 50  # the band is now on top


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P_transparent", "L", "P", "CMYK", "RGB"])
def test_modes_convert_as_transformers_processors_do(mode):
  """Transparent pixels composite onto white, as transformers' `convert_to_rgb` (which its SigLIP processor
  runs) does; plain conversion would make them black. Opaque modes convert as PIL does."""
  from transformers.image_transforms import convert_to_rgb
  rs = np.random.RandomState(0)
  rgba = rs.randint(0, 256, (16, 16, 4)).astype(np.uint8)
  rgba[8:, :, 3] = 0  # bottom half fully transparent
  base = Image.fromarray(rgba, "RGBA")
  if mode == "P_transparent":
    image = base.convert("RGB").quantize(8)
    image.info["transparency"] = 0
  else:
    image = base if mode == "RGBA" else base.convert(mode)
  ours = pil_to_rgb(image)
  np.testing.assert_array_equal(ours, np.asarray(convert_to_rgb(image)))
  if mode == "RGBA":
    assert (ours[8:] == 255).all()


def test_arrays_are_scaled_by_their_type_or_refused():
  u8 = np.random.RandomState(0).randint(0, 256, (8, 8, 3)).astype(np.uint8)
  want = to_rgb_array(u8, 8)
  np.testing.assert_allclose(to_rgb_array(u8.astype(np.int64), 8), want)
  np.testing.assert_allclose(to_rgb_array(u8.astype(np.uint16) * 257, 8), want)
  np.testing.assert_allclose(to_rgb_array(want, 8), want)  # floats in [-1, 1] pass through
  with pytest.raises(ValueError, match=r"an integer image must hold values in \[0, 255\].*int64 values in \[300, 300"):
    to_rgb_array(np.full((8, 8, 3), 300, np.int64), 8)
  with pytest.raises(ValueError, match=r"a float image must hold values in \[-1, 1\].*values in \[200.0, 200.0\]"):
    to_rgb_array(np.full((8, 8, 3), 200.0, np.float32), 8)
  with pytest.raises(ValueError, match="must hold numbers"):
    to_rgb_array(np.zeros((8, 8, 3), bool), 8)
