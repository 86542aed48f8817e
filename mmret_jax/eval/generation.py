"""Generation-based evaluation of mBLIP (Geigle et al., arXiv 2307.06930): beam-search answers / captions and the
seed's metrics (gregor-ge/mBLIP `src/tasks/vllm/evaluation.py`, shared/reference/mblip.md "Evaluation protocol").

Metrics (inputs: N predictions, N gold labels / answer lists / reference lists):
  vqa_clean             LAVIS' VQA answer normalisation: punctuation, number words -> digits, no articles,
                        contractions given their apostrophes back.
  classification_accuracy  xGQA / XVNLI / MaRVL: {"acc": exact match of the cleaned prediction and the lower-cased
                        label, "relaxed_acc": the label is a prefix or suffix of the prediction}.
  vqav2_accuracy        VQAv2: for each of a question's answers, min(1, matches among the other answers / 3),
                        averaged over all answers of all questions.
  maxm_accuracy         MaXM: 1 if the prediction equals any processed answer (no cleaning, as the seed).
  caption_scores        XM3600 / xFlickrCo: BLEU-1..4 and CIDEr of pycocoevalcap on PTB-tokenised (Java) text,
                        predictions NFC-normalised (METEOR / ROUGE-L / SPICE off, as the seed).
`metric_table` groups rows by a language field (when the rows have one) and adds the pooled "all" row.

CLI (`python -m mmret_jax.eval.generation --model DIR --data FILE --task TASK --image-root DIR --output P.jsonl`):
the model is a training workdir (its `model/` export) or a converted mBLIP dir with its tokenizer (and
`mblip.json`, the input settings of the run). Rows as the training files (data/sources/mblip_json.py): the
prompt is `template.format(context)`; the gold answer is `text_label` (a string, or a list for vqav2 / maxm /
caption references; `--label-map` applied) or else `label`. Generation as the reference: 5 beams, min 1 new
token; vqa / classify / vqav2 / maxm 10 new tokens, length penalty -1; caption 50 tokens, length penalty 1.
Writes one JSON object per row (index, image, prompt, prediction, label[, language]) and `P.metrics.json`,
and prints the metric table.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import sys
import unicodedata
from typing import Any, Callable, Sequence

import numpy as np

TASKS = ("vqa", "classify", "vqav2", "maxm", "caption")
# (max_new_tokens, length_penalty) per task: configs/evaluation/*.yaml of the reference
TASK_DEFAULTS = {"vqa": (10, -1.0), "classify": (10, -1.0), "vqav2": (10, -1.0), "maxm": (10, -1.0),
                 "caption": (50, 1.0)}
LANGUAGE_FIELDS = ("language", "lang")

# ----------------------------------------------------------------------------- vqa_clean tables

NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBER_WORDS["none"] = "0"
ARTICLES = frozenset(("a", "an", "the"))
# Removed when next to a space (or when the text has a digit,digit group), otherwise turned into a space.
PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit
# The LAVIS / VQA evaluation removes at most this many periods: its `re.sub(pattern, "", text, re.UNICODE)`
# passes the flag as the count.
_PERIOD_LIMIT = 32
# Contracted forms whose apostrophe-less spellings are repaired. A spelling is recognised with exactly ONE
# apostrophe missing ("couldn'tve" and "couldnt've" -> "couldn't've", but not "couldntve"), as the VQA tables.
CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've needn't not've
o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's
someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've
there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're
what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't
would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()
# (The reference's table also lists "I'm", "I've", ... with capitals, which never match lower-cased words, and
# maps "somebody'd" the wrong way round, to "somebodyd"; kept so that scores match.)
_CONTRACTION_QUIRKS = {"somebody'd": "somebodyd"}


def _build_contractions(forms: Sequence[str]) -> dict[str, str]:
  table = {}
  for form in forms:
    spots = [i for i, ch in enumerate(form) if ch == "'"]
    for i in spots:
      table[form[:i] + form[i + 1:]] = form
  table.update(_CONTRACTION_QUIRKS)
  return table


CONTRACTIONS = _build_contractions(CONTRACTED)


def _clean_punctuation(text: str) -> str:
  glue = _DIGIT_COMMA_DIGIT.search(text) is not None
  out = text
  for p in PUNCTUATION:
    # decided on the text before any replacement
    out = out.replace(p, "" if glue or (p + " ") in text or (" " + p) in text else " ")
  return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def _clean_words(text: str) -> str:
  words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_clean(answers: Sequence[str]) -> list[str]:
  """The LAVIS / VQA answer normalisation of each answer (module docstring)."""
  out = []
  for a in answers:
    a = a.replace("\n", "").replace("\t", "").strip()
    out.append(_clean_words(_clean_punctuation(a)))
  return out


# ----------------------------------------------------------------------------- accuracies

def _check_lengths(preds: Sequence, golds: Sequence, what: str) -> None:
  if len(preds) != len(golds):
    raise ValueError(f"{len(preds)} predictions but {len(golds)} {what}")
  if not preds:
    raise ValueError("no predictions to score")


def _as_list(x) -> list[str]:
  return [str(v) for v in x] if isinstance(x, (list, tuple)) else [str(x)]


def classification_accuracy(preds: Sequence[str], labels: Sequence[str], vqa_process: bool = True) -> dict[str, float]:
  """{"acc": exact match, "relaxed_acc": the label starts or ends the prediction}; labels lower-cased and stripped,
  predictions `vqa_clean`ed (when `vqa_process`), stripped and lower-cased."""
  _check_lengths(preds, labels, "labels")
  cleaned = vqa_clean(preds) if vqa_process else list(preds)
  exact = relaxed = 0
  for p, y in zip(cleaned, labels):
    p, y = p.strip().lower(), str(y).strip().lower()
    exact += p == y
    relaxed += p.startswith(y) or p.endswith(y)
  return {"acc": exact / len(cleaned), "relaxed_acc": relaxed / len(cleaned)}


def vqav2_accuracy(preds: Sequence[str], answer_lists: Sequence[Sequence[str]], vqa_process: bool = True) -> float:
  """VQAv2 accuracy: each gold answer left out in turn, min(1, matches of the others / 3); the mean over all
  (question, left-out answer) pairs."""
  _check_lengths(preds, answer_lists, "answer lists")
  cleaned = vqa_clean(preds) if vqa_process else list(preds)
  score, count = 0.0, 0
  for p, answers in zip(cleaned, answer_lists):
    p = p.strip().lower()
    hits = [a.strip().lower() == p for a in _as_list(answers)]
    total = sum(hits)
    for h in hits:
      score += min(1.0, (total - h) / 3.0)
      count += 1
  if not count:
    raise ValueError("every answer list is empty")
  return score / count


def maxm_accuracy(preds: Sequence[str], answer_lists: Sequence[Sequence[str]], vqa_process: bool = False) -> float:
  """MaXM: the share of predictions (stripped, lower-cased) equal to one of their (lower-cased) answers."""
  _check_lengths(preds, answer_lists, "answer lists")
  cleaned = vqa_clean(preds) if vqa_process else list(preds)
  good = sum(p.strip().lower() in {a.strip().lower() for a in _as_list(answers)}
             for p, answers in zip(cleaned, answer_lists))
  return good / len(cleaned)


# ----------------------------------------------------------------------------- captions

def require_java() -> str:
  """The `java` executable pycocoevalcap's PTB tokenizer runs, or an error saying how to get one."""
  java = shutil.which("java")
  if java is None:
    raise OSError("caption metrics need Java: pycocoevalcap's PTB tokenizer runs `java` (Stanford CoreNLP), "
                  "and none is on PATH; install a JRE (e.g. `apt-get install default-jre-headless`)")
  return java


