"""BagFormer evaluation on MUGE: first-stage late interaction over the whole pool, ITM re-ranking.

    python -m mmret_jax.eval.bagformer --model DIR --muge-root ROOT --split valid --out OUT [--k-test 256]

DIR is a training workdir or a converted BagFormer dir (`python -m mmret_jax.convert to-jax ...
--family bagformer`); ROOT holds `MR_{split}_queries.jsonl` and `MR_{split}_imgs.tsv`.

The seed's `evaluation` (train_muge.py; shared/reference/bagformer.md section 5):
1. encode every query (text mode, 25 tokens) and every pool image;
2. first stage (`model.interaction`): bagwise = the late interaction of each query's bags (bagged per
   batch of `--batch-size` queries, 64 as the seed's `batch_size_test`, zero bags past the batch's bag
   count) with the 257 projected image tokens; tokenwise = every projected query token; cls_token = the
   CLS dot product. Scores in both directions come from eval/late_interaction.py in blocks on device;
3. re-ranking: for each query (t2i) and each image (i2t), the top `k_test` of the first stage scored with
   the ITM head's match logit (fusion over the raw text states and the raw image tokens). Three score
   sets: `recall` (first stage), `rank` (ITM logit, -100 outside the top k), `merge` (ITM logit + first
   stage, -100 outside);
4. metrics (eval/muge.py `itm_eval`, the seed's keys) on a labelled split: the MUGE figure is text ->
   image R@1/5/10 and their mean (`img_r1`, ..., `img_r_mean`).
Files under OUT: `results.json`, and `{merge,recall,rank}_t2i.jsonl` (the seed's `--testing` output: the
top-10 item ids per query). `--plot PATH.png` also draws the re-ranked (`merge`) top-5 images of the first
`--plot-queries` text queries, the labelled items framed green (`t2i_rows` + `mmret_jax.viz`). Raw image states (the re-ranking input, [N, 257, 768]) are kept in float16
as the seed does; with OUT they live in a memory-mapped file there, not in RAM.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmret_jax import cli
from mmret_jax.data import bagging
from mmret_jax.data import text as text_lib
from mmret_jax.data.sources import muge
from mmret_jax.eval import late_interaction
from mmret_jax.eval import muge as muge_metrics
from mmret_jax.models import bagformer

SCORE_SETS = ("recall", "rank", "merge")
DIRECTIONS = ("t2i", "i2t")
OUTSIDE = -100.0  # the seed's fill for pairs outside the re-ranked top k


class BagFormerEncoder:
  """A trained or converted BagFormer for inference: `encode_texts`, `encode_images`, `itm_scores`."""

  def __init__(self, model: bagformer.BagFormer, params, inputs, interaction: str = "bagwise",
               fusion_strategy: str = "late_fusion", path: str = ""):
    self.model, self.params, self.inputs, self.path = model, params, inputs, path
    self.interaction, self.fusion_strategy = interaction, fusion_strategy
    m = model

    def text_fn(p, b):
      if fusion_strategy == "early_fusion":
        feat, feats, embeds = m.apply({"params": p}, b["ids"], b["bag_index"], b["bag_mask"],
                                      method=m.early_fusion_text)
        return embeds, b["bag_mask"], feat, feats * b["bag_mask"][..., None]
      embeds = m.apply({"params": p}, b["ids"], b["mask"], method=m.text_embeds)
      feat = m.apply({"params": p}, embeds, method=m.text_feat)
      if interaction == "tokenwise":
        n, length = b["ids"].shape
        feats = m.apply({"params": p}, embeds, jnp.broadcast_to(jnp.arange(length), (n, length)),
                        jnp.ones((n, length), jnp.float32), method=m.bag_feats)
      else:
        feats = m.apply({"params": p}, embeds, b["bag_index"], b["bag_mask"], method=m.bag_feats)
      return embeds, b["mask"], feat, feats

    def image_fn(p, pixels):
      embeds = m.apply({"params": p}, pixels, method=m.image_embeds)
      return embeds, m.apply({"params": p}, embeds, method=m.image_feats)

    self._text = jax.jit(text_fn)
    self._image = jax.jit(image_fn)
    self._itm = jax.jit(lambda p, t, tm, i: m.apply({"params": p}, t, tm, i, method=m.itm_logits)[:, 1])

  @classmethod
  def from_dir(cls, path, *, bagging_mode: str | None = None, dictionary: str | None = None,
               dtype: str = "float32") -> "BagFormerEncoder":
    from mmret_jax.tasks import bagformer as task  # pylint: disable=import-outside-toplevel
    path = pathlib.Path(path)
    if not path.exists():
      raise FileNotFoundError(f"model not found: {path}")
    path, config, params = task.load_bagformer_dir(path, str(path))
    settings = json.loads((path / task.SETTINGS_FILE).read_text()) if (path / task.SETTINGS_FILE).exists() else {}
    try:
      tok = text_lib.load_tokenizer(path)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"no usable tokenizer in {path} ({type(e).__name__}); convert with --tokenizer DIR") from e
    dict_path = dictionary or str(path / task.DICT_FILE)
    if not pathlib.Path(dict_path).exists():
      raise FileNotFoundError(f"no entity dictionary: {dict_path} (give --dictionary FILE, one word a line)")
    mode = bagging_mode or settings.get("bagging_mode", "faithful")
    bagger = bagging.EntityBagger.from_tokenizer(dict_path, tok, mode=mode)
    inputs = task.BagFormerInputs(tok, bagger, int(settings.get("image_size") or config.vision.image_size),
                                  int(settings.get("max_length") or 25))
    model = bagformer.BagFormer(config, dtype=jnp.dtype(dtype))
    return cls(model, jax.device_put(params), inputs, settings.get("interaction", "bagwise"),
               settings.get("fusion_strategy", "late_fusion"), str(path))

  def encode_texts(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> dict[str, np.ndarray]:
    """Per query: `embeds` [N, L, D] (text-mode states, the fusion input), `mask` [N, L], `feat` [N, E]
    (CLS), `feats` [N, K, E] (bags / tokens, masked). Bags are formed per batch of `batch_size` queries."""
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    out: dict[str, np.ndarray] = {}
    for s in tqdm(range(0, len(texts), batch_size), desc="queries", unit="batch", disable=not progress):
      n = min(batch_size, len(texts) - s)
      b = self.inputs.texts(texts[s:s + n])  # bag the real rows only (the batch minimum is theirs)
      b = {k: np.concatenate([v, np.repeat(v[:1], batch_size - n, 0)]) if n < batch_size else v for k, v in b.items()}
      res = dict(zip(("embeds", "mask", "feat", "feats"), (np.asarray(x)[:n] for x in self._text(self.params, b))))
      if not out:
        out = {k: np.zeros((len(texts),) + v.shape[1:], np.float32 if k != "mask" else np.int32) for k, v in res.items()}
      for k, v in res.items():
        out[k][s:s + n] = v
    return out

  def encode_images(self, table, ids: Sequence[int], batch_size: int = 64, progress: bool = False,
                    store: pathlib.Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(raw image states [N, 1+P, Dv] float16, projected normalised tokens [N, 1+P, E] float32); an
    undecodable image is a zeros image (counted in `inputs.bad_images`). `store`: a dir for the raw
    states' memory-mapped file."""
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    raw = feats = None
    for s in tqdm(range(0, len(ids), batch_size), desc="images", unit="batch", disable=not progress):
      n = min(batch_size, len(ids) - s)
      imgs = [table.load_at(r) for r in range(s, s + n)] + [None] * (batch_size - n)
      pixels = self.inputs.images(imgs)
      self.inputs.bad_images -= batch_size - n  # the padding is not a bad image
      e, f = (np.asarray(x)[:n] for x in self._image(self.params, pixels))
      if raw is None:
        shape = (len(ids),) + e.shape[1:]
        if store is not None:
          store.mkdir(parents=True, exist_ok=True)
          raw = np.lib.format.open_memmap(store / "image_states.f16.npy", mode="w+", dtype=np.float16, shape=shape)
        else:
          raw = np.zeros(shape, np.float16)
        feats = np.zeros((len(ids),) + f.shape[1:], np.float32)
      raw[s:s + n] = e.astype(np.float16)
      feats[s:s + n] = f
    return raw, feats

  def itm_scores(self, t_embeds: np.ndarray, t_mask: np.ndarray, i_embeds: np.ndarray, batch_size: int = 256
                 ) -> np.ndarray:
    """Match logits [N] of N (text, image) pairs (rows aligned), in fixed-shape chunks."""
    out = np.zeros(len(t_embeds), np.float32)
    for s in range(0, len(t_embeds), batch_size):
      n = min(batch_size, len(t_embeds) - s)
      pad = lambda x: np.concatenate([x, np.repeat(x[:1], batch_size - n, 0)]) if n < batch_size else x  # noqa: E731
      out[s:s + n] = np.asarray(self._itm(self.params, pad(t_embeds[s:s + n]), pad(t_mask[s:s + n]),
                                          pad(np.asarray(i_embeds[s:s + n], np.float32))))[:n]
    return out


