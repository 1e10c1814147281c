"""Memory per device before launch: params, gradients, optimizer state and activations of each stage of a
training config on a mesh, from abstract shapes alone (`jax.eval_shape`: nothing is allocated, no devices).

Params, gradients and optimizer state are exact for the layout training uses: every array's per-device block
follows `vlm_jax.sharding`'s rules for the mesh's axis sizes. Params are float32 (as training keeps them);
gradients exist for the stage's trainable params only; the optimizer state is the stage's optimizer's, which
frozen params do not get.

Activations are an estimate of what the backward pass keeps alive, in bytes per example. With s the bytes of
the compute dtype, S = I image tokens (after the adapter) + T text tokens, P patches, N / K query / kv heads of
size H, D the width and F the MLP width, per token and layer:

  remat none  (4D + 2NH + 2KH + 5F) s + N L (4 + s) over L keys: the attention logits (float32) and
              probabilities; 3F instead of 5F for an ungated MLP (the ViT's, T5 v1.0's); Gemma 2 adds 4D s
              for its post-norms and 4 N S for its logit soft-cap
  remat dots  matmul outputs only: (3D + NH + 2KH + 2F) s, F instead of 2F ungated
  remat full  the layer input: D s

over the layers of each stack: the ViT over P tokens; a decoder-only LLM (Gemma, Llama) over S; T5 / UL2's
encoder over S and decoder over T, whose cross-attention adds (2D + 2NH) s + N S (4 + s) per decoder token
((D + NH) s under dots). Whatever the policy, every decoder layer's cross-attention keys and values, 2NH s per
encoder token, are kept twice (computed before the layer scan, which stacks them again as residuals), and the
encoder's position bias adds N S^2 4 once. With remat, one layer of each stack is held at the `none` rate while
it is recomputed. Plus the text logits T V (s + 8) (logits, float32 log-probs and their gradient). Tensor
parallelism divides the head, MLP, attention and vocab terms by the tensor axis when it divides them, as the
weights are split; the examples per device are batch / (data x fsdp) / grad_accum. Embeddings, norms, adapters
and XLA's temporaries are not counted: keep 10-20% of the device free. Checked against XLA's own buffer sizes
for the compiled gradient of small models of each family (tests/test_memory_plan.py).
"""
import dataclasses
import math
import re

import jax
import numpy as np

from vlm_jax import optim, sharding, treeutil
from vlm_jax.models.t5 import T5Config
from vlm_jax.models.vlm import abstract_params
from vlm_jax.train_setup import build_model_config, check_config, make_tokenizer, model_for_stage, normalize

GIB = 2 ** 30
_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": GIB, "T": 2 ** 40}


@dataclasses.dataclass
class StagePlan:
  """Bytes per device for one stage."""
  stage: int
  image_size: int
  text_len: int
  batch_size: int
  examples_per_device: int  # per micro-batch (batch / (data x fsdp) / grad_accum)
  params: int
  grads: int
  opt_state: int
  activations: int

  @property
  def total(self) -> int:
    return self.params + self.grads + self.opt_state + self.activations


def parse_mesh(spec: str) -> dict:
  """"data=8,fsdp=4,tensor=2" -> {"data": 8, "fsdp": 4, "tensor": 2} (sizes may be -1)."""
  sizes = {}
  for item in filter(None, spec.split(",")):
    m = re.fullmatch(r"\s*(\w+)\s*=\s*(-?\d+)\s*", item)
    if not m:
      raise ValueError(f"--mesh {spec!r}: expected AXIS=SIZE,... (axes {', '.join(sharding.MESH_AXES)}).")
    sizes[m.group(1)] = int(m.group(2))
  return sizes


def parse_bytes(text: str) -> int:
  """"16G", "95GiB", "512M", "80GB" -> bytes (K/M/G/T are powers of 1024; a unit is required: a bare 16 is far
  more likely to mean 16G than 16 bytes)."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])(?:i?B)?\s*", text, re.IGNORECASE)
  if not m:
    raise ValueError(f"cannot read {text!r} as a memory size with a unit (e.g. 16G, 95GiB, 80GB).")
  return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def device_bytes(shape, dtype, spec, mesh_shape) -> int:
  """Bytes of one device's block of an array laid out by `spec`."""
  return math.prod(sharding.shard_shape(shape, spec, mesh_shape)) * np.dtype(dtype).itemsize


