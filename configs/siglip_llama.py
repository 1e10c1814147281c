"""LLaVA-style: SigLIP ViT -> MLP (or resampler) adapter -> Llama-family decoder, attending causally.

  python tools/train.py --config configs/siglip_llama.py --workdir runs/llama                    # tiny, synthetic
  python tools/train.py --config configs/siglip_llama.py:adapter=resampler --workdir runs/llama_rs
  python tools/train.py --workdir runs/llava --config \\
      configs/siglip_llama.py:tiny=False,llm=/ckpt/Llama-2-7b-hf,tokenizer=/ckpt/Llama-2-7b-hf/tokenizer.model,data=/data/llava.json,images=/data/images
  python tools/train.py --workdir runs/llava3 --config \\
      configs/siglip_llama.py:tiny=False,llm=/ckpt/Llama-3-8B,data=/data/llava.json,images=/data/images

tiny (default): the README main job's two-stage recipe on the shipped synthetic data, with a 3+3-layer
LLaVA-shaped model trained from scratch (CPU, minutes), for 1800 + 300 steps instead of 1300 + 250: attending
causally, image tokens never see the question, and the model needs the longer schedule to reach the main job's
accuracy (0.85 at 1300 + 250, 0.91 at 1800 + 300). Otherwise: a SigLIP So400m/14 tower (random, or the
vision tower of the PaliGemma / LLaVA / vlm_jax checkpoint `img`), an MLP adapter and the language model of
the local HF Llama / Qwen2 directory `llm` (its config and weights), trained on LLaVA-style JSON: stage 1 trains
the adapter only (LLaVA's pre-training), stage 2 everything but the vision tower. `tokenizer` defaults to the
`llm` directory's own (tokenizer.model, else tokenizer.json). For an export that transformers'
LlavaForConditionalGeneration reads, give the model an image token the tokenizer never produces, growing
Llama 2's vocabulary as llava-hf does (rounded up, so a tensor axis still splits it):
`--config.model.llm.vocab_size=32064 --config.model.image_token_id=32000` (Llama 3's tokenizer.json holds all
of its 128256 ids: `--config.model.llm.vocab_size=128320 --config.model.image_token_id=128256`).
"""
import os

from ml_collections import ConfigDict

from vlm_jax import config_util


def get_config(arg=None):
  given = config_util.arg_keys(arg)
  arg = config_util.parse_arg(arg, tiny=True, adapter="mlp", steps1=1800, steps2=300, llm="", img="",
                              tokenizer="", data="", images="", batch=256)
  adapter = dict(kind=arg.adapter, num_queries=16, num_heads=4)
  if arg.tiny:
    config_util.refuse_args(given, ("llm", "img", "tokenizer", "data", "images", "batch"),
                            "only with tiny=False (tiny trains a small model from scratch on the synthetic data).")
    c = config_util.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_synthetic.py") +
                                f":steps1={arg.steps1},steps2={arg.steps2}")
    c.model = dict(img=dict(variant="Ti/8", depth=3, num_heads=4, width=128, mlp_dim=512, final_norm=False),
                   llm=dict(type="llama", width=128, depth=3, mlp_dim=512, num_heads=4, num_kv_heads=2, head_dim=32),
                   adapter=adapter, causal=True)
    return c
  config_util.refuse_args(given, ("steps1", "steps2"), "only with tiny=True; set tiny=False's stage steps with "
                          "--config.stages[0].steps=N.")
  if not arg.llm:
    raise ValueError("configs/siglip_llama.py:tiny=False needs llm=DIR, a local HF Llama / Qwen2 directory.")
  c = ConfigDict()
  c.seed = 0
  c.tokenizer = arg.tokenizer or arg.llm  # by default the HF directory's own tokenizer.model or tokenizer.json
  c.model = dict(img=dict(variant="So400m/14", final_norm=False, init=arg.img), llm=dict(init=arg.llm),
                 adapter=adapter, causal=True, dtype="bfloat16", remat="full")
  c.optim = dict(name="adamw", b1=0.9, b2=0.999, clip_norm=1.0, weight_decay=0.0)
  data = dict(kind="llava_json", json_path=arg.data, image_dir=arg.images, skip_bad=True)
  schedule = dict(decay="cosine", warmup_steps=200)
  c.stages = [
      dict(name="align", steps=2000, image_size=384, text_len=128, batch_size=arg.batch, data=data, lr=1e-3,
           schedule=schedule, frozen=["img/.*", "llm/.*"], lr_mults=[]),
      dict(name="instruct", steps=5000, image_size=384, text_len=512, batch_size=arg.batch // 2, data=data,
           lr=2e-5, schedule=schedule, frozen=["img/.*"], lr_mults=[]),
  ]
  c.evals = []
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.log_every = 50
  return c