def _coco_scorers():
  try:
    from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=import-outside-toplevel
    from pycocoevalcap.cider.cider import Cider  # pylint: disable=import-outside-toplevel
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"caption metrics need pycocoevalcap (`pip install 'pycocoevalcap>=1.2'`): {e}") from None
  return PTBTokenizer, Bleu, Cider


def caption_scores(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
  """{"Bleu_1".."Bleu_4", "CIDEr"} of N predictions against their reference lists (pycocoevalcap, PTB-tokenised,
  corpus-level: CIDEr's document frequencies come from these N reference sets). Predictions are NFC-normalised;
  zh / ja / th predictions should be word-segmented first (the seed uses spaCy), see `metric_table`."""
  _check_lengths(preds, refs, "reference lists")
  require_java()
  tokenizer_cls, bleu_cls, cider_cls = _coco_scorers()
  gts = {i: [{"caption": r} for r in _as_list(rs)] for i, rs in enumerate(refs)}
  if any(not v for v in gts.values()):
    raise ValueError("every prediction needs at least one reference caption")
  res = {i: [{"caption": unicodedata.normalize("NFC", p)}] for i, p in enumerate(preds)}
  tok = tokenizer_cls()
  gts, res = tok.tokenize(gts), tok.tokenize(res)
  out = {}
  bleu, _ = bleu_cls(4).compute_score(gts, res, verbose=0)
  out.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
  cider, _ = cider_cls().compute_score(gts, res)
  out["CIDEr"] = float(cider)
  return out


SEGMENTED_LANGUAGES = ("zh", "ja", "th")


def spacy_segmenter(language: str) -> Callable[[str], str] | None:
  """Words of a zh / ja / th text joined by spaces (spaCy's blank tokenizer, as the seed), or None without spaCy."""
  try:
    import spacy  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  nlp = spacy.blank(language)
  return lambda text: " ".join(t.text for t in nlp(text))


# ----------------------------------------------------------------------------- tables

def task_metric(task: str, preds: Sequence[str], golds: Sequence[Any]) -> dict[str, float]:
  """The reference's metric of `task` on (predictions, gold labels / answer lists / references)."""
  if task in ("vqa", "classify"):
    return classification_accuracy(preds, [str(g) for g in golds])
  if task == "vqav2":
    return {"acc": vqav2_accuracy(preds, golds)}
  if task == "maxm":
    return {"acc": maxm_accuracy(preds, golds)}
  if task == "caption":
    return caption_scores(preds, golds)
  raise ValueError(f"unknown task {task!r}; one of {TASKS}")


def metric_table(task: str, preds: Sequence[str], golds: Sequence[Any],
                 languages: Sequence[str | None] | None = None) -> dict[str, dict[str, float]]:
  """{group: metrics}: one group per language (when given) and "all" (every row pooled). Captions of zh / ja /
  th are word-segmented with spaCy when it is installed (a note otherwise)."""
  preds = list(preds)
  if task == "caption" and languages:
    for lang in sorted({x for x in languages if x in SEGMENTED_LANGUAGES}):
      seg = spacy_segmenter(lang)
      if seg is None:
        print(f"note: spaCy is not installed: {lang} captions are scored unsegmented (the seed segments "
              "zh / ja / th words with spaCy)", file=sys.stderr)
        continue
      preds = [seg(p) if x == lang else p for p, x in zip(preds, languages)]
  table = {}
  groups = sorted({x for x in languages if x is not None}) if languages else []
  if len(groups) > 1 or (groups and any(x is None for x in languages)):
    for g in groups:
      idx = [i for i, x in enumerate(languages) if x == g]
      table[g] = task_metric(task, [preds[i] for i in idx], [golds[i] for i in idx])
  table["all"] = task_metric(task, preds, golds)
  if len(groups) == 1 and len(table) == 1:
    table = {groups[0]: table["all"], "all": table["all"]}
  return table


def format_table(table: dict[str, dict[str, float]]) -> str:
  """Tab-separated rows of `metric_table`, in percent (CIDEr x 100, as usually reported)."""
  cols = list(next(iter(table.values())))
  lines = ["\t".join(["group"] + cols)]
  for g, m in table.items():
    lines.append("\t".join([g] + [f"{100 * m[c]:.2f}" for c in cols]))
  return "\n".join(lines)


# ----------------------------------------------------------------------------- generation

def predict(model, params, tokenizer, rows, images, *, template: str = "{}", max_len: int = 128,
            decoder_only: bool = False, batch_size: int = 8, num_beams: int = 5, max_new_tokens: int = 10,
            min_new_tokens: int = 1, length_penalty: float = -1.0, progress: bool = False,
            quant: Any = None) -> list[str]:
  """Decoded generations (skip_special_tokens, stripped) of `rows` (mblip_json.Row: context, images): prompts
  `template.format(context)` tokenised as the training batches, the last batch padded with its last row (one
  compiled shape). `quant`: the LLM-relative QuantConfig when `params` has a quantized LLM (`quantize`)."""
  from mmret_jax import generate as gen_lib  # pylint: disable=import-outside-toplevel
  from mmret_jax.data.sources import mblip_json  # pylint: disable=import-outside-toplevel
  starts = range(0, len(rows), batch_size)
  if progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    starts = tqdm(starts, desc="generate", unit="batch", file=sys.stderr)
  out: list[str] = []
  for s in starts:
    chunk = list(rows[s:s + batch_size])
    n = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n)
    ids, labels = mblip_json.tokenize_rows(tokenizer, [r.context for r in chunk], [""] * len(chunk),
                                           decoder_only=decoder_only, max_len=max_len, template=template)
    batch = mblip_json.collate(ids, labels, pad_id=tokenizer.pad_token_id, decoder_only=decoder_only)
    pixels = images([r.images for r in chunk])
    tokens = gen_lib.generate(model, params, pixels, batch["input_ids"], batch["attention_mask"],
                              num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                              length_penalty=length_penalty, quant=quant)
    text = tokenizer.batch_decode(np.asarray(tokens)[:n].tolist(), skip_special_tokens=True)
    out.extend(t.strip() for t in text)
  return out


