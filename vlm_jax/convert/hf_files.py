"""What the conversion of every HuggingFace family (`hf`: PaliGemma, `hf_llava`, `hf_llama`, `hf_t5`) shares:
a directory's safetensors read under canonical names, their shapes checked against a model, and the files an
export writes (sharded weights, config.json, generation_config.json, tokenizer and processor files).

Key prefixes differ between transformers versions and the hub files (`model.vision_tower.` /
`vision_tower.vision_model.` / `language_model.model.`); `canonical_name` maps them all onto one layout before
conversion.
"""
import glob
import json
import os

import jax
import numpy as np

from vlm_jax import treeutil
from vlm_jax.convert import safetensors_io
from vlm_jax.models.vlm import VLMConfig, special_ids
from vlm_jax.tokenizer import JSON_CONFIG_FILE

V = "vision_tower."
T = "language_model."


def canonical_name(name: str) -> str:
  for old, new in (("model.", ""), ("vision_tower.vision_model.", V), ("language_model.model.", T),
                   ("language_model.lm_head.", "lm_head.")):
    if name.startswith(old):
      name = new + name[len(old):]
  return name


def read_tensors(path: str) -> dict:
  """All tensors of a HF directory (single file or sharded with an index), canonical names."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    files = [os.path.join(path, fn) for fn in files]
  else:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"{path} has no *.safetensors files.")
  tensors = {}
  for fn in files:
    if not os.path.isfile(fn):
      raise FileNotFoundError(f"{fn} is listed in {index} but missing.")
    tensors.update(safetensors_io.read(fn))
  return {canonical_name(k): v for k, v in tensors.items()}


def has_own_head(tensors: dict, embedding: str) -> bool:
  """Whether a HF checkpoint's tensors hold an output head of their own: an `lm_head.weight` that is not a copy
  of the input embedding named `embedding`. transformers keeps such a head whatever the config's tie flags say
  (its T5 config, for one, writes tie_word_embeddings true for untied models)."""
  head = tensors.get("lm_head.weight")
  return head is not None and not np.array_equal(head, tensors.get(embedding))


def convert_checked(path: str, config: VLMConfig, sd: dict, to_hf, from_hf):
  """(config, params, tokenizer-or-None) from the canonical-named tensors `sd` of HF directory `path`: every
  tensor's shape checked by name against what `to_hf` makes of the model's params, then `from_hf` converts."""
  from vlm_jax.models.vlm import abstract_params
  from vlm_jax import tokenizer
  template = treeutil.flatten(abstract_params(config))
  expected = {canonical_name(k): v for k, v in jax.eval_shape(lambda flat: to_hf(flat, config), template).items()}
  treeutil.check_shapes(expected, sd, f"HF checkpoint {path}")
  params = {k: np.asarray(v, template[k].dtype) for k, v in from_hf(sd, config).items()}
  return config, {"params": treeutil.unflatten(params)}, tokenizer.from_dir(path, special_ids(config))


def write_weights(out_dir: str, tensors: dict, dtype: str, max_shard_bytes: int):
  """model.safetensors, or shards of at most `max_shard_bytes` with HF's index file."""
  tensors = {k: np.ascontiguousarray(np.asarray(v).astype(dtype)) for k, v in tensors.items()}
  shards, current, size = [], {}, 0
  for name, a in tensors.items():
    if current and size + a.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = a
    size += a.nbytes
  shards.append(current)
  meta = {"format": "pt"}
  if len(shards) == 1:
    safetensors_io.write(os.path.join(out_dir, "model.safetensors"), shards[0], meta)
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors_io.write(os.path.join(out_dir, fn), shard, meta)
    weight_map.update({name: fn for name in shard})
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map},
              f, indent=2)


def write_config_and_tokenizer(out_dir: str, hf_config: dict, tokenizer, special: dict,
                               tokenizer_class: str = "GemmaTokenizer", processor: str | None = None):
  """config.json (the `special` {"pad" / "eos" / "bos": id} in its text_config), generation_config.json and the
  tokenizer's files: a SentencePiece model declared as the model family's `tokenizer_class`, a tokenizer.json
  with its own tokenizer_config.json (`JSONTokenizer.hf_files`); with a `processor` class, what transformers'
  AutoProcessor reads too (`processor_files`)."""
  hf_config["text_config"].update({f"{k}_token_id": v for k, v in special.items()})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump({f"{k}_token_id": v for k, v in special.items()}, f, indent=2)
  files = tokenizer.hf_files(tokenizer_class) if tokenizer is not None else {}
  if processor and tokenizer is not None:
    files.update(processor_files(hf_config, tokenizer, files, processor))
  for name, data in files.items():
    with open(os.path.join(out_dir, name), "wb") as f:
      f.write(data)


def processor_files(hf_config: dict, tokenizer, files: dict, processor: str) -> dict[str, bytes]:
  """preprocessor_config.json (a SigLIP image processor making the pixels `data.image.to_rgb_array` makes: a
  bilinear resize, then x / 127.5 - 1) and the tokenizer_config.json of `files` with an `<image>` token at the
  config's image_token_index, which must be the id right after the tokenizer's vocabulary: transformers appends
  added tokens there, whatever id a file asks for. Nothing where it is not."""
  image_token, size = hf_config["image_token_index"], hf_config["vision_config"]["image_size"]
  if image_token != tokenizer.vocab_size:
    return {}
  config = json.loads(files[JSON_CONFIG_FILE])
  config["added_tokens_decoder"] = {**config.get("added_tokens_decoder", {}), str(image_token): {
      "content": "<image>", "special": True, "normalized": False, "lstrip": False, "rstrip": False,
      "single_word": False}}
  config["extra_special_tokens"] = {**config.get("extra_special_tokens", {}), "image_token": "<image>"}
  image_processor = {"image_processor_type": "SiglipImageProcessor", "processor_class": processor,
                     "image_seq_length": hf_config["vision_config"]["num_image_tokens"], "do_convert_rgb": True,
                     "do_resize": True, "size": {"height": size, "width": size}, "resample": 2,  # PIL bilinear
                     "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
                     "image_std": [0.5] * 3}
  return {JSON_CONFIG_FILE: json.dumps(config, indent=2).encode(),
          "preprocessor_config.json": json.dumps(image_processor, indent=2).encode()}
