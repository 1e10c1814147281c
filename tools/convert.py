"""Converts PaliGemma and LLaVA-style checkpoints from HuggingFace, big_vision or vlm_jax format to
HuggingFace or vlm_jax format.

  python tools/convert.py --from hf ./paligemma-3b-pt-224 --to vlm_jax ./ckpt --dtype bfloat16

Run `python tools/convert.py --help` for the formats and flags.
"""
import argparse
import os
import sys
import time

# `python tools/convert.py` puts tools/, not the repo root, on sys.path: add the root so a plain checkout
# works without `pip install -e .` (and this checkout's package wins over another installed copy).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

# Conversion is host-side work: keep JAX off any accelerator (whose memory a training job may be using)
# unless the caller asks for one explicitly.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SOURCES = ("hf", "big_vision", "vlm_jax")
TARGETS = ("hf", "vlm_jax")
DTYPES = ("float32", "bfloat16")
# Errors that mean "bad input" (wrong path, checkpoint that does not fit, occupied output), not a bug.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)

EPILOG = """\
formats:
  hf          a HuggingFace PaliGemmaForConditionalGeneration or LlavaForConditionalGeneration directory
              (config.json + *.safetensors)
  big_vision  a big_vision .npz file (keys params/img/..., params/llm/...); needs --config
  vlm_jax     a vlm_jax checkpoint directory (vlm_config.json + Orbax params/), or a training workdir (its
              exported model/)

model configs for --config:
  {configs}

examples:
  # a HuggingFace download to a vlm_jax checkpoint, params stored and computed in bfloat16
  python tools/convert.py --from hf ./paligemma-3b-pt-224 --to vlm_jax ./ckpt/pg3b --dtype bfloat16

  # a big_vision .npz (which stores no config) to a HuggingFace directory
  python tools/convert.py --from big_vision ./pt_224.npz --to hf ./hf/pg3b --config paligemma_3b_224

  # a fine-tuned vlm_jax checkpoint back to HuggingFace
  python tools/convert.py --from vlm_jax ./ckpt/finetuned --to hf ./hf/finetuned
"""


def config_names() -> list[str]:
  from vlm_jax.models.registry import CONFIGS
  return sorted(CONFIGS)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="convert.py",
      description="Convert a PaliGemma or LLaVA-style model from a HuggingFace, big_vision or vlm_jax checkpoint "
                  "to a HuggingFace or vlm_jax one. "
                  "Every tensor is checked against the model's expected shape before anything is written.",
      epilog=EPILOG.format(configs=", ".join(config_names())),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  # PATH and OUT belong to --from / --to (not free positionals), so the flags may come in either order.
  parser.add_argument("--from", dest="src", nargs=2, metavar=("FORMAT", "PATH"), required=True,
                      help=f"read PATH, a checkpoint in FORMAT: {', '.join(SOURCES)} (see formats below); "
                           "a directory, or a .npz file for big_vision")
  parser.add_argument("--to", dest="dst", nargs=2, metavar=("FORMAT", "OUT"), required=True,
                      help=f"write directory OUT in FORMAT: {', '.join(TARGETS)}; OUT must not exist yet or "
                           "be empty (nothing is overwritten)")
  parser.add_argument("--dtype", choices=DTYPES, default=None,
                      help="dtype of the written params, and for vlm_jax output also the compute dtype in "
                           "its config (default: from hf to hf, the dtype the source's config.json names; "
                           "otherwise the source's compute dtype: float32 for hf and big_vision, what a vlm_jax "
                           "checkpoint was saved with)")
  parser.add_argument("--config", metavar="NAME", default=None,
                      help="model config name (list below). Required with --from big_vision; with hf or "
                           "vlm_jax it replaces the config stored with the checkpoint")
  return parser


def log(msg: str):
  print(msg, file=sys.stderr, flush=True)


def read_model(src: str, path: str, config):
  """A `Model` from PATH, which must hold format `src`; `config` (or None) overrides the stored one."""
  import vlm_jax
  from vlm_jax import checkpoint
  path = checkpoint.model_dir(path)
  if (found := vlm_jax.format_of(path)) != src:
    raise ValueError(f"{path} holds a {found} checkpoint, not {src}: pass --from {found}.")
  return vlm_jax.load(path, config=config)


def output_dtype(model, dtype: str | None, stored: str | None = None) -> str:
  """--dtype, else the `stored` dtype of a HuggingFace source written to HuggingFace, else the model's compute
  dtype: the HuggingFace and big_vision loaders restore params as float32 even from bfloat16 files, so the
  params' own dtype would silently double the output's size."""
  return dtype or stored or model.config.llm.dtype


def hf_stored_dtype(path: str) -> str | None:
  """The dtype a HuggingFace directory's config.json says its weights are in (transformers 5's `dtype`, 4's
  `torch_dtype`), if it is one --dtype offers; None otherwise (float16: float32 keeps it exactly)."""
  from vlm_jax import fileutil
  config = fileutil.read_json(os.path.join(path, "config.json"))
  dtype = config.get("dtype") or config.get("torch_dtype")
  return dtype if dtype in DTYPES else None


def write_model(model, dst: str, out: str, dtype: str):
  if dst == "hf":  # PaliGemma or LLaVA by the model's family; the config is checked before anything is written
    model.save_hf(out, dtype=dtype)
  else:
    model.with_dtype(dtype).save(out)


def describe(model) -> str:
  import jax
  import numpy as np
  cfg = model.config
  n = sum(int(np.size(x)) for x in jax.tree.leaves(model.params))
  tok = ", with tokenizer" if model.tokenizer is not None else ""
  llm = cfg.llm  # an encoder-decoder (T5) has two depths
  depth = f"{llm.encoder_depth}+{llm.decoder_depth}" if hasattr(llm, "encoder_depth") else llm.depth
  return (f"config {cfg.name or '(unnamed)'}: vision {cfg.img.width}x{cfg.img.depth}, "
          f"text {llm.width}x{depth}, {n:,} params{tok}")


def convert(args):
  start = time.time()
  from vlm_jax import fileutil
  fileutil.check_new_dir(args.out)  # before the (slow) load: stale shards next to new ones would corrupt it
  from vlm_jax.models.registry import get_model_config
  config = get_model_config(args.config) if args.config else None
  log(f"reading {args.src} checkpoint {args.path}" + (f" as config {args.config}" if config else ""))
  model = read_model(args.src, args.path, config)
  log(f"read in {time.time() - start:.1f}s; {describe(model)}")
  dtype = output_dtype(model, args.dtype, hf_stored_dtype(args.path) if args.src == args.dst == "hf" else None)
  log(f"writing {args.dst} checkpoint {args.out} in {dtype}")
  write_model(model, args.dst, args.out, dtype)
  log(f"done in {time.time() - start:.1f}s")


def parse_args(argv=None) -> argparse.Namespace:
  """Parsed flags with args.src/path and args.dst/out split; usage errors exit with status 2."""
  parser = build_parser()
  args = parser.parse_args(argv)
  (args.src, args.path), (args.dst, args.out) = args.src, args.dst
  if args.src not in SOURCES:
    parser.error(f"--from: unknown format {args.src!r}; choose from {', '.join(SOURCES)}.")
  if args.dst not in TARGETS:
    parser.error(f"--to: unknown format {args.dst!r}; choose from {', '.join(TARGETS)}.")
  if args.src == "big_vision" and not args.config:
    parser.error("--from big_vision needs --config NAME: a .npz stores no model config "
                 "(e.g. --config paligemma_3b_224).")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    convert(args)
  except USER_ERRORS as e:
    log(f"error: {e}")
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