def _split(size: int, dim: int, tensor: int) -> float:
  """`size` per device when the tensor axis splits a dimension of `dim` entries (only if it divides it)."""
  return size / tensor if dim % tensor == 0 else size


def _layer_bytes(s, d, nh, kh, f, gated, heads, keys):
  """Bytes per token of one pre-norm attention + MLP layer at each remat policy (module docstring)."""
  return {"none": (4 * d + 2 * nh + 2 * kh + (5 if gated else 3) * f) * s + heads * keys * (4 + s),
          "dots": (3 * d + nh + 2 * kh + (2 if gated else 1) * f) * s, "full": d * s}


def _stack_bytes(depth: int, remat: str, per_layer: dict) -> float:
  """A stack's bytes from one layer's {policy: bytes}: every layer keeps what its policy keeps, and with remat
  the layer being recomputed holds its `none` set on top."""
  return depth * per_layer[remat] + (per_layer["none"] if remat != "none" else 0)


def activation_bytes(cfg, text_len: int, tensor: int = 1) -> float:
  """Estimated activation bytes per example (module docstring) for `cfg`'s remat policy and compute dtype."""
  img, llm = cfg.img, cfg.llm
  s = np.dtype(llm.dtype).itemsize
  split = lambda dim, size=None: _split(dim if size is None else size, dim, tensor)

  def stack(tokens, width, heads, head_size, kv_heads, mlp_dim, gated, keys):  # one layer's bytes, all tokens
    per_token = _layer_bytes(s, width, split(heads, heads * head_size), split(kv_heads, kv_heads * head_size),
                             split(mlp_dim), gated, split(heads), keys)
    return {k: tokens * v for k, v in per_token.items()}

  p, seq = img.num_patches, cfg.num_image_tokens + text_len
  total = _stack_bytes(img.depth, img.remat, stack(p, img.width, img.num_heads, img.width // img.num_heads,
                                                    img.num_heads, img.mlp_dim, False, p))
  if isinstance(llm, T5Config):  # encoder over image + text tokens; decoder over the text, cross-attending
    h, nh = llm.head_dim, split(llm.num_heads, llm.num_heads * llm.head_dim)
    encoder = stack(seq, llm.width, llm.num_heads, h, llm.num_heads, llm.mlp_dim, llm.gated, seq)
    decoder = stack(text_len, llm.width, llm.num_heads, h, llm.num_heads, llm.mlp_dim, llm.gated, text_len)
    # Cross-attention: per decoder token its norm, queries, logits over the encoder tokens and output.
    decoder["none"] += text_len * ((2 * llm.width + 2 * nh) * s + split(llm.num_heads) * seq * (4 + s))
    decoder["dots"] += text_len * (llm.width + nh) * s
    # Every decoder layer's cross-attention keys and values are computed before the layer scan and kept twice
    # whatever the policy: as the scan's input and as the residuals it stacks for the backward pass. The
    # encoder's float32 position bias is computed once for all its layers.
    total += (_stack_bytes(llm.encoder_depth, llm.remat, encoder)
              + _stack_bytes(llm.decoder_depth, llm.remat, decoder)
              + llm.decoder_depth * 2 * seq * 2 * nh * s + split(llm.num_heads) * seq * seq * 4)
  else:  # decoder-only over image + text tokens: Gemma's GeGLU or Llama's SwiGLU MLP
    layer = stack(seq, llm.width, llm.num_heads, llm.head_dim, llm.num_kv_heads, llm.mlp_dim, True, seq)
    if getattr(llm, "post_norms", False):  # Gemma 2
      layer["none"] += seq * 4 * llm.width * s
    if getattr(llm, "attn_logits_softcap", None):  # Gemma 2: tanh of the capped logits, float32
      layer["none"] += seq * 4 * split(llm.num_heads) * seq
    total += _stack_bytes(llm.depth, llm.remat, layer)
  return total + text_len * split(llm.vocab_size) * (s + 8)