def first_stage(enc: BagFormerEncoder, text: dict, image_feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(s_t2i [Nt, Ni], s_i2t [Ni, Nt]) for the encoder's interaction."""
  if enc.interaction == "cls_token":
    s = text["feat"] @ image_feats[:, 0].T
    return s, s.T.copy()
  s_t2i, s_i2t = late_interaction.first_stage_scores(text["feats"], image_feats)
  return np.asarray(s_t2i, np.float32), np.asarray(s_i2t, np.float32)


def rerank(enc: BagFormerEncoder, first: np.ndarray, text: dict, image_raw: np.ndarray, k: int, t2i: bool,
           progress: bool = False, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """(rank, merge) [rows, cols] for first-stage scores `first` (t2i: rows = queries; else images)."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  rows, cols = first.shape
  k = min(k, cols)
  top = np.argsort(-first, axis=1, kind="stable")[:, :k]  # ties: the lower index first
  rank = np.full(first.shape, OUTSIDE, np.float32)
  merge = np.full(first.shape, OUTSIDE, np.float32)
  per = max(1, chunk // k)  # rows per ITM call
  for r0 in tqdm(range(0, rows, per), desc="re-rank " + ("t2i" if t2i else "i2t"), unit="batch",
                 disable=not progress):
    rs = np.arange(r0, min(rows, r0 + per))
    rr = np.repeat(rs, k)
    cc = top[rs].reshape(-1)
    ti, ii = (rr, cc) if t2i else (cc, rr)
    score = enc.itm_scores(text["embeds"][ti], text["mask"][ti], np.asarray(image_raw[ii]), chunk)
    rank[rr, cc] = score
    merge[rr, cc] = score + first[rr, cc]
  return rank, merge


def _table(metrics: dict[str, float]) -> str:
  lines = ["MUGE text -> image      R@1     R@5    R@10  MeanRecall"]
  for name in SCORE_SETS:
    if f"{name}_img_r1" in metrics:
      v = [metrics[f"{name}_img_{k}"] for k in ("r1", "r5", "r10", "r_mean")]
      lines.append(f"{name + ' (' + _LABEL[name] + ')':<22}" + "".join(f"{x:8.2f}" for x in v[:3]) + f"{v[3]:12.2f}")
  return "\n".join(lines)


_LABEL = {"recall": "first stage", "rank": "ITM", "merge": "ITM + first"}


def evaluate_split(enc: BagFormerEncoder, split: muge.MugeSplit, *, k_test: int = 256, batch_size: int = 64,
                   out: pathlib.Path | None = None, directions: Sequence[str] = DIRECTIONS,
                   progress: bool = False) -> dict:
  """The seed's evaluation of one split. Returns {"metrics": flat floats (labelled splits), "table": str,
  "scores": {f"{set}_{dir}": matrix}}; writes results.json and the top-10 JSONL files under `out`."""
  bad = [d for d in directions if d not in DIRECTIONS]
  if bad or not directions:
    raise ValueError(f"directions must be a non-empty subset of {DIRECTIONS}, got {list(directions)}")
  texts = [q.text for q in split.queries]
  ids = list(split.images.ids)
  if not texts or not ids:
    raise ValueError(f"MUGE {split.split}: {len(texts)} queries, {len(ids)} pool images; nothing to evaluate")
  text = enc.encode_texts(texts, batch_size, progress)
  before = enc.inputs.bad_images
  image_raw, image_feats = enc.encode_images(split.images, ids, batch_size, progress, out)
  if (n_bad := enc.inputs.bad_images - before) and progress:
    print(f"note: {n_bad} pool images could not be decoded; scored as blank images", file=sys.stderr)
  s_t2i, s_i2t = first_stage(enc, text, image_feats)
  scores = {"recall_t2i": s_t2i, "recall_i2t": s_i2t}
  if "t2i" in directions:
    scores["rank_t2i"], scores["merge_t2i"] = rerank(enc, s_t2i, text, image_raw, k_test, True, progress)
  if "i2t" in directions:
    scores["rank_i2t"], scores["merge_i2t"] = rerank(enc, s_i2t, text, image_raw, k_test, False, progress)
  metrics: dict[str, float] = {}
  if split.split != "test":
    for name in SCORE_SETS:
      i2t, t2i = scores.get(f"{name}_i2t"), scores.get(f"{name}_t2i")
      if i2t is None or t2i is None:  # one direction only: fill the other with the first stage's
        i2t = i2t if i2t is not None else s_i2t
        t2i = t2i if t2i is not None else s_t2i
      for key, v in muge_metrics.itm_eval(i2t, t2i, split.txt2img, split.img2txt).items():
        metrics[f"{name}_{key}"] = float(v)
  result = {"metrics": metrics, "table": _table(metrics) if metrics else "", "scores": scores}
  if out is not None:
    out.mkdir(parents=True, exist_ok=True)
    qids = [q.query_id for q in split.queries]
    for name in SCORE_SETS:
      if f"{name}_t2i" in scores:
        preds = muge_metrics.t2i_predictions(scores[f"{name}_t2i"], qids, texts, ids, k=10)
        muge_metrics.write_predictions(out / f"{name}_t2i.jsonl", preds)
    (out / "results.json").write_text(json.dumps(
        {"split": split.split, "queries": len(texts), "pool": len(ids), "k_test": k_test,
         "interaction": enc.interaction, "bagging_mode": enc.inputs.bagger.mode, "metrics": metrics}, indent=1))
  return result


def t2i_rows(split: muge.MugeSplit, scores: np.ndarray, queries: Sequence[int] | int = 4, k: int = 5,
             label: str | None = None) -> list[dict]:
  """Rows for `viz.topk_rows`: per query (indices, or the first N), its text and the top-k pool images of a
  text -> image score matrix [Q, N] (ties: the lower pool row first), framed green / red by the labels
  (no frame colour on the unlabelled test split). `label` prefixes each query's title."""
  if isinstance(queries, int):
    queries = range(min(queries, len(split.queries)))
  labelled = split.split != "test"
  rows = []
  for q in queries:
    top = np.argsort(-scores[q], kind="stable")[:k]
    gold = set(split.txt2img[q]) if labelled else set()
    rows.append({"query": split.queries[q].text, "title": label,
                 "candidates": [split.images.load_at(int(r)) for r in top],
                 "scores": [float(scores[q, r]) for r in top], "names": [split.images.ids[int(r)] for r in top],
                 "relevant": [int(r) in gold for r in top] if labelled else None})
  return rows


def plot_t2i(split: muge.MugeSplit, scores: np.ndarray, path, queries: int = 4, k: int = 5) -> pathlib.Path:
  """A PNG of the first `queries` text queries' top-k images under `scores` (`t2i_rows`)."""
  from mmret_jax import viz  # pylint: disable=import-outside-toplevel
  return viz.save_png(viz.topk_rows(t2i_rows(split, scores, queries, k)), path)


def _evaluate(args) -> int:
  enc = BagFormerEncoder.from_dir(args.model, bagging_mode=args.bagging, dictionary=args.dictionary)
  split = muge.MugeSplit(pathlib.Path(args.muge_root), args.split)  # logs what it skipped
  out = pathlib.Path(args.out)
  result = evaluate_split(enc, split, k_test=args.k_test, batch_size=args.batch_size, out=out,
                          directions=[d for d in args.directions.split(",") if d], progress=not args.quiet)
  if result["table"]:
    print(result["table"])
  print(f"wrote {out / 'results.json'} and the top-10 files {', '.join(f'{s}_t2i.jsonl' for s in SCORE_SETS)}")
  if args.plot:
    name = "merge_t2i" if "merge_t2i" in result["scores"] else "recall_t2i"  # i2t only: no t2i re-ranking
    path = plot_t2i(split, result["scores"][name], args.plot, args.plot_queries)
    print(f"wrote {path} (the {name} top-5 of the first {min(args.plot_queries, len(split.queries))} queries)")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  ap = cli.ArgumentParser(prog="python -m mmret_jax.eval.bagformer",
                          description="BagFormer on MUGE: first-stage late interaction, ITM re-ranking, recall.")
  ap.add_argument("--model", required=True, help="a training workdir or a converted BagFormer dir")
  ap.add_argument("--muge-root", required=True, help="the dir with MR_{split}_queries.jsonl and MR_{split}_imgs.tsv")
  ap.add_argument("--split", default="valid", choices=("train", "valid", "test"))
  ap.add_argument("--out", required=True, help="output dir (results.json, *_t2i.jsonl)")
  ap.add_argument("--k-test", type=int, default=256, help="re-ranking depth (the seed's k_test)")
  ap.add_argument("--batch-size", type=int, default=64, help="encoding batch (bags are formed per batch, 64 as the seed)")
  ap.add_argument("--directions", default="t2i,i2t", help="t2i,i2t | t2i (MUGE's figure is t2i)")
  ap.add_argument("--bagging", choices=bagging.MODES, default=None, help="override the model's bagging mode")
  ap.add_argument("--dictionary", default=None, help="entity dictionary (default: the one in --model)")
  ap.add_argument("--quiet", action="store_true", help="no progress bars")
  ap.add_argument("--plot", default=None, metavar="PATH.png",
                  help="also save a PNG of the re-ranked top-5 images of the first --plot-queries queries")
  ap.add_argument("--plot-queries", type=int, default=4, metavar="N", help="queries drawn by --plot")
  args = ap.parse_args(argv)
  if args.k_test < 1:
    ap.error("--k-test must be >= 1")
  if args.plot is not None and not args.plot.lower().endswith(".png"):
    ap.error(f"--plot writes a PNG: give a path ending in .png, got {args.plot}")
  if args.plot_queries < 1:
    ap.error("--plot-queries must be >= 1")
  return cli.run(lambda: _evaluate(args))


if __name__ == "__main__":
  sys.exit(main())