def gold_of(obj: dict, row, label_map: dict[str, str]) -> Any:
  """The row's gold answer: `text_label` (string or list) if present, else `label`; `label_map` applied."""
  gold = obj.get("text_label")
  if gold is None or gold == "":
    gold = row.label
  if isinstance(gold, (list, tuple)):
    return [label_map.get(str(g), str(g)) for g in gold]
  return label_map.get(str(gold), str(gold))


def read_rows(path: pathlib.Path, limit: int = 0) -> tuple[list, list[dict], int]:
  """(mblip_json.Row list, the raw objects, malformed rows skipped) of a JSON list / JSON lines file."""
  from mmret_jax.data.sources import mblip_json  # pylint: disable=import-outside-toplevel
  if not path.is_file():
    raise FileNotFoundError(f"data file not found: {path}")
  text = path.read_text(encoding="utf-8")
  try:
    objs = json.loads(text)
    if not isinstance(objs, list):
      raise ValueError(f"{path}: expected a JSON list of rows (or JSON lines), got {type(objs).__name__}")
  except json.JSONDecodeError:
    try:
      objs = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: neither a JSON list nor JSON lines ({e})") from None
  rows, raw, skipped = [], [], 0
  for obj in objs:
    row, _ = mblip_json._parse_row(obj)  # pylint: disable=protected-access
    if row is None:
      skipped += 1
      continue
    rows.append(row)
    raw.append(obj)
    if limit and len(rows) >= limit:
      break
  if not rows:
    raise ValueError(f"{path}: no usable rows (each needs context, label and image_id or left_image + "
                     f"right_image; {skipped} malformed)")
  return rows, raw, skipped


