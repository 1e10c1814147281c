"""The README's main job: a tiny PaliGemma-shaped model (3-layer ViT, 3-layer Gemma) trained from scratch on
the shipped synthetic shapes data in two stages, 32px then 48px (position embeddings resampled in between),
on a 2-core CPU in under 10 minutes.

  python tools/train.py --config configs/tiny_synthetic.py --workdir runs/tiny
  python tools/train.py --config configs/tiny_synthetic.py:steps1=40,steps2=10 --workdir runs/smoke --config.seed=1
"""
from ml_collections import ConfigDict

from vlm_jax.config_util import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, steps1=1300, steps2=250, res=32, res2=48, batch=64, examples=100_000, grid=2, lr=1e-3)
  c = ConfigDict()
  c.seed = 0
  c.tokenizer = "synthetic"
  c.model = dict(img=dict(variant="Ti/8", depth=3, num_heads=4, width=128, mlp_dim=512),
                 llm=dict(width=128, depth=3, mlp_dim=512, num_heads=4, num_kv_heads=1, head_dim=32))
  c.optim = dict(name="adamw", b1=0.9, b2=0.99, clip_norm=1.0, weight_decay=1e-4,
                 wd_mults=[(".*(bias|scale|pos_embedding)$", 0.0), (".*", 1.0)])
  # Images are drawn at each stage's resolution: crisp shapes, not a blurred downsampling of a larger drawing.
  data = lambda res: dict(kind="synthetic", split="train", num_examples=arg.examples, seed=0, grid=arg.grid,
                          image_size=res)
  c.stages = [
      dict(name="low_res", steps=arg.steps1, image_size=arg.res, text_len=16, batch_size=arg.batch,
           data=data(arg.res), lr=arg.lr, schedule=dict(decay="cosine", warmup_steps=min(50, arg.steps1 // 4)),
           frozen=[], lr_mults=[]),
      dict(name="high_res", steps=arg.steps2, image_size=arg.res2, text_len=16,
           batch_size=arg.batch, data=data(arg.res2), lr=arg.lr / 2, schedule=dict(decay="cosine", warmup_steps=20),
           frozen=[], lr_mults=[]),
  ]
  c.evals = [dict(name="val", data=dict(kind="synthetic", split="val", num_examples=300, seed=0, grid=arg.grid,
                                       image_size=arg.res2),
                  metrics=["exact_match"], batch_size=100, max_new_tokens=12, prefix_len=12)]
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.checkpoint_every = 200
  c.keep_checkpoints = 2
  c.log_every = 20
  c.eval_every = 0
  return c
