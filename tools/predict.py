"""Answer prompts about one image with a trained or converted model, through the shared decode loop.

  python tools/predict.py --checkpoint runs/tiny/model --image cat.png --prompt "caption en"
  python tools/predict.py --checkpoint runs/tiny --image cat.png --prompt "how many shapes" --prompt "caption en"
  printf 'caption en\\nhow many shapes\\n' | python tools/predict.py --checkpoint runs/tiny/model --image cat.png
  python tools/predict.py --checkpoint hf_dir --image x.jpg --prompt "caption en" --sampler beam --beam_size 4
  python tools/predict.py --checkpoint pg.npz --model_config paligemma_3b_224 --tokenizer tok.model ...

--checkpoint takes anything `vlm_jax.load` reads (a vlm_jax model directory, a HuggingFace PaliGemma
directory, a big_vision .npz with --model_config) or a training workdir (its exported model/). Without
--prompt, prompts are read from standard input, one per line (UTF-8, LF or CRLF endings); blank lines are
skipped with a warning on stderr naming them: output line i answers the i-th non-blank line. Each
answer is printed on one line (a newline in it as \\n), in prompt order; with --json, one JSON object per line
with the prompt, prediction and score.
"""
import argparse
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)


def positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


def add_sampling_flags(parser):
  g = parser.add_argument_group("decoding (see vlm_jax.decode.Sampling)")
  g.add_argument("--sampler", default="greedy", choices=["greedy", "sample", "beam"],
                 help="greedy (default), sample (temperature / top-k / top-p / best-of) or beam search")
  g.add_argument("--max_new_tokens", type=positive_int, default=32, help="length limit of each answer (default 32)")
  g.add_argument("--temperature", type=float, help="sampling temperature (sample; default 1.0)")
  g.add_argument("--top_k", type=int, default=0, help="sample only from the k most likely tokens (0: off)")
  g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
  g.add_argument("--best_of", type=positive_int, default=1, help="draw N samples per prompt, keep the best-scoring")
  g.add_argument("--beam_size", type=positive_int, help="beams for --sampler beam (default 4)")
  g.add_argument("--length_penalty", type=float, default=1.0,
                 help="scores are log-prob / length ** this (beam search and best-of; default 1.0)")
  g.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same output")


def sampling_kwargs(args) -> dict:
  return dict(sampler=args.sampler, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              best_of=args.best_of, beam_size=args.beam_size, length_penalty=args.length_penalty, seed=args.seed)


def add_load_flags(parser):
  parser.add_argument("--checkpoint", required=True, help="model directory, HF directory, .npz or training workdir")
  parser.add_argument("--model_config", help="model config name for a big_vision .npz (e.g. paligemma_3b_224)")
  parser.add_argument("--tokenizer", help="SentencePiece model, HF tokenizer.json or a directory holding one, in "
                      "place of the checkpoint's own ('synthetic': the shipped synthetic data's); default: the "
                      "checkpoint's")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: as stored)")


def load_model(args, default_tokenizer=None, mesh=None):
  """The Model at --checkpoint (`vlm_jax.load`: a training workdir means its exported model/), with a tokenizer:
  --tokenizer, else the checkpoint's own, else default_tokenizer(); sharded over `mesh` if given."""
  import vlm_jax
  if args.checkpoint.endswith(".npz") and not args.model_config:  # vlm_jax.load names its own argument, config=
    raise ValueError(f"{args.checkpoint} is a big_vision .npz: pass --model_config NAME (e.g. paligemma_3b_224).")
  model = vlm_jax.load(args.checkpoint, dtype=args.dtype, config=args.model_config, mesh=mesh)
  if args.tokenizer:
    from vlm_jax.train_setup import make_tokenizer
    if model.tokenizer is not None:
      print(f"--tokenizer {args.tokenizer} replaces {args.checkpoint}'s own tokenizer.", file=sys.stderr)
    model.tokenizer = make_tokenizer({"tokenizer": args.tokenizer})
  if model.tokenizer is None and default_tokenizer is not None:
    model.tokenizer = default_tokenizer()
  if model.tokenizer is None:
    raise ValueError(f"{args.checkpoint} has no tokenizer (tokenizer.model or tokenizer.json): pass --tokenizer.")
  return model


def read_prompts(args) -> list[str]:
  """--prompt's values, else stdin's non-blank lines (a warning names the blank ones); one that is not UTF-8 is a
  ValueError naming it (the tokenizer would fail on it only at its batch, with a traceback)."""
  if args.prompt:
    named = [(f"--prompt {i}", p) for i, p in enumerate(args.prompt, 1)]
  else:
    # Bytes, decoded here: a text stdin in a strict locale would fail on a bad byte without naming its line.
    stream = getattr(sys.stdin, "buffer", sys.stdin)
    named, blank = [], []
    for number, line in enumerate(stream, 1):
      line = line.decode("utf-8", "surrogateescape") if isinstance(line, bytes) else line
      if line.strip():
        named.append((f"stdin line {number}", line.rstrip("\r\n")))
      else:
        blank.append(number)
    if blank:  # skipped, but said: output lines then no longer match input lines one for one
      shown = ", ".join(map(str, blank[:10])) + (f", ... ({len(blank)} in all)" if len(blank) > 10 else "")
      print(f"warning: skipped blank stdin line{'s' * (len(blank) > 1)} {shown}; the output has a line per "
            "non-blank one.", file=sys.stderr)
  for where, prompt in named:
    try:
      prompt.encode("utf-8")
    except UnicodeEncodeError:  # argv and our stdin decoding keep a bad byte as a lone surrogate
      raw = prompt.encode("utf-8", "surrogateescape")
      raise ValueError(f"{where}: the prompt {raw!r} is not UTF-8 text.") from None
  return [prompt for _, prompt in named]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_load_flags(parser)
  parser.add_argument("--image", required=True, help="image file (any size and mode PIL reads)")
  parser.add_argument("--prompt", action="append", help="a prompt (repeatable); default: read stdin, one per line")
  parser.add_argument("--batch_size", type=positive_int, default=8, help="prompts decoded together (default 8)")
  parser.add_argument("--json", action="store_true", help="print JSON lines {prompt, prediction, score}")
  add_sampling_flags(parser)
  args = parser.parse_args(argv)

  try:
    prompts = read_prompts(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not prompts:
    print("error: no prompts (pass --prompt or write them to standard input)", file=sys.stderr)
    return 2
  try:
    from vlm_jax.data.llava_json import load_image
    image = load_image(args.image)
    model = load_model(args)
    from tqdm import tqdm
    with tqdm(total=len(prompts), desc="predict", unit="prompt", file=sys.stderr,
              disable=len(prompts) <= args.batch_size) as bar:
      for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        # Every batch padded to one width, so all reuse one compiled program; no wider than the prompts, so a
        # single prompt decodes one row, not --batch_size of them (times the beams, with --sampler beam).
        padded = chunk + [chunk[-1]] * (min(args.batch_size, len(prompts)) - len(chunk))
        preds, scores = model.generate([image] * len(padded), padded, args.max_new_tokens, return_scores=True,
                                       first_row=start, **sampling_kwargs(args))  # samples whatever --batch_size
        for prompt, pred, score in zip(chunk, preds, scores):
          line = json.dumps({"prompt": prompt, "prediction": pred, "score": score}) if args.json else pred
          print(line.replace("\n", "\\n"), flush=True)  # one line per prompt, whatever the model wrote
        bar.update(len(chunk))
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
