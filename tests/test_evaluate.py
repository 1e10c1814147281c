"""Batch evaluators and the eval / predict CLIs, on a tiny random model with the synthetic tokenizer."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from vlm_jax import evaluate
from vlm_jax.api import Model
from vlm_jax.data.image import to_rgb_array
from vlm_jax.data.pipeline import make_source
from vlm_jax.data.synthetic import SyntheticSource, synthetic_tokenizer
from vlm_jax.data.text import tokenize_turns
from vlm_jax.models.registry import get_model_config
from vlm_jax.models.vlm import init_params
from tests.test_decode import COMPILES
from tests.test_model import randomize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = dict(kind="synthetic", split="val", num_examples=7, seed=0, grid=2, image_size=32)


@pytest.fixture(scope="module")
def model():
  tok = synthetic_tokenizer()
  cfg = get_model_config("tiny")
  cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=tok.vocab_size))
  return Model(cfg, randomize(init_params(cfg), seed=2), tok)


def eval_cfg(**kw):
  return ml_collections.ConfigDict(dict(dict(name="val", data=DATA, batch_size=3, max_new_tokens=5, prefix_len=12),
                                        **kw))


def test_decoded_metrics_match_generate_and_the_metric_functions(model):
  res = evaluate.evaluate(model.config, model.params, model.tokenizer,
                          eval_cfg(metrics=["exact_match", "vqa_accuracy", "anls", "cider"]))
  src = SyntheticSource(**{k: v for k, v in DATA.items() if k != "kind"})
  assert res["num_examples"] == 7 and len(res["predictions"]) == 7  # 3 + 3 + 1 padded to 3: padding dropped
  images = [src[i]["image"] for i in range(7)]
  prompts = [src[i]["turns"][0][0] for i in range(7)]
  expected = model.generate(images, prompts, max_new_tokens=5)
  assert [r["prediction"] for r in res["predictions"]] == expected
  from vlm_jax import metrics
  answers = [[src[i]["turns"][0][1]] for i in range(7)]
  for name in ("exact_match", "vqa_accuracy", "anls"):
    assert res[name] == pytest.approx(np.mean([metrics.PER_EXAMPLE[name](p, a) for p, a in zip(expected, answers)]))
  assert res["cider"] == pytest.approx(np.mean(metrics.cider(expected, answers)))
  tasks = {src[i]["task"] for i in range(7)}
  assert {f"exact_match/{t}" for t in tasks} <= set(res)
  assert "truncated" not in res and "WARNING" not in evaluate.summary(res)


def test_cut_prompts_and_texts_are_counted_and_reported(model):
  """An evaluator's prompts longer than prefix_len lose their end (the separator too), texts longer than
  text_len part of their answers: the results count them and the summary says which limit to raise."""
  res = evaluate.evaluate(model.config, model.params, model.tokenizer,
                          eval_cfg(metrics=["exact_match", "loss"], prefix_len=4, text_len=8))
  src = SyntheticSource(**{k: v for k, v in DATA.items() if k != "kind"})
  prompts = sum(len(model.tokenizer.encode_prefix(src[i]["turns"][0][0])) > 4 for i in range(7))
  texts = sum(tokenize_turns(model.tokenizer, src[i]["turns"], 8).truncated for i in range(7))
  assert 0 < prompts <= 7 and 0 < texts <= 7
  assert res["truncated"] == {"prompts": prompts, "texts": texts, "prefix_len": 4, "text_len": 8}
  assert (f"WARNING: {prompts} of 7 prompts longer than prefix_len 4, cut" in evaluate.summary(res)
          and f"{texts} of 7 texts longer than text_len 8" in evaluate.summary(res))


def test_a_skip_bad_source_drops_unreadable_records_and_says_so(model, tmp_path):
  """With skip_bad, a missing image is dropped when the source is read and a corrupt one when its example is
  decoded: the evaluator scores the rest and reports both (each counted once over the two passes)."""
  from PIL import Image
  Image.new("RGB", (12, 12), (255, 0, 0)).save(tmp_path / "red.png")
  (tmp_path / "bad.png").write_bytes(b"not a png" * 10)
  record = lambda i, image: {"id": str(i), "image": image, "conversations": [
      {"from": "human", "value": "<image>\ncolour"}, {"from": "gpt", "value": "red"}]}
  images = ["red.png", "bad.png", "red.png", "gone.png", "red.png"]
  (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(record(i, im)) for i, im in enumerate(images)))
  data = dict(kind="llava_json", json_path=str(tmp_path / "d.jsonl"), image_dir=str(tmp_path), skip_bad=True)
  calls = []
  res = evaluate.evaluate(model.config, model.params, model.tokenizer,
                          eval_cfg(data=data, metrics=["exact_match", "loss"], batch_size=2),
                          progress=lambda *a: calls.append(a))
  # Progress counts the records read, unreadable ones included: each pass ends at all 4 the source holds.
  assert calls == [("decode", 3, 4), ("decode", 4, 4), ("teacher-forced", 3, 4), ("teacher-forced", 4, 4)]
  assert res["num_examples"] == 3 and [r["id"] for r in res["predictions"]] == ["0", "2", "4"]
  assert all("nll" in r for r in res["predictions"])
  assert res["skipped"] == {"missing image": 1, "corrupt image": 1}
  assert "WARNING: skipped 2 unreadable records (1 missing image, 1 corrupt image)" in evaluate.summary(res)
  # Training builds the source once and evaluates with it again and again: the same counts every time.
  source = make_source(data)
  for _ in range(2):
    again = evaluate.evaluate(model.config, model.params, model.tokenizer,
                              eval_cfg(data=data, metrics=["exact_match", "loss"], batch_size=2), source=source)
    assert again["skipped"] == res["skipped"] and again["predictions"] == res["predictions"]


def test_progress_counts_each_pass_over_the_examples(model):
  calls = []
  evaluate.evaluate(model.config, model.params, model.tokenizer, eval_cfg(metrics=["exact_match", "loss"]),
                    progress=lambda *a: calls.append(a))
  assert calls == [("decode", 3, 7), ("decode", 6, 7), ("decode", 7, 7),
                   ("teacher-forced", 3, 7), ("teacher-forced", 6, 7), ("teacher-forced", 7, 7)]


def test_perplexity_is_the_teacher_forced_answer_loss(model):
  res = evaluate.evaluate(model.config, model.params, model.tokenizer,
                          eval_cfg(metrics=["loss", "perplexity"], text_len=20))
  src = SyntheticSource(**{k: v for k, v in DATA.items() if k != "kind"})
  total, count = 0.0, 0
  for i in range(7):  # one example at a time, unpadded batch of one
    ex = src[i]
    tok = tokenize_turns(model.tokenizer, ex["turns"], 20)
    image = to_rgb_array(ex["image"], model.image_size)[None]
    logits = model.logits(image, tok.tokens[None, :-1], tok.mask_ar[None, :-1], tok.mask_input[None, :-1])[0]
    logp = np.asarray(jax.nn.log_softmax(logits))
    for t in range(19):
      if tok.mask_loss[t + 1]:
        total -= logp[t, tok.tokens[t + 1]]
        count += 1
  assert res["loss"] == pytest.approx(total / count, rel=1e-5)
  assert res["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
  assert "prediction" not in res["predictions"][0]  # no decoding pass was needed


def test_sampled_evaluation_does_not_depend_on_the_batch_size(model):
  """Example i samples with its own key (fold_in(key(seed), i)): batches of 2 or 3 give the same predictions."""
  sample = dict(metrics=["exact_match"], sampler="sample", temperature=1.5, seed=5)
  preds = {bs: [r["prediction"] for r in evaluate.evaluate(model.config, model.params, model.tokenizer,
                                                           eval_cfg(**{**sample, "batch_size": bs}))["predictions"]]
           for bs in (2, 3)}
  assert preds[2] == preds[3]
  other = evaluate.evaluate(model.config, model.params, model.tokenizer, eval_cfg(**{**sample, "seed": 6}))
  assert [r["prediction"] for r in other["predictions"]] != preds[3]  # the seed matters


def test_unknown_metric_is_rejected(model):
  with pytest.raises(ValueError, match=r"evaluator 'val': unknown metrics \['bleu'\]"):
    evaluate.evaluate(model.config, model.params, model.tokenizer, eval_cfg(metrics=["bleu"]))


def test_generate_needs_at_least_one_new_token(model):
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
    model.generate_ids(np.zeros((1, 28, 28, 3), np.uint8), np.array([[2, 5]]), max_new_tokens=0)


def test_second_evaluation_compiles_nothing(model):
  cfg = eval_cfg(metrics=["exact_match", "perplexity"], sampler="beam", beam_size=2)
  evaluate.evaluate(model.config, model.params, model.tokenizer, cfg)
  COMPILES.active, before = True, COMPILES.count
  try:
    evaluate.evaluate(model.config, model.params, model.tokenizer, cfg)
  finally:
    COMPILES.active = False
  assert COMPILES.count == before


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ckpt") / "model")
  model.save(path)
  return path


def run_tool(*args, stdin=None, env=None):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, input=stdin, timeout=600,
                        env=env)


@pytest.mark.slow
def test_eval_and_predict_clis(model, checkpoint, tmp_path):
  out = tmp_path / "res.json"
  proc = run_tool("tools/eval.py", "--config", "configs/tiny_synthetic.py", "--checkpoint", checkpoint,
                  "--evals", "val", "--out", str(out), "--config.evals[0].num_examples=5",
                  "--config.evals[0].metrics=['exact_match','perplexity']")
  assert proc.returncode == 0, proc.stderr
  res = json.loads(out.read_text())["val"]
  assert res["num_examples"] == 5 and len(res["predictions"]) == 5 and "perplexity" in res
  assert "eval val (decode): 100%" in proc.stderr and "5/5" in proc.stderr
  assert "eval val (teacher-forced): 100%" in proc.stderr
  ref = evaluate.evaluate(model.config, model.params, model.tokenizer, ml_collections.ConfigDict(dict(
      name="val", data=dict(kind="synthetic", split="val", num_examples=300, seed=0, grid=2, image_size=48),
      metrics=["exact_match", "perplexity"], batch_size=100, max_new_tokens=12, prefix_len=12, num_examples=5)))
  assert [r["prediction"] for r in res["predictions"]] == [r["prediction"] for r in ref["predictions"]]
  assert res["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
  # On 8 devices: sharded over the config's mesh (data=-1), batches of 100 rounded up to 104, same results.
  eight = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = run_tool("tools/eval.py", "--config", "configs/tiny_synthetic.py", "--checkpoint", checkpoint,
                  "--out", str(out), "--config.evals[0].num_examples=5",
                  "--config.evals[0].metrics=['exact_match','perplexity']", env=eight)
  assert proc.returncode == 0, proc.stderr
  assert "evaluating on a mesh {'data': 8, 'fsdp': 1, 'tensor': 1} of 8 devices" in proc.stderr
  res = json.loads(out.read_text())["val"]
  assert [r["prediction"] for r in res["predictions"]] == [r["prediction"] for r in ref["predictions"]]
  assert res["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)

  image = tmp_path / "img.png"
  from PIL import Image
  src = SyntheticSource(split="val", num_examples=3, seed=0, grid=2, image_size=40)
  Image.fromarray(src[0]["image"]).save(image)
  prompts = ["caption en", "count circle", "what color is the shape"]
  proc = run_tool("tools/predict.py", "--checkpoint", checkpoint, "--image", str(image), "--max_new_tokens", "6",
                  "--batch_size", "2", "--json", stdin="\n".join(prompts) + "\n")
  assert proc.returncode == 0, proc.stderr
  expected = model.generate([src[0]["image"]] * 3, prompts, max_new_tokens=6)
  lines = [json.loads(line) for line in proc.stdout.strip().split("\n")]
  assert [x["prompt"] for x in lines] == prompts and [x["prediction"] for x in lines] == expected
  proc = run_tool("tools/predict.py", "--checkpoint", checkpoint, "--image", str(image), "--prompt", prompts[0],
                  "--sampler", "beam", "--beam_size", "3", "--max_new_tokens", "6", "--json",
                  "--tokenizer", "synthetic")
  assert proc.returncode == 0 and "--tokenizer synthetic replaces" in proc.stderr, proc.stderr  # the same one here
  line = json.loads(proc.stdout)
  texts, scores = model.generate([src[0]["image"]], prompts[:1], max_new_tokens=6, sampler="beam", beam_size=3,
                                 return_scores=True)
  assert line["prediction"] == texts[0] and line["score"] == pytest.approx(scores[0], rel=1e-5)


def test_cli_errors_are_clear(checkpoint, tmp_path):
  proc = run_tool("tools/predict.py", "--checkpoint", checkpoint, "--image", str(tmp_path / "missing.png"),
                  "--prompt", "caption en")
  assert proc.returncode == 2 and "missing.png" in proc.stderr and "Traceback" not in proc.stderr
  proc = run_tool("tools/eval.py", "--config", "configs/tiny_synthetic.py", "--checkpoint", checkpoint,
                  "--evals", "nope")
  assert proc.returncode == 2 and "unknown evaluators ['nope']" in proc.stderr
  proc = run_tool("tools/eval.py", "--config", "configs/tiny_synthetic.py", "--checkpoint", checkpoint,
                  "--out", str(tmp_path / "no" / "e.json"))
  assert proc.returncode == 2 and f"there is no directory {tmp_path / 'no'}" in proc.stderr
  proc = run_tool("tools/predict.py", "--checkpoint", checkpoint, "--image", "x.png", "--batch_size", "0")
  assert proc.returncode == 2 and "argument --batch_size: must be >= 1, got 0" in proc.stderr
  for tool in ("tools/eval.py", "tools/predict.py"):
    proc = run_tool(tool, "--help")
    assert proc.returncode == 0 and "--checkpoint" in proc.stdout


def test_eval_cli_refuses_an_out_directory_before_evaluating(checkpoint, tmp_path, capsys):
  """--out naming a directory used to pass the start-up check and fail writing, after the whole evaluation."""
  from tools import eval as eval_cli
  code = eval_cli.main(["--config", os.path.join(REPO, "configs/tiny_synthetic.py"), "--checkpoint", checkpoint,
                        "--out", str(tmp_path), "--config.evals[0].num_examples=2"])
  err = capsys.readouterr().err
  assert code == 2 and f"error: --out {tmp_path}: is a directory" in err and "eval val" not in err


def test_eval_cli_selects_each_named_evaluator_once():
  from tools import eval as eval_cli
  config = ml_collections.ConfigDict(dict(evals=[dict(name="val"), dict(name="test")]))
  assert [e["name"] for e in eval_cli.select_evals(config, "test, val,test")] == ["test", "val"]
  with pytest.raises(ValueError, match=r"unknown evaluators \['vall'\]; the config has \['test', 'val'\]"):
    eval_cli.select_evals(config, "vall")


@pytest.fixture
def predict_cli(checkpoint, tmp_path, monkeypatch, capsys):
  """tools/predict.py's main in this process, on `stdin` bytes, with Model.generate replaced by a recorder (these
  tests are about the prompts and rows the tool hands it): returns (exit status, stdout, stderr, calls)."""
  import io
  from PIL import Image
  from tools import predict
  image = tmp_path / "red.png"
  Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
  calls = []

  def generate(self, images, prompts, max_new_tokens, return_scores=False, **kw):
    calls.append(dict(kw, prompts=list(prompts), images=len(images)))
    return [f"answer {p}" for p in prompts], [0.0] * len(prompts)
  monkeypatch.setattr(Model, "generate", generate)

  def run(*args, stdin=b""):
    # as the real sys.stdin is here: "\r\n" kept, undecodable bytes as surrogates
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), "utf-8", "surrogateescape", "\n"))
    code = predict.main(["--checkpoint", checkpoint, "--image", str(image), *args])
    out, err = capsys.readouterr()
    return code, out, err, calls
  return run


def test_predict_reads_crlf_stdin_prompts_without_the_cr(predict_cli):
  code, out, err, calls = predict_cli("--json", stdin=b"caption en\r\nhow many shapes\r\n")
  assert code == 0, err
  assert calls[0]["prompts"][:2] == ["caption en", "how many shapes"]  # a "\r" would change the tokens
  assert [json.loads(line)["prompt"] for line in out.splitlines()] == ["caption en", "how many shapes"]


def test_predict_names_a_prompt_that_is_not_utf8_before_decoding(predict_cli):
  """A bad byte used to reach the tokenizer, at its batch: a RuntimeError traceback and exit status 1."""
  code, out, err, calls = predict_cli(stdin=b"caption en\n\ncaption \xff en\n")
  assert code == 2 and not calls and not out, err
  assert "error: stdin line 3: the prompt b'caption \\xff en' is not UTF-8 text." in err and "Traceback" not in err
  code, out, err, calls = predict_cli("--prompt", "caption en", "--prompt", "cap\udcfftion")  # argv's decoding of \xff
  assert code == 2 and not calls and "error: --prompt 2: the prompt b'cap\\xfftion' is not UTF-8 text." in err


def test_predict_warns_of_the_blank_stdin_lines_it_skips(predict_cli):
  """They were dropped without a word, so output line i silently stopped answering input line i."""
  code, out, err, calls = predict_cli(stdin=b"caption en\n\n  \r\nhow many shapes\n")
  assert code == 0 and out.splitlines() == ["answer caption en", "answer how many shapes"], err
  assert "warning: skipped blank stdin lines 2, 3; the output has a line per non-blank one." in err
  code, out, err, calls = predict_cli(stdin=b"caption en\n")
  assert code == 0 and "warning" not in err


def test_predict_pads_batches_only_up_to_the_number_of_prompts(predict_cli):
  """One prompt was padded to --batch_size rows (8 by default; 32 beams with --beam_size 4)."""
  code, out, err, calls = predict_cli("--prompt", "caption en", "--sampler", "beam", "--beam_size", "4")
  assert code == 0 and out == "answer caption en\n", err
  assert [(c["images"], len(c["prompts"]), c["beam_size"]) for c in calls] == [(1, 1, 4)]
  calls.clear()
  code, out, err, calls = predict_cli("--batch_size", "2", stdin=b"a\nb\nc\n")
  assert code == 0 and out.splitlines() == ["answer a", "answer b", "answer c"], err
  assert [len(c["prompts"]) for c in calls] == [2, 2] and [c["first_row"] for c in calls] == [0, 2]  # one width


def test_a_big_vision_npz_needs_the_model_config_flag(tmp_path):
  """The CLIs' error names their flag, --model_config, not vlm_jax.load's config= argument."""
  import argparse
  from tools import predict
  args = argparse.Namespace(checkpoint=str(tmp_path / "pg.npz"), model_config=None, dtype=None, tokenizer=None)
  with pytest.raises(ValueError, match=r"pg.npz is a big_vision .npz: pass --model_config NAME"):
    predict.load_model(args)