@dataclasses.dataclass
class Plan:
  """A config's memory plan: its model, parameter count and per-stage bytes per device."""
  model_cfg: object
  num_params: int
  stages: list  # StagePlan per stage


def plan(config, mesh_shape: dict) -> Plan:
  """The memory plan of a training config on a mesh of the given axis sizes ({"data", "fsdp", "tensor"})."""
  check_config(config)
  config = normalize(config)
  tokenizer = None if config.model.get("name") else make_tokenizer(config)
  base = build_model_config(config.model, tokenizer)
  data_ways = sharding.batch_ways(mesh_shape)
  grad_accum = int(config.get("grad_accum", 1))
  plans, num_params = [], 0
  for index, stage_cfg in enumerate(config.stages):
    model_cfg = model_for_stage(base, stage_cfg)
    flat = treeutil.flatten(abstract_params(model_cfg))
    num_params = sum(math.prod(v.shape) for v in flat.values())
    frozen = optim.frozen_names(list(flat), stage_cfg.get("frozen"))
    trainable = {k: v for k, v in flat.items() if k not in frozen}
    optimizer, _ = optim.make_optimizer(config.get("optim", {}), stage_cfg, set(trainable))
    opt_state = jax.eval_shape(optimizer.init, treeutil.unflatten(trainable))
    specs = sharding.param_specs(flat, mesh_shape)
    opt_bytes = jax.tree.map(lambda leaf, spec: device_bytes(leaf.shape, leaf.dtype, spec, mesh_shape), opt_state,
                             sharding.opt_state_specs(opt_state, flat, mesh_shape))
    batch = int(stage_cfg.batch_size)
    if batch % (data_ways * grad_accum):
      raise ValueError(f"config.stages[{index}].batch_size {batch} is not divisible by data x fsdp = {data_ways}"
                       + (f" x grad_accum {grad_accum}" if grad_accum > 1 else "") + ".")
    examples = batch // data_ways // grad_accum
    plans.append(StagePlan(
        stage=index, image_size=model_cfg.img.image_size, text_len=int(stage_cfg.text_len), batch_size=batch,
        examples_per_device=examples,
        params=sum(device_bytes(v.shape, v.dtype, specs[k], mesh_shape) for k, v in flat.items()),
        grads=sum(device_bytes(v.shape, v.dtype, specs[k], mesh_shape) for k, v in trainable.items()),
        opt_state=sum(jax.tree.leaves(opt_bytes)),
        activations=int(examples * activation_bytes(model_cfg, int(stage_cfg.text_len), mesh_shape["tensor"]))))
  return Plan(base, num_params, plans)


def format_table(result: Plan, mesh_shape: dict, device_memory: int | None = None) -> str:
  """The plan as a text table, sizes in GiB per device."""
  cfg = result.model_cfg
  mesh = " ".join(f"{a}={n}" for a, n in mesh_shape.items())
  devices = math.prod(mesh_shape.values())
  size = f"{result.num_params / 1e9:.2f}B" if result.num_params >= 1e8 else f"{result.num_params / 1e6:.2f}M"
  head = (f"{cfg.name or 'model'}: {size} params, compute {cfg.llm.dtype}, "
          f"remat {cfg.llm.remat}; mesh {mesh} ({devices} device{'s' * (devices != 1)}); GiB per device")
  cols = ["stage", "res", "text", "batch", "ex/dev", "params", "grads", "opt state", "activations", "total"]
  if device_memory:
    cols.append(f"fits {device_memory / GIB:g} GiB")
  rows = []
  for p in result.stages:
    row = [str(p.stage), str(p.image_size), str(p.text_len), str(p.batch_size), str(p.examples_per_device),
           *(f"{b / GIB:.2f}" for b in (p.params, p.grads, p.opt_state, p.activations, p.total))]
    if device_memory:
      row.append(f"{'yes' if p.total <= device_memory else 'NO'} ({p.total / device_memory:.0%})")
    rows.append(row)
  widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
  line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths)).rstrip()
  return "\n".join([head, line(cols), *map(line, rows)])
