"""mBLIP generation evaluation (`eval/generation.py`): the metrics against plain-Python transcriptions of the seed's
functions (gregor-ge/mBLIP src/tasks/vllm/evaluation.py, written out below) on hand-made and random cases, the
caption scores against pycocoevalcap called directly, and the CLI end to end on the bundled sample with a freshly
initialised exported model (plus the task's `generation_metrics` hook)."""

from __future__ import annotations

import json
import pathlib
import random
import re
import shutil
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from mmret_jax import cli
from mmret_jax.data.sources import mblip_json
from mmret_jax.eval import generation as ge
from mmret_jax.train.partitioning import make_mesh

from fixtures import override

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import mblip_mt0  # noqa: E402  pylint: disable=wrong-import-position

# ----------------------------------------------------------------------------- the seed, transcribed

SEED_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
SEED_ARTICLES = ["a", "an", "the"]
SEED_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
SEED_COMMA = re.compile(r"(\d)(,)(\d)")
SEED_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
              "!"]
SEED_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've"}


def seed_vqa_clean(captions):
  def punctuation(in_text):
    out_text = in_text
    for p in SEED_PUNCT:
      if (p + " " in in_text or " " + p in in_text) or (re.search(SEED_COMMA, in_text) is not None):
        out_text = out_text.replace(p, "")
      else:
        out_text = out_text.replace(p, " ")
    return SEED_PERIOD.sub("", out_text, re.UNICODE)

  def digit_article(in_text):
    out = []
    for word in in_text.lower().split():
      word = SEED_NUMBERS.setdefault(word, word)
      if word not in SEED_ARTICLES:
        out.append(word)
    for i, word in enumerate(out):
      if word in SEED_CONTRACTIONS:
        out[i] = SEED_CONTRACTIONS[word]
    return " ".join(out)

  return [digit_article(punctuation(c.replace("\n", "").replace("\t", "").strip())) for c in captions]


def seed_classification(labels, captions):
  captions = seed_vqa_clean(captions)
  correct = relaxed = total = 0
  for label, caption in zip(labels, captions):
    label, caption = label.lower().strip(), caption.strip().lower()
    correct += label == caption
    relaxed += caption.startswith(label) or caption.endswith(label)
    total += 1
  return dict(acc=correct / total, relaxed_acc=relaxed / total)


def seed_vqav2(labels_lists, captions):
  captions = seed_vqa_clean(captions)
  correct = total = 0
  for labels, caption in zip(labels_lists, captions):
    labels = [x.lower().strip() for x in labels]
    caption = caption.strip().lower()
    for i in range(len(labels)):
      others = [labels[j] for j in range(len(labels)) if j != i]
      hits = len([1 for x in others if x == caption])
      correct += min(1, float(hits / 3.0))
      total += 1
  return correct / total


def seed_maxm(labels_lists, captions):
  correct = total = 0
  for labels, caption in zip(labels_lists, captions):
    labels = [x.lower().strip() for x in labels]
    caption = caption.strip().lower()
    correct += min(1, len([1 for x in labels if x == caption]))
    total += 1
  return correct / total


# ----------------------------------------------------------------------------- metrics

HAND = ["The two dogs.", "Yes!", "dont know", "1,000 people", "a-b c", "It's 3.5 m. long", "no , it isnt",
        "ten (10)", "  Three cats\n", "youre\tright", "an apple; the pear", "what's up?", "somebody'd go",
        "Im here", "y'allll", "hed've", "she's", "x . y . z", "none", "e-mail@home", "it's 1.5, maybe 2",
        "... " * 20, "a.b.c." * 12, "<b>bold</b> =x+y", "path/to [file]", "{'a': \"b\"}", "back`tick_and\\"]


def random_answers(rng: random.Random, n: int) -> list[str]:
  pieces = (list(SEED_CONTRACTIONS) + list(SEED_NUMBERS) + SEED_ARTICLES + SEED_PUNCT +
            [".", "3.5", "1,000", "2", "Yes", "NO", "maybe", "red", "The", "A", "\n", "\t", " ", "..", "x.5"])
  out = []
  for _ in range(n):
    k = rng.randint(0, 8)
    seps = [rng.choice(["", " ", " ", "  "]) for _ in range(k)]
    out.append("".join(rng.choice(pieces) + s for s, _ in zip(seps, range(k))))
  return out


