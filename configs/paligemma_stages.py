"""The PaLI-3 recipe on PaliGemma-3B: 224 -> 448 -> 896 px in one launch, the vision tower frozen in the
first stage, then trained at 0.1x the learning rate (as FUSION does), on a LLaVA-style conversation dataset.

  python tools/train.py --config configs/paligemma_stages.py:data=/data/llava.json,images=/data/images \\
      --workdir gs://bucket/runs/pg3b

`init` points at a local PaliGemma checkpoint (HF directory, big_vision .npz or vlm_jax checkpoint);
`tokenizer` at Gemma's SentencePiece model. Nothing is downloaded.
"""
from ml_collections import ConfigDict

from vlm_jax.config_util import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, init="checkpoints/paligemma-3b-pt-224", tokenizer="checkpoints/paligemma_tokenizer.model",
                  data="data/llava_v1_5_mix665k.json", images="data/images", batch=256, steps=20_000,
                  model="paligemma_3b_224")
  c = ConfigDict()
  c.seed = 0
  c.tokenizer = arg.tokenizer
  c.model = dict(name=arg.model, init=arg.init, dtype="bfloat16", remat="full")
  c.optim = dict(name="adamw", b1=0.9, b2=0.999, clip_norm=1.0, weight_decay=1e-6,
                 wd_mults=[(".*(bias|scale|pos_embedding)$", 0.0), (".*", 1.0)])
  data = dict(kind="llava_json", json_path=arg.data, image_dir=arg.images, skip_bad=True)
  vision = "img/(embedding|pos_embedding|Transformer)"
  schedule = dict(decay="cosine", warmup_steps=500)
  c.stages = [
      dict(name="224", steps=arg.steps, image_size=224, text_len=128, batch_size=arg.batch, data=data, lr=1e-4,
           schedule=schedule, frozen=[vision], lr_mults=[]),
      dict(name="448", steps=arg.steps // 4, image_size=448, text_len=128, batch_size=arg.batch // 4, data=data,
           lr=3e-5, schedule=schedule, frozen=[], lr_mults=[(vision, 0.1)]),
      dict(name="896", steps=arg.steps // 10, image_size=896, text_len=128, batch_size=arg.batch // 8, data=data,
           lr=1e-5, schedule=schedule, frozen=[], lr_mults=[(vision, 0.1)]),
  ]
  c.evals = []
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.log_every = 50
  return c