def load_model(path: str, dtype: str = "float32"):
  """(model, params, tokenizer, settings) of a training workdir or a converted mBLIP dir."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mmret_jax import convert  # pylint: disable=import-outside-toplevel
  from mmret_jax.data import text as text_lib  # pylint: disable=import-outside-toplevel
  from mmret_jax.models import mblip  # pylint: disable=import-outside-toplevel
  root = convert.localize(path)
  if not root.exists():
    raise FileNotFoundError(f"model directory not found: {path}")
  meta, hf_config, params, _ = convert.load_any(root)
  if meta.get("family") != "mblip":
    raise ValueError(f"{path} is a {meta.get('family')} model, not an mBLIP one (convert an HF mBLIP dir with "
                     "`python -m mmret_jax.convert to-jax SRC DST`)")
  model_dir = root if convert.is_converted_dir(root) or not convert.is_converted_dir(root / "model") else root / "model"
  try:
    tokenizer = text_lib.load_tokenizer(model_dir)
  except (OSError, ValueError) as e:
    raise OSError(f"no tokenizer in {model_dir} ({type(e).__name__}: {e})") from None
  model = convert.build_model(meta, hf_config, dtype=jnp.dtype(dtype))
  family = mblip.llm_family(model.config)
  settings = {"max_len": 128, "template": "{}", "image_size": int(model.config.vision_config.image_size),
              "decoder_only": family == "bloom"}
  sfile = model_dir / "mblip.json"
  if sfile.is_file():
    settings.update({k: v for k, v in json.loads(sfile.read_text()).items() if k in settings})
  return model, params, tokenizer, settings


QUANT = {"none": 0, "int8": 8, "int4": 4}


def quantize(model, params, kind: str):
  """(params, QuantConfig or None): the LLM's block matrices weight-only quantized (`kind` int8 / int4, qwix;
  models/quant.py), or the params unchanged for "none"."""
  if kind not in QUANT:
    raise ValueError(f"quantization must be one of {sorted(QUANT)}, got {kind!r}")
  if not QUANT[kind]:
    return params, None
  try:
    from mmret_jax.models import quant  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"--quant {kind} needs qwix: pip install -e '.[quant]' ({e})") from None
  from mmret_jax.models import mblip  # pylint: disable=import-outside-toplevel
  qc = quant.llm_config(mblip.llm_family(model.config), QUANT[kind])
  return quant.quantize_llm(model, params, qc), qc


def _label_map(items: Sequence[str]) -> dict[str, str]:
  out = {}
  for it in items:
    if "=" not in it:
      raise ValueError(f"--label-map wants KEY=VALUE (e.g. True=yes), got {it!r}")
    k, v = it.split("=", 1)
    out[k] = v
  return out


def main(argv: Sequence[str] | None = None) -> int:
  from mmret_jax import cli  # pylint: disable=import-outside-toplevel
  p = cli.ArgumentParser(prog="python -m mmret_jax.eval.generation", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="a training workdir or a converted mBLIP dir (+ tokenizer)")
  p.add_argument("--data", required=True, help="evaluation rows (JSON list or JSON lines)")
  p.add_argument("--task", required=True, choices=TASKS)
  p.add_argument("--image-root", action="append", required=True, help="image root (repeatable; first match wins)")
  p.add_argument("--output", required=True, help="predictions JSONL; metrics go to <stem>.metrics.json")
  p.add_argument("--template", default=None, help="prompt template, {} = the row's context (default: the "
                 "model's mblip.json template, else {})")
  p.add_argument("--num-beams", type=int, default=5)
  p.add_argument("--max-new-tokens", type=int, default=None, help="default: 10 (50 for caption)")
  p.add_argument("--min-new-tokens", type=int, default=1)
  p.add_argument("--length-penalty", type=float, default=None, help="default: -1 (1 for caption)")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--limit", type=int, default=0, help="only the first N rows (0 = all)")
  p.add_argument("--label-map", action="append", default=[], help="KEY=VALUE on gold labels (e.g. True=yes)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--quant", default="none", choices=tuple(QUANT), help="the LLM's block matrices weight-only "
                 "int8 / int4 (qwix) for generation; the image side stays float")
  p.add_argument("--num-threads", type=int, default=4)
  a = p.parse_args(argv)
  if a.batch_size < 1 or a.num_beams < 1 or a.limit < 0:
    p.error("--batch-size and --num-beams must be >= 1, --limit >= 0")
  label_map = _label_map(a.label_map)
  data = pathlib.Path(a.data)
  rows, raw, skipped = read_rows(data, a.limit)
  for r in a.image_root:
    if not pathlib.Path(r).is_dir():
      raise FileNotFoundError(f"image root not found: {r}")
  model, params, tokenizer, settings = load_model(a.model, a.dtype)
  params, qc = quantize(model, params, a.quant)
  from mmret_jax.data.sources import mblip_json  # pylint: disable=import-outside-toplevel
  images = mblip_json.MblipImages(mblip_json.ImageResolver(a.image_root), int(settings["image_size"]),
                                  a.num_threads)
  max_new, lp = TASK_DEFAULTS[a.task]
  template = a.template if a.template is not None else str(settings["template"])
  if "{}" not in template:
    raise ValueError(f"--template must contain {{}} (the row's context), got {template!r}")
  print(f"note: {len(rows)} rows from {data.name}" + (f", {skipped} malformed skipped" if skipped else ""),
        file=sys.stderr)
  preds = predict(model, params, tokenizer, rows, images, template=template, max_len=int(settings["max_len"]),
                  decoder_only=bool(settings["decoder_only"]), batch_size=a.batch_size, num_beams=a.num_beams,
                  max_new_tokens=a.max_new_tokens or max_new, min_new_tokens=a.min_new_tokens,
                  length_penalty=lp if a.length_penalty is None else a.length_penalty, progress=True, quant=qc)
  golds = [gold_of(o, r, label_map) for o, r in zip(raw, rows)]
  langs = [next((str(o[f]) for f in LANGUAGE_FIELDS if o.get(f) is not None), None) for o in raw]
  out = pathlib.Path(a.output)
  out.parent.mkdir(parents=True, exist_ok=True)
  with out.open("w", encoding="utf-8") as f:
    for i, (r, pr, g, lang) in enumerate(zip(rows, preds, golds, langs)):
      rec = {"index": i, "image": r.images[0] if len(r.images) == 1 else list(r.images),
             "prompt": template.format(r.context), "prediction": pr, "label": g}
      if lang is not None:
        rec["language"] = lang
      f.write(json.dumps(rec, ensure_ascii=False) + "\n")
  table = metric_table(a.task, preds, golds, langs if any(x is not None for x in langs) else None)
  metrics_path = out.with_name(out.stem + ".metrics.json")
  metrics_path.write_text(json.dumps({"task": a.task, "rows": len(rows), "metrics": table}, indent=1))
  print(format_table(table))
  print(f"note: predictions in {out}, metrics in {metrics_path}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  from mmret_jax import cli as _cli  # pylint: disable=import-outside-toplevel
  sys.exit(_cli.run(main))
