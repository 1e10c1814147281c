"""Fine-tune a released PaliGemma checkpoint from a local path on a LLaVA-style dataset, one stage at 224 px.

  python tools/train.py --workdir runs/ft --config \\
      configs/transfer_paligemma.py:init=/ckpt/paligemma-3b-pt-224,tokenizer=/ckpt/paligemma-3b-pt-224/tokenizer.model,data=/data/train.json,images=/data/images

`init` may be a HF PaliGemma directory or a vlm_jax checkpoint (the model config is read from it), or a
big_vision .npz (then `model` names its config, e.g. model=paligemma2_3b_224). Typical fine-tune learning
rates are 1e-5..1e-4.
"""
from ml_collections import ConfigDict

from vlm_jax.config_util import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, init="checkpoints/paligemma-3b-pt-224", tokenizer="checkpoints/paligemma_tokenizer.model",
                  data="data/train.json", images="data/images", model="", res=224, batch=64,
                  steps=2000, lr=3e-5)
  c = ConfigDict()
  c.seed = 0
  c.tokenizer = arg.tokenizer
  c.model = dict(name=arg.model, init=arg.init, dtype="bfloat16")
  c.optim = dict(name="adamw", b1=0.9, b2=0.999, clip_norm=1.0, weight_decay=0.0)
  data = dict(kind="llava_json", json_path=arg.data, image_dir=arg.images, skip_bad=True)
  c.stages = [dict(name="finetune", steps=arg.steps, image_size=arg.res, text_len=64, batch_size=arg.batch,
                   data=data, lr=arg.lr, schedule=dict(decay="cosine", warmup_steps=arg.steps // 20),
                   frozen=["img/(embedding|pos_embedding|Transformer)"], lr_mults=[])]
  c.evals = [dict(name="val", data=data,  # records training skips (skip_bad) are skipped and counted here too
                  metrics=["exact_match"], batch_size=64, max_new_tokens=32, prefix_len=64, num_examples=500)]
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.log_every = 20
  return c
