"""A first run of vlm_jax on CPU, no download: build, decode, save, convert, reload.

  python tools/demo.py --workdir runs/demo

Builds a randomly initialised model from a named config (default `tiny`), greedily decodes from a synthetic
image, saves it as a vlm_jax checkpoint and as a HuggingFace directory (where transformers has a model for the family:
PaliGemma, or LLaVA with an image_token_id), loads them back with `vlm_jax.load`, and checks that all give the
same logits and the same tokens. Exits non-zero if not.
"""
import argparse
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="new directory for the checkpoints this writes")
  parser.add_argument("--config", default="tiny", help="model config name (default: tiny; see "
                      "vlm_jax.models.registry.CONFIGS — the real ones need tens of GB)")
  parser.add_argument("--seed", type=int, default=0, help="init seed")
  args = parser.parse_args(argv)
  from vlm_jax.models.registry import CONFIGS, get_model_config
  if args.config not in CONFIGS:
    parser.error(f"--config {args.config!r} is not a model config; known: {', '.join(sorted(CONFIGS))}")
  from vlm_jax import fileutil
  try:
    fileutil.check_new_dir(args.workdir, "--workdir ")
  except FileExistsError as e:
    parser.error(str(e))

  import numpy as np
  import vlm_jax
  from vlm_jax.api import Model
  from vlm_jax.models.vlm import init_params

  t0 = time.time()
  cfg = get_model_config(args.config)
  model = Model(cfg, init_params(cfg, args.seed))
  n_params = sum(x.size for x in __import__("jax").tree.leaves(model.params))
  print(f"built {args.config}: {n_params:,} params ({time.time() - t0:.1f}s)")

  size = cfg.img.image_size
  yy, xx = np.mgrid[:size, :size]
  image = np.zeros((1, size, size, 3), np.uint8)
  image[0, (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2] = (220, 40, 40)  # a red disc
  prefix = np.array([[2, 10, 11, 12]], np.int32)
  tokens, mask_ar = np.array([[2, 10, 11, 12, 20, 21]]), np.array([[0, 0, 0, 0, 1, 1]])
  ids = np.asarray(model.generate_ids(image, prefix, max_new_tokens=8))
  print(f"greedy tokens: {ids[0].tolist()} ({time.time() - t0:.1f}s)")

  ckpt, hf_dir = os.path.join(args.workdir, "vlm_jax_ckpt"), os.path.join(args.workdir, "hf")
  model.save(ckpt)
  written = [ckpt]
  try:
    model.save_hf(hf_dir)
    written.append(hf_dir)
  except ValueError as e:  # a family (or a config) transformers has no model for
    print(f"no HuggingFace export for {args.config}: {e}")
  print(f"wrote {' and '.join(written)} ({time.time() - t0:.1f}s)")

  ref = np.asarray(model.logits(image, tokens, mask_ar))
  for path in written:
    loaded = vlm_jax.load(path)
    err = float(np.abs(np.asarray(loaded.logits(image, tokens, mask_ar)) - ref).max())
    same = np.array_equal(np.asarray(loaded.generate_ids(image, prefix, max_new_tokens=8)), ids)
    print(f"reloaded {path}: max logit difference {err:.2e}, same tokens: {same}")
    if err > 1e-5 or not same:
      print("error: the reloaded model differs", file=sys.stderr)
      return 1
  print(f"ok ({time.time() - t0:.1f}s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