def test_vqa_clean_matches_the_seed():
  rng = random.Random(0)
  cases = HAND + list(SEED_CONTRACTIONS) + [k.upper() for k in SEED_CONTRACTIONS] + random_answers(rng, 3000)
  cases += [" ".join(rng.sample(list(SEED_CONTRACTIONS), 3)) for _ in range(200)]
  got, want = ge.vqa_clean(cases), seed_vqa_clean(cases)
  bad = [(c, g, w) for c, g, w in zip(cases, got, want) if g != w]
  assert not bad, bad[:5]
  assert got[:5] == ["2 dogs", "yes", "don't know", "1000 people", "b c"]  # by hand: the rules in the docstring
  # the contraction table built from the contracted forms equals the seed's (its never-matching capitals aside)
  seed = {k: v for k, v in SEED_CONTRACTIONS.items() if k == k.lower() and k != v}
  assert ge.CONTRACTIONS == seed


def test_accuracies_match_the_seed():
  rng = random.Random(1)
  vocab = ["yes", "no", "maybe", "2", "two", "red", "the red", "Red.", "blue", "yes, it is", "it is yes"]
  for trial in range(30):
    n = rng.randint(1, 40)
    preds = [rng.choice(vocab) for _ in range(n)]
    labels = [rng.choice(vocab[:6]) for _ in range(n)]
    got = ge.classification_accuracy(preds, labels)
    want = seed_classification(labels, preds)
    assert got == pytest.approx(want, abs=1e-12), trial
    answers = [[rng.choice(vocab[:7]) for _ in range(rng.choice([10, 10, 3, 1]))] for _ in range(n)]
    assert ge.vqav2_accuracy(preds, answers) == pytest.approx(seed_vqav2(answers, preds), abs=1e-12)
    assert ge.maxm_accuracy(preds, answers) == pytest.approx(seed_maxm(answers, preds), abs=1e-12)
  # by hand: 4 of 10 say "2" -> each left-out "2" sees 3 (1.0), each other answer sees 4 (1.0); 2 of 10 -> 0.6 avg
  assert ge.vqav2_accuracy(["two"], [["2"] * 4 + ["3"] * 6]) == 1.0
  assert ge.vqav2_accuracy(["2"], [["2"] * 2 + ["3"] * 8]) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
  assert ge.classification_accuracy(["Yes, it is."], ["yes"]) == {"acc": 0.0, "relaxed_acc": 1.0}
  assert ge.maxm_accuracy(["The cat"], [["cat"]]) == 0.0  # MaXM: no cleaning, as the seed
  with pytest.raises(ValueError, match="2 predictions but 1 labels"):
    ge.classification_accuracy(["a", "b"], ["a"])


def test_caption_scores_match_pycocoevalcap():
  if shutil.which("java") is None:
    pytest.fail("java is not on PATH: pycocoevalcap's PTB tokenizer needs it (install a JRE)")
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  preds = ["A red circle.", "a blue square on white", "two green triangles", "Un cercle vert."]
  refs = [["a red circle", "A red round shape."], ["A blue square.", "blue box on a white background"],
          ["two green triangles", "green triangles, two of them"], ["Un cercle vert.", "un rond vert"]]
  tok = PTBTokenizer()
  gts = tok.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
  res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  cider, _ = Cider().compute_score(gts, res)
  got = ge.caption_scores(preds, refs)
  want = {**{f"Bleu_{i + 1}": b for i, b in enumerate(bleu)}, "CIDEr": cider}
  assert got == pytest.approx(want, abs=1e-9)
  assert got["CIDEr"] > 1.0 and got["Bleu_1"] > 0.7  # mostly right captions
  # grouped by language: each group scored on its own rows, "all" pooled
  table = ge.metric_table("caption", preds, refs, ["en", "en", "en", "fr"])
  assert set(table) == {"en", "fr", "all"} and table["all"] == pytest.approx(want, abs=1e-9)
  assert table["en"] == pytest.approx(ge.caption_scores(preds[:3], refs[:3]), abs=1e-9)


