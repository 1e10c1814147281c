"""PaLI-3-style: SigLIP ViT -> linear projector -> UL2 / T5 encoder-decoder (image tokens and the prompt in the
encoder, the answer from the decoder).

  python tools/train.py --config configs/siglip_ul2.py --workdir runs/ul2                        # tiny, synthetic
  python tools/train.py --workdir runs/pali3 --config \\
      configs/siglip_ul2.py:tiny=False,llm=/ckpt/ul2-3b,tokenizer=/ckpt/spiece.model,data=/data/llava.json,images=/data/images

tiny (default): the README main job's two-stage recipe on the shipped synthetic data, with a 3-layer ViT and a
3+3-layer gated-GELU encoder-decoder trained from scratch (CPU, minutes), for 1800 + 300 steps instead of
1300 + 250: the spatial tasks (position, detection) are learnt late, and held-out exact match went from 0.83-0.91
at 1300 + 250 to 0.99 (`benchmarks/families.py`). Otherwise: a SigLIP So400m/14 tower
(random or from `img`) and the T5 / UL2 weights of the local HF T5ForConditionalGeneration directory `llm`, in
PaLI-3's resolution stages 224 -> 448 -> 896 with the vision tower frozen in the first.
"""
import os

from ml_collections import ConfigDict

from vlm_jax import config_util


def get_config(arg=None):
  given = config_util.arg_keys(arg)
  arg = config_util.parse_arg(arg, tiny=True, steps1=1800, steps2=300, llm="", img="", tokenizer="", data="",
                              images="", batch=128, posemb="sincos2d", q_lr=32 ** -0.5)
  if arg.tiny:
    config_util.refuse_args(given, ("llm", "img", "tokenizer", "data", "images", "batch"),
                            "only with tiny=False (tiny trains a small model from scratch on the synthetic data).")
    c = config_util.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_synthetic.py") +
                                f":steps1={arg.steps1},steps2={arg.steps2}")
    # The ViT head's image tokens get a fixed 2D sin-cos position embedding (adapters.py, posemb): T5's only
    # positions are 1D bucketed relative biases, and a from-scratch tiny ViT's learned position embedding does
    # not carry usable position (the decoder-only families localise through RoPE over the image tokens instead).
    c.model = dict(img=dict(variant="Ti/8", depth=3, num_heads=4, width=128, mlp_dim=512),
                   llm=dict(type="t5", width=128, num_heads=4, head_dim=32, mlp_dim=512, encoder_depth=3,
                            decoder_depth=3),
                   adapter=dict(kind="linear", posemb=arg.posemb))
    # T5 folds attention's 1 / sqrt(head_dim) into the query weights (init std (width * head_dim) ** -0.5). Adam
    # steps every weight by ~lr whatever its scale, so unscaled the queries learn sqrt(head_dim) times faster
    # than in scaled attention (Gemma, Llama) and the attention logits blow up and saturate; their lr multiplier
    # head_dim ** -0.5 gives Adam the same dynamics as scaled attention (T5 itself trains with Adafactor, whose
    # steps are relative to each weight's scale).
    for stage in c.stages:
      stage["lr_mults"] = [("llm/.*q_einsum", arg.q_lr)]
    return c
  config_util.refuse_args(given, ("steps1", "steps2", "posemb", "q_lr"), "only with tiny=True; set tiny=False's "
                          "stage steps with --config.stages[0].steps=N.")
  if not arg.llm:
    raise ValueError("configs/siglip_ul2.py:tiny=False needs llm=DIR, a local HF T5 / UL2 directory.")
  c = ConfigDict()
  c.seed = 0
  c.tokenizer = arg.tokenizer
  c.model = dict(img=dict(variant="So400m/14", init=arg.img), llm=dict(init=arg.llm), dtype="bfloat16",
                 remat="full")
  c.optim = dict(name="adafactor", clip_norm=1.0)
  data = dict(kind="llava_json", json_path=arg.data, image_dir=arg.images, skip_bad=True)
  vision = "img/(embedding|pos_embedding|Transformer)"
  schedule = dict(decay="rsqrt", warmup_steps=1000)
  c.stages = [
      dict(name="224", steps=20_000, image_size=224, text_len=64, batch_size=arg.batch, data=data, lr=1e-3,
           schedule=schedule, frozen=[vision], lr_mults=[]),
      dict(name="448", steps=5000, image_size=448, text_len=64, batch_size=arg.batch // 4, data=data, lr=3e-4,
           schedule=schedule, frozen=[], lr_mults=[(vision, 0.1)]),
      dict(name="896", steps=2000, image_size=896, text_len=64, batch_size=arg.batch // 8, data=data, lr=1e-4,
           schedule=schedule, frozen=[], lr_mults=[(vision, 0.1)]),
  ]
  c.evals = []
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.log_every = 50
  return c