def test_missing_java_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(ge.shutil, "which", lambda name: None)
  with pytest.raises(OSError, match="caption metrics need Java"):
    ge.caption_scores(["a"], [["a"]])


# ----------------------------------------------------------------------------- CLI end to end

def make_task(c, workdir):
  from mmret_jax.tasks.mblip import MBlipTask  # pylint: disable=import-outside-toplevel
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  with jax.set_mesh(mesh):
    return MBlipTask(c, mesh, pathlib.Path(workdir))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(task, params, workdir) of a freshly initialised `mblip_mt0:smoke` model exported as a training run does."""
  w = tmp_path_factory.mktemp("gen")
  c = override(mblip_mt0.get_config("smoke"), {"checkpoint.async_save": False, "data.val_size": 6,
                                                "data.eval_batch_size": 4})
  task = make_task(c, w)
  params = nn.unbox(task.init_params(jax.random.PRNGKey(0)))  # as the training loop hands them over
  task.export(params, w / "model")
  return task, params, w


def run_cli(args):
  return cli.run(ge.main, args)


def test_cli_writes_predictions_and_metrics(exported, tmp_path, capsys):
  _, _, w = exported
  root = mblip_json.sample_root()
  out = tmp_path / "preds.jsonl"
  rc = run_cli(["--model", str(w), "--data", str(root / "marvl.json"), "--task", "classify", "--image-root",
                str(root / "images"), "--image-root", str(root / "images_extra"), "--output", str(out),
                "--label-map", "True=yes", "--label-map", "False=no", "--limit", "5", "--batch-size", "4"])
  printed = capsys.readouterr()
  assert rc == 0, printed.err
  recs = [json.loads(line) for line in out.read_text().splitlines()]
  data = json.loads((root / "marvl.json").read_text())[:5]
  assert [r["index"] for r in recs] == list(range(5))
  assert [r["label"] for r in recs] == [{"True": "yes", "False": "no"}[d["text_label"]] for d in data]
  assert [r["image"] for r in recs] == [[d["left_image"], d["right_image"]] for d in data]
  assert [r["prompt"] for r in recs] == [d["context"] for d in data]  # the export's template "{}"
  assert all(isinstance(r["prediction"], str) for r in recs) and recs[0]["language"] == "en"
  metrics = json.loads((tmp_path / "preds.metrics.json").read_text())["metrics"]
  want = seed_classification([r["label"] for r in recs], [r["prediction"] for r in recs])
  assert metrics["en"] == pytest.approx(want) and metrics["all"] == pytest.approx(want)
  assert "relaxed_acc" in printed.out and "generate" in printed.err  # table + progress bar


def test_cli_caption_and_vqa_tasks(exported, tmp_path, capsys):
  _, _, w = exported
  root = mblip_json.sample_root()
  rows = json.loads((root / "train.json").read_text())
  good = [r for r in rows if isinstance(r, dict) and isinstance(r.get("label"), str) and r.get("image_id")][:4]
  data = tmp_path / "cap.jsonl"
  data.write_text("\n".join(json.dumps({**r, "text_label": [r["label"], "a shape"]}) for r in good))
  for task in ("caption", "maxm"):
    out = tmp_path / f"{task}.jsonl"
    rc = run_cli(["--model", str(w / "model"), "--data", str(data), "--task", task, "--image-root",
                  str(root / "images"), "--output", str(out), "--max-new-tokens", "4", "--template",
                  "Question: {} Short answer in English:"])
    assert rc == 0, capsys.readouterr().err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs[0]["prompt"] == f"Question: {good[0]['context']} Short answer in English:"
    metrics = json.loads((tmp_path / f"{task}.metrics.json").read_text())["metrics"]["all"]
    preds, golds = [r["prediction"] for r in recs], [r["label"] for r in recs]
    if task == "caption":
      assert metrics == pytest.approx(ge.caption_scores(preds, golds))
    else:
      assert metrics == {"acc": seed_maxm(golds, preds)}


def test_cli_int8_predictions_are_the_dequantized_models(exported, tmp_path, capsys):
  """`--quant int8`: the LLM's block kernels int8 (qwix) in the cached beam search; its predictions equal
  `predict` with the float model on the dequantized weights (q * scale)."""
  from mmret_jax.data.sources import mblip_json as mj  # pylint: disable=import-outside-toplevel
  from mmret_jax.models import quant  # pylint: disable=import-outside-toplevel
  _, _, w = exported
  root = mblip_json.sample_root()
  out = tmp_path / "q.jsonl"
  rc = run_cli(["--model", str(w), "--data", str(root / "marvl.json"), "--task", "classify", "--image-root",
                str(root / "images"), "--image-root", str(root / "images_extra"), "--output", str(out),
                "--limit", "4", "--batch-size", "4", "--quant", "int8"])
  assert rc == 0, capsys.readouterr().err
  preds = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
  model, params, tok, settings = ge.load_model(str(w))
  qparams, qc = ge.quantize(model, params, "int8")
  assert qc.bits == 8 and quant.quantized_paths(qparams["language_model"])
  deq = {**params, "language_model": quant.dequantize_params(qparams["language_model"])}
  rows, _, _ = ge.read_rows(root / "marvl.json", 4)
  images = mj.MblipImages(mj.ImageResolver([str(root / "images"), str(root / "images_extra")]),
                          int(settings["image_size"]), 1)
  ref = ge.predict(model, deq, tok, rows, images, template=str(settings["template"]),
                   max_len=int(settings["max_len"]), decoder_only=bool(settings["decoder_only"]), batch_size=4)
  assert preds == ref
  with pytest.raises(ValueError, match="quantization must be one of"):
    ge.quantize(model, params, "int3")


def test_cli_errors_are_one_line(exported, tmp_path, capsys):
  _, _, w = exported
  root = mblip_json.sample_root()
  base = ["--image-root", str(root / "images"), "--output", str(tmp_path / "p.jsonl")]
  cases = [
      (["--model", str(tmp_path / "nope"), "--data", str(root / "marvl.json"), "--task", "vqa"], 1,
       "model directory not found"),
      (["--model", str(w), "--data", str(tmp_path / "none.json"), "--task", "vqa"], 1, "data file not found"),
      (["--model", str(w), "--data", str(root / "marvl.json"), "--task", "vqa3"], 2, "invalid choice: 'vqa3'"),
      (["--model", str(w), "--data", str(root / "marvl.json"), "--task", "vqa", "--template", "Q:"], 1,
       "must contain {}"),
  ]
  for args, code, msg in cases:
    try:
      rc = run_cli(args + base)
    except SystemExit as e:
      rc = e.code
    err = capsys.readouterr().err
    assert rc == code and msg in err and "Traceback" not in err, (args, err)


def test_task_generation_metrics_hook(exported):
  task, params, _ = exported
  assert task.generation_metrics(params) == {}  # off unless generation.eval_task is set
  task.config.generation.eval_task = "vqa"
  try:
    got = task.generation_metrics(params)
  finally:
    task.config.generation.eval_task = ""
  # a fresh LoRA has B = 0: the merged model the hook generates with is the base model
  lora_b = [x for path, x in jax.tree_util.tree_flatten_with_path(params["lora"])[0]
            if "lora_B" in jax.tree_util.keystr(path)]
  assert lora_b and not any(np.any(np.asarray(x)) for x in lora_b)
  preds = ge.predict(task.model, params["model"], task.tokenizer, task.val_rows, task.images, batch_size=4)
  golds = [r.text_label or r.label for r in task.val_rows]
  assert got == pytest.approx({f"gen_{k}": v for k, v in seed_classification(golds, preds).items()})
  assert set(got) == {"gen_acc", "gen_relaxed_acc"}
  assert len(golds) == 6 and np.isfinite(list(got.values())).all()
