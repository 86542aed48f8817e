"""Composed image retrieval metrics (FashionIQ, CIRR) and CIRR test-server submission files.

Bi-BLIP4CIR (Liu et al., WACV 2024) evaluation as in the seed `Cuberick-Orion/Bi-Blip4CIR`:
`src/validate.py` (`compute_fiq_val_metrics`, `compute_cirr_val_metrics`), the result dicts of
`src/clip_fine_tune.py` / `src/combiner_train.py`, and `src/cirr_test_submission.py`
(`generate_cirr_test_dicts`, `generate_cirr_test_submissions`).

* Scores are cosine similarities: query and gallery features are L2-normalised here. Rankings are
  exact (`mmret_jax.eval.retrieval.search`), ties broken by the lower gallery index (the seed's
  `torch.argsort` leaves the order of ties unspecified).
* Recalls are percentages in float64 (the seed divides in float32 first, so its values can differ
  in the 6th significant digit). Result keys are the seed's log names.
* CIRR ranks the whole gallery and removes the reference (N - 1 entries); Recall_subset keeps the
  query's `img_set.members` in that order. Both come from one full ranking per query (`search`
  with k = N), so the subset order always agrees with the global order.

Shapes: Q queries, N gallery images, D feature dim.

Command line: `python -m mmret_jax.eval.cir --model WORKDIR --dataset cirr|fashioniq [--output m.json]
[--plot top5.png [--plot-queries N]]` prints the table (`format_table`); `--plot` also saves the top-5 gallery
images of the first N queries, the target framed green (`topk_rows`, `plot_topk`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import statistics
from collections.abc import Mapping, Sequence

import numpy as np

from mmret_jax.eval.retrieval import search

FIQ_KS = (10, 50)
CIRR_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
CIRR_HEADLINE = "mean(R@5+R_s@1)"  # the seed's selection metric for CIRR
CIRR_VERSION = "rc2"
SUBMISSION_DEPTH = 50  # names per query in the "recall" file
SUBSET_SUBMISSION_DEPTH = 3  # names per query in the "recall_subset" file
MAX_SUBMISSION_BYTES = 5 * 1024 * 1024  # the CIRR test server's upload limit


def _name_index(names: Sequence[str]) -> dict[str, int]:
  """Gallery name -> position; duplicates are an error (a name must identify one image)."""
  index = {}
  for i, n in enumerate(names):
    if n in index:
      raise ValueError(f"gallery name {n!r} appears twice (positions {index[n]} and {i}); "
                       "index_names must be unique")
    index[n] = i
  return index


def _positions(names: Sequence[str], index: Mapping[str, int], what: str) -> np.ndarray:
  missing = [n for n in names if n not in index]
  if missing:
    raise ValueError(f"{len(missing)} {what} names are not in the gallery (first: {missing[0]!r}); "
                     "pass the index_names of the same split")
  return np.fromiter((index[n] for n in names), np.int64, len(names))


def _check_lengths(query_features, index_features, index_names, **per_query) -> tuple[int, int]:
  q, n = np.shape(query_features)[0], np.shape(index_features)[0]
  if len(index_names) != n:
    raise ValueError(f"{len(index_names)} index_names for {n} index_features rows")
  for what, v in per_query.items():
    if len(v) != q:
      raise ValueError(f"{len(v)} {what} for {q} query_features rows")
  return q, n


def _percent(hits: np.ndarray) -> float:
  return 100.0 * float(np.count_nonzero(hits)) / max(len(hits), 1)


# ---------------------------------------------------------------------------
# FashionIQ
# ---------------------------------------------------------------------------
def fiq_recall(query_features: np.ndarray, index_features: np.ndarray, index_names: Sequence[str],
               target_names: Sequence[str], ks: Sequence[int] = FIQ_KS, *,
               use_faiss: bool = True) -> dict[str, float]:
  """FashionIQ Recall@K (percent) of one category (seed: `compute_fiq_val_metrics`).

  The reference image stays in the ranking, as in the seed's validation.

  Args:
    query_features: [Q, D] composed query features (normalised here).
    index_features: [N, D] gallery features of the category's split (normalised here).
    index_names: N unique gallery names.
    target_names: Q target names; each must be in the gallery (the seed asserts the same).
    ks: cutoffs; a cutoff above N counts the whole ranking.
    use_faiss: passed to `search`.

  Returns:
    {"recall_at<k>": percent of queries whose target is in the top k}.
  """
  _check_lengths(query_features, index_features, index_names, target_names=target_names)
  targets = _positions(target_names, _name_index(index_names), "target")
  _, top = search(query_features, index_features, max(ks), metric="cosine", use_faiss=use_faiss)
  hits = top == targets[:, None]
  return {f"recall_at{k}": _percent(hits[:, :k].any(1)) for k in ks}


def fiq_summary(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
  """Per-category recalls + the seed's averages, as one flat dict.

  Args:
    per_category: category -> `fiq_recall` output (with `recall_at10` and `recall_at50`).

  Returns:
    `<category>_recall_at<k>` for every entry, `average_recall_at10`, `average_recall_at50`
    (means over categories) and `average_recall` = (average@10 + average@50) / 2.
  """
  if not per_category:
    raise ValueError("fiq_summary needs at least one category")
  out = {f"{cat}_{key}": float(v) for cat, res in per_category.items() for key, v in res.items()}
  for k in FIQ_KS:
    out[f"average_recall_at{k}"] = statistics.fmean(r[f"recall_at{k}"] for r in per_category.values())
  out["average_recall"] = (out["average_recall_at10"] + out["average_recall_at50"]) / 2
  return out


# ---------------------------------------------------------------------------
# CIRR
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CIRRRankings:
  """Gallery positions, best first, with each query's reference removed.

  Attributes:
    top: [Q, min(depth, N - 1)] int64, the head of the full ranking without the reference.
    subset: [Q, M] int64, the query's members (minus the reference, each once) in ranking order,
      padded with -1 where a query has fewer than M.
  """
  top: np.ndarray
  subset: np.ndarray


def _member_positions(members: Sequence[Sequence[str]], refs: np.ndarray,
                      index: Mapping[str, int]) -> np.ndarray:
  """[Q, M] gallery positions of each query's distinct members other than the reference; -1 pad."""
  rows = []
  for q, group in enumerate(members):
    pos = _positions(list(group), index, "img_set member")
    _, first = np.unique(pos, return_index=True)
    pos = pos[np.sort(first)]
    rows.append(pos[pos != refs[q]])
  out = np.full((len(rows), max((len(r) for r in rows), default=0)), -1, np.int64)
  for q, r in enumerate(rows):
    out[q, :len(r)] = r
  return out


def cirr_rankings(query_features: np.ndarray, index_features: np.ndarray, index_names: Sequence[str],
                  reference_names: Sequence[str], members: Sequence[Sequence[str]],
                  depth: int = SUBMISSION_DEPTH, *, chunk: int = 1024,
                  use_faiss: bool = False) -> CIRRRankings:
  """Ranks the whole gallery per query, removes the reference, keeps the head and the subset.

  Exact: each chunk of queries gets its full ranking (`search(..., k=N, metric="cosine")`; the
  numpy path sorts faster than faiss at k = N, hence `use_faiss=False`), from which the top
  `depth` without the reference and the members' order are read (seed: `compute_cirr_val_metrics`,
  `generate_cirr_test_dicts`).

  Args:
    query_features: [Q, D]; index_features: [N, D] (both normalised here).
    index_names: N unique gallery names.
    reference_names: Q names, each in the gallery.
    members: Q groups (`img_set.members`); every member must be in the gallery.
    depth: ranking depth kept in `top` (clamped to N - 1).
    chunk: queries ranked at once (memory ~ 20 * chunk * N bytes).
    use_faiss: passed to `search`.
  """
  _, n = _check_lengths(query_features, index_features, index_names, reference_names=reference_names,
                        members=members)
  if n < 2:
    raise ValueError(f"CIRR ranking needs at least 2 gallery images, got {n}")
  index = _name_index(index_names)
  refs = _positions(reference_names, index, "reference")
  mem = _member_positions(members, refs, index)
  depth = min(int(depth), n - 1)
  query_features = np.asarray(query_features, np.float32)
  tops, subsets = [], []
  for q0 in range(0, len(refs), chunk):
    ref = refs[q0:q0 + chunk, None]
    _, order = search(query_features[q0:q0 + chunk], index_features, n, metric="cosine",
                      use_faiss=use_faiss, batch_size=chunk)
    head = order[:, :depth + 1]
    drop_last = np.argsort(head == ref, axis=1, kind="stable")[:, :depth]  # the reference sorts last
    tops.append(np.take_along_axis(head, drop_last, 1))
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(n, dtype=order.dtype)[None, :], 1)
    m = mem[q0:q0 + chunk]
    m_rank = np.where(m >= 0, np.take_along_axis(ranks, np.maximum(m, 0), 1), n)
    subsets.append(np.take_along_axis(m, np.argsort(m_rank, axis=1, kind="stable"), 1))
  if not tops:
    return CIRRRankings(np.zeros((0, depth), np.int64), np.zeros((0, mem.shape[1]), np.int64))
  return CIRRRankings(np.concatenate(tops), np.concatenate(subsets))


def cirr_summary(metrics: Mapping[str, float]) -> dict[str, float]:
  """The seed's CIRR selection numbers from `group_recall_at*` and `recall_at*` entries.

  `mean(R@5+R_s@1)` = (recall_at5 + group_recall_at1) / 2 (when both exist), and the
  arithmetic, harmonic and geometric means of all recall values (the seed's 7 numbers). Python's
  `statistics.geometric_mean` raises on a zero recall; here that mean is 0.0 instead.
  """
  values = [float(v) for k, v in metrics.items() if k.startswith(("recall_at", "group_recall_at"))]
  if not values:
    raise ValueError("cirr_summary needs recall_at<k> / group_recall_at<k> entries")
  out = {}
  if "recall_at5" in metrics and "group_recall_at1" in metrics:
    out[CIRR_HEADLINE] = (float(metrics["group_recall_at1"]) + float(metrics["recall_at5"])) / 2
  out["arithmetic_mean"] = statistics.fmean(values)
  out["harmonic_mean"] = statistics.harmonic_mean(values)
  out["geometric_mean"] = 0.0 if min(values) <= 0 else statistics.geometric_mean(values)
  return out


def cirr_recall(query_features: np.ndarray, index_features: np.ndarray, index_names: Sequence[str],
                reference_names: Sequence[str], target_names: Sequence[str],
                members: Sequence[Sequence[str]], ks: Sequence[int] = CIRR_KS,
                subset_ks: Sequence[int] = CIRR_SUBSET_KS, **rank_kwargs) -> dict[str, float]:
  """CIRR Recall@K and Recall_subset@K in percent, plus `cirr_summary` (seed's result dict).

  Recall@K: target within the first K of the ranking without the reference. Recall_subset@K:
  target within the first K of the members (reference removed) in ranking order. Every target
  must be in the gallery, differ from its reference and be one of its members (the seed asserts
  one hit per query for both).

  Returns:
    `group_recall_at<k>` for `subset_ks`, `recall_at<k>` for `ks`, then `cirr_summary` keys.
  """
  _check_lengths(query_features, index_features, index_names, target_names=target_names)
  index = _name_index(index_names)
  targets = _positions(target_names, index, "target")
  same = [q for q, (r, t) in enumerate(zip(reference_names, target_names)) if r == t]
  if same:
    raise ValueError(f"{len(same)} queries have target == reference (first: query {same[0]})")
  ranked = cirr_rankings(query_features, index_features, index_names, reference_names, members,
                         max(ks), **rank_kwargs)
  in_group = (ranked.subset == targets[:, None]).any(1)
  if not in_group.all():
    q = int(np.argmin(in_group))
    raise ValueError(f"{int((~in_group).sum())} targets are not among their query's img_set members "
                     f"(first: query {q}, target {target_names[q]!r})")
  out = {f"group_recall_at{k}": _percent((ranked.subset[:, :k] == targets[:, None]).any(1))
         for k in subset_ks}
  out.update({f"recall_at{k}": _percent((ranked.top[:, :k] == targets[:, None]).any(1)) for k in ks})
  out.update(cirr_summary(out))
  return out


# ---------------------------------------------------------------------------
# CIRR test submission
# ---------------------------------------------------------------------------
def cirr_submission(pair_ids: Sequence[int], query_features: np.ndarray, index_features: np.ndarray,
                    index_names: Sequence[str], reference_names: Sequence[str],
                    members: Sequence[Sequence[str]], **rank_kwargs) -> tuple[dict, dict]:
  """The two test-server dicts (seed: `generate_cirr_test_dicts` + the two header entries).

  Returns:
    (recall, recall_subset): `{"version": "rc2", "metric": "recall", str(pairid): top 50 names}`
    and `{"version": "rc2", "metric": "recall_subset", str(pairid): top 3 member names}`, all
    rankings without the query's reference.
  """
  keys = [str(int(p)) for p in pair_ids]
  if len(set(keys)) != len(keys):
    raise ValueError("pair_ids must be unique")
  _check_lengths(query_features, index_features, index_names, pair_ids=keys)
  ranked = cirr_rankings(query_features, index_features, index_names, reference_names, members,
                         SUBMISSION_DEPTH, **rank_kwargs)
  names = np.asarray(index_names, dtype=object)
  recall = {"version": CIRR_VERSION, "metric": "recall"}
  subset = {"version": CIRR_VERSION, "metric": "recall_subset"}
  for key, top, group in zip(keys, ranked.top, ranked.subset):
    recall[key] = names[top].tolist()
    group = group[:SUBSET_SUBMISSION_DEPTH]
    subset[key] = names[group[group >= 0]].tolist()
  return recall, subset


def write_cirr_submission(out_dir: str | os.PathLike, name: str, recall: Mapping,
                          recall_subset: Mapping) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes `recall_submission_<name>.json` and `recall_subset_submission_<name>.json`.

  Same JSON as the seed (`json.dump(..., sort_keys=True)`, default separators). Returns the paths.
  """
  if not name or any(c in name for c in "/\\") or name in (".", ".."):
    raise ValueError(f"submission name must be a plain file-name part, got {name!r}")
  for d, metric in ((recall, "recall"), (recall_subset, "recall_subset")):
    if d.get("metric") != metric or d.get("version") != CIRR_VERSION:
      raise ValueError(f"expected a dict with version {CIRR_VERSION!r} and metric {metric!r}, got "
                       f"version {d.get('version')!r}, metric {d.get('metric')!r}")
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = (out_dir / f"recall_submission_{name}.json", out_dir / f"recall_subset_submission_{name}.json")
  for path, d in zip(paths, (recall, recall_subset)):
    with open(path, "w", encoding="utf-8") as f:
      json.dump(d, f, sort_keys=True)
  return paths


def validate_cirr_submission(recall: Mapping, recall_subset: Mapping, pair_ids: Sequence[int],
                             reference_names: Sequence[str], members: Sequence[Sequence[str]],
                             index_names: Sequence[str] | None = None,
                             max_report: int = 10) -> list[str]:
  """Checks the two submission dicts against the test queries; returns problems ([] = valid).

  Checks: headers (version rc2, metrics "recall" / "recall_subset"); exactly the queries' pair
  ids; "recall" lists of 50 distinct names (min(50, N - 1) when `index_names` is given) without
  the reference and, given `index_names`, all in the gallery; "recall_subset" lists of 3 distinct
  members of the query's img_set other than the reference; each dict under the 5 MiB upload limit
  as `json.dumps(..., sort_keys=True)`. At most `max_report` problems per check are listed.
  """
  problems: list[str] = []
  depth = SUBMISSION_DEPTH if index_names is None else min(SUBMISSION_DEPTH, len(index_names) - 1)
  gallery = None if index_names is None else set(index_names)
  queries = {str(int(p)): (r, set(m)) for p, r, m in zip(pair_ids, reference_names, members)}
  for label, d, metric in (("recall", recall, "recall"), ("recall_subset", recall_subset, "recall_subset")):
    if d.get("version") != CIRR_VERSION or d.get("metric") != metric:
      problems.append(f"{label}: header is version={d.get('version')!r} metric={d.get('metric')!r}, "
                      f"expected {CIRR_VERSION!r} / {metric!r}")
    keys = set(d) - {"version", "metric"}
    missing, extra = sorted(set(queries) - keys), sorted(keys - set(queries))
    if missing:
      problems.append(f"{label}: {len(missing)} pair ids missing (first: {missing[0]})")
    if extra:
      problems.append(f"{label}: {len(extra)} unknown pair ids (first: {extra[0]})")
    size = len(json.dumps(d, sort_keys=True).encode("utf-8"))
    if size > MAX_SUBMISSION_BYTES:
      problems.append(f"{label}: {size} bytes as JSON, over the server's {MAX_SUBMISSION_BYTES}")
    bad = []
    for key in sorted(keys & set(queries)):
      ref, group = queries[key]
      names = d[key]
      if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        bad.append(f"{key}: not a list of names")
        continue
      want = depth if metric == "recall" else SUBSET_SUBMISSION_DEPTH
      if len(names) != want or len(set(names)) != len(names):
        bad.append(f"{key}: {len(names)} names ({len(set(names))} distinct), expected {want} distinct")
      if ref in names:
        bad.append(f"{key}: contains the reference {ref!r}")
      if metric == "recall" and gallery is not None and not gallery.issuperset(names):
        bad.append(f"{key}: names outside the gallery")
      if metric == "recall_subset" and not group.issuperset(names):
        bad.append(f"{key}: names outside the img_set members")
    problems.extend(f"{label}: {b}" for b in bad[:max_report])
    if len(bad) > max_report:
      problems.append(f"{label}: ... {len(bad) - max_report} more")
  return problems


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------
def format_table(metrics: Mapping[str, float]) -> str:
  """A printed table of FashionIQ (per category + average) or CIRR (recall + subset recall) results."""
  if "average_recall" in metrics:
    cats = [k[:-len("_recall_at10")] for k in metrics if k.endswith("_recall_at10") and not k.startswith("average")]
    lines = [f"{'FashionIQ':<10} {'R@10':>7} {'R@50':>7}"]
    lines += [f"{c:<10} {metrics[f'{c}_recall_at10']:7.2f} {metrics[f'{c}_recall_at50']:7.2f}" for c in cats]
    lines.append(f"{'average':<10} {metrics['average_recall_at10']:7.2f} {metrics['average_recall_at50']:7.2f}"
                 f"   (R@10 + R@50) / 2 = {metrics['average_recall']:.2f}")
    return "\n".join(lines)
  keys = [f"recall_at{k}" for k in CIRR_KS] + [f"group_recall_at{k}" for k in CIRR_SUBSET_KS]
  heads = [f"R@{k}" for k in CIRR_KS] + [f"Rs@{k}" for k in CIRR_SUBSET_KS] + ["(R@5+Rs@1)/2"]
  mean = metrics.get("recall_mean", metrics.get(CIRR_HEADLINE, float("nan")))
  vals = [metrics.get(k, float("nan")) for k in keys] + [mean]
  return "CIRR  " + " ".join(f"{h:>8}" for h in heads) + "\n      " + " ".join(f"{v:8.2f}" for v in vals)


# ---------------------------------------------------------------------------
# A loaded model and the command line
# ---------------------------------------------------------------------------
class CirModel:
  """A composed-retrieval model for inference: a stage-I or stage-II training workdir (its `model/`
  with `cir.json`, and `combiner/` after stage II), or a converted / Hugging Face BLIP dir (zero-shot:
  element-wise-sum fusion, targetpad 1.25 at the model's image size, 77 tokens, the seed's prompts)."""

  def __init__(self, path: str | os.PathLike, dtype: str = "float32"):
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from mmret_jax import convert  # pylint: disable=import-outside-toplevel
    from mmret_jax.convert.core import load_params  # pylint: disable=import-outside-toplevel
    from mmret_jax.data import image as image_lib  # pylint: disable=import-outside-toplevel
    from mmret_jax.models import blip, combiner  # pylint: disable=import-outside-toplevel
    from mmret_jax.tasks import cir as cir_task  # pylint: disable=import-outside-toplevel
    path = pathlib.Path(path)
    if not path.exists():
      raise FileNotFoundError(f"model not found: {path}")
    if (path / "model").is_dir() and not convert.is_converted_dir(path):
      path = path / "model"  # a training workdir
    info_file = path / cir_task.CIR_FILE
    self.info = json.loads(info_file.read_text()) if info_file.exists() else {
        "stage": 0, "fusion": "sum", "image": {"size": 0, "transform": "targetpad", "target_ratio": 1.25},
        "max_length": 77, "prompt_quirk": True}
    self.config, params, meta, _ = cir_task.load_blip(path, int(self.info["image"]["size"] or 384))
    self.tokenizer = cir_task.blip_tokenizer(path)
    img = self.info["image"]
    self.image_config = image_lib.ImageConfig.clip_default(
        int(img["size"] or self.config.vision.image_size), pad_mode=img["transform"],
        target_ratio=float(img["target_ratio"]), crop_offsets="torchvision", alpha="drop")
    self.vision = blip.BlipRetrieval(self.config, add_itm_head=bool(meta.get("itm_head", True)), dtype=jnp.dtype(dtype))
    self.tower = blip.BlipTextTower(self.config, dtype=jnp.dtype(dtype))
    self.vision_params = {k: params[k] for k in ("vision_model", "vision_proj")}
    self.text_params = {"text_encoder": cir_task._drop_cross_attention(params["text_encoder"]),  # pylint: disable=protected-access
                        "text_proj": params["text_proj"]}
    self.path, self.fusion, self._fns = path, self.info["fusion"], {}
    if self.fusion == "combiner":
      self.combiner = combiner.Combiner(combiner.CombinerConfig(**self.info["combiner"]), dtype=jnp.dtype(dtype))
      self.combiner_params = load_params(path / cir_task.COMBINER_DIR)

  def image_features(self, paths: Sequence[str], *, mesh=None, cache_root=None, batch_size: int = 32,
                     kind: str = "eval-image", log=print) -> tuple[np.ndarray, np.ndarray]:
    """Raw image features and readability flags of `paths`, cached under `cache_root`."""
    import dataclasses as dc  # pylint: disable=import-outside-toplevel
    from mmret_jax import storage  # pylint: disable=import-outside-toplevel
    from mmret_jax.data import feature_cache  # pylint: disable=import-outside-toplevel
    from mmret_jax.tasks import cir as cir_task  # pylint: disable=import-outside-toplevel
    from mmret_jax.train import partitioning  # pylint: disable=import-outside-toplevel
    mesh = mesh or partitioning.make_mesh({"data": -1})
    desc = {"weights": feature_cache.params_digest(self.vision_params), "model": self.config.vision.to_dict(),
            "image": dc.asdict(self.image_config), "dtype": str(self.vision.dtype),
            "files": feature_cache.files_fingerprint(paths)}
    root = pathlib.Path(cache_root) if cache_root else storage.CACHE_DIR.parent / "features"
    feats, ok, _ = feature_cache.cached_features(
        root, kind, desc, [str(p) for p in paths],
        lambda: cir_task.extract_image_features(self.vision, self.vision_params, list(map(str, paths)),
                                                self.image_config, mesh, batch_size, log=log), log=log)
    return feats, ok

  def query_features(self, ref_features: np.ndarray, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Composed queries from raw reference features and (prompted) texts."""
    import jax  # pylint: disable=import-outside-toplevel
    from mmret_jax import losses  # pylint: disable=import-outside-toplevel
    from mmret_jax.tasks import cir as cir_task  # pylint: disable=import-outside-toplevel
    txt = cir_task.encode_texts(self.tower, self.text_params, self.tokenizer, texts, int(self.info["max_length"]),
                                batch_size, self._fns)
    if self.fusion == "sum":
      return np.asarray(losses.element_wise_sum(ref_features, txt))
    if "combine" not in self._fns:
      self._fns["combine"] = jax.jit(lambda p, i, t: self.combiner.apply({"params": p}, i, t))
    return np.asarray(self._fns["combine"](self.combiner_params, ref_features, txt))

  def texts(self, queries) -> list[str]:
    from mmret_jax.data.sources import cir as cir_data  # pylint: disable=import-outside-toplevel
    return [cir_data.eval_text(q, bool(self.info.get("prompt_quirk", True))) for q in queries]


def _dataset_args(ap) -> None:
  ap.add_argument("--model", required=True, help="stage-I / stage-II workdir, or a converted / HF BLIP dir "
                                                 "(zero-shot, element-wise sum)")
  ap.add_argument("--data-root", default="", help="dataset root in the official layout (default: the bundled "
                                                  "real annotations, which need --image-root or --synthetic-images)")
  ap.add_argument("--image-root", default="", help="where the images are (default: FashionIQ: DATA_ROOT; CIRR: "
                                                   "the folder holding cirr/)")
  ap.add_argument("--synthetic-images", action="store_true",
                  help="write generated images for missing files first (demos and tests; never real numbers)")
  ap.add_argument("--feature-cache", default="", help="image feature cache dir (default ~/.cache/mmret_jax/features)")
  ap.add_argument("--batch-size", type=int, default=32, help="images / texts per batch")
  ap.add_argument("--max-queries", type=int, default=0, help="evaluate the first N queries only (0 = all)")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")


def _load_data(args, dataset: str, split: str):
  from mmret_jax import storage  # pylint: disable=import-outside-toplevel
  from mmret_jax.data.sources import cir as cir_data  # pylint: disable=import-outside-toplevel
  root = args.data_root or cir_data.sample_root(dataset)
  image_root = args.image_root or None
  if image_root is None and args.synthetic_images:
    image_root = storage.CACHE_DIR.parent / "cir_synthetic" / dataset
  elif image_root is None and not args.data_root:
    raise ValueError("the bundled annotations have no images: pass --data-root (the dataset) or --image-root, "
                     "or --synthetic-images for a demo")
  kw = {"categories": tuple(args.categories.split(","))} if dataset == "fashioniq" and getattr(
      args, "categories", "") else {}
  data = cir_data.load(dataset, root, split=split, image_root=image_root, **kw)
  if args.max_queries > 0:
    data.queries = data.queries[:args.max_queries]
  if args.synthetic_images:
    from mmret_jax.data.samples import make_cir_images  # pylint: disable=import-outside-toplevel
    make_cir_images.write_synthetic_images(data)
  return data


def features_for(model: CirModel, data, args, log) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
  """({name: row}, raw features, ok) of every image the split's queries and galleries use."""
  names = sorted({n for g in data.eval_groups() for n in g.index_names} | {q.reference for q in data.queries})
  paths = [str(data.image_path(n)) for n in names]
  feats, ok = model.image_features(paths, cache_root=args.feature_cache or None, batch_size=args.batch_size,
                                   kind=f"{data.dataset}-{data.split}-image", log=log)
  return {n: i for i, n in enumerate(names)}, feats, ok


PLOT_TOP = 5  # gallery images drawn per query by --plot


def topk_rows(data, model: CirModel, feats: np.ndarray, index: Mapping[str, int], ok: np.ndarray,
              queries: int = 4, k: int = PLOT_TOP, batch_size: int = 32) -> list[dict]:
  """`mmret_jax.viz.topk_rows` rows of the first `queries` evaluable queries: (reference image, caption), then
  the top-k gallery images of the query's eval group, ranked as the metrics rank them (CIRR: the reference
  removed), the target framed green; the query's title gives the target's rank (`target #r`).

  Args:
    data: the loaded split (`cir_data.load`); model: the `CirModel` whose features these are.
    feats: raw image features, a row per name of `index`; ok: their readability flags.
  """
  from mmret_jax.data.sources import cir as cir_data  # pylint: disable=import-outside-toplevel
  readable = lambda n: n in index and bool(ok[index[n]])
  rows = []
  for group in data.eval_groups():
    if len(rows) >= queries:
      break
    gallery = [n for n in group.index_names if readable(n)]
    names = set(gallery)
    qs = [q for q in group.queries if readable(q.reference) and q.target in names][:queries - len(rows)]
    if not qs:
      continue
    qf = model.query_features(feats[[index[q.reference] for q in qs]], model.texts(qs), batch_size)
    gf = feats[[index[n] for n in gallery]].astype(np.float32)
    qn = qf / np.maximum(np.linalg.norm(qf, axis=1, keepdims=True), 1e-12)
    scores = qn @ (gf / np.maximum(np.linalg.norm(gf, axis=1, keepdims=True), 1e-12)).T  # cosine, [q, N]
    if data.dataset == "cirr":
      members = [[m for m in q.members if m in names] for q in qs]  # only the top is drawn
      top = cirr_rankings(qf, gf, gallery, [q.reference for q in qs], members, k).top
    else:
      top = search(qf, gf, min(k, len(gallery)), metric="cosine")[1]
    pos = {n: i for i, n in enumerate(gallery)}
    for r, q in enumerate(qs):
      s = scores[r].copy()
      if data.dataset == "cirr":
        s[pos[q.reference]] = -np.inf  # not ranked
      rank = 1 + int(np.count_nonzero(s > s[pos[q.target]]))
      cand = [gallery[j] for j in top[r]]
      rows.append({"query": (str(data.image_path(q.reference)), cir_data.query_text(q, None)),
                   "title": (f"{group.name}, " if data.dataset == "fashioniq" else "") + f"target #{rank}",
                   "candidates": [str(data.image_path(n)) for n in cand],
                   "scores": [float(scores[r, j]) for j in top[r]], "relevant": [n == q.target for n in cand]})
  return rows


def plot_topk(rows: Sequence[Mapping], path: str | os.PathLike) -> pathlib.Path:
  """Draws `topk_rows` output (`mmret_jax.viz.topk_rows`) and saves it as a PNG; returns the path."""
  from mmret_jax import viz  # pylint: disable=import-outside-toplevel
  if not rows:
    raise ValueError("--plot: no query with readable reference and target images to draw")
  return viz.save_png(viz.topk_rows(rows), path)


def main(argv: Sequence[str] | None = None) -> int:
  from mmret_jax import cli  # pylint: disable=import-outside-toplevel
  ap = cli.ArgumentParser(prog="python -m mmret_jax.eval.cir",
                          description="Evaluate a composed image retrieval model on FashionIQ or CIRR (val).")
  _dataset_args(ap)
  ap.add_argument("--dataset", required=True, choices=("cirr", "fashioniq"))
  ap.add_argument("--split", default="val", help="annotation split with targets (val)")
  ap.add_argument("--categories", default="dress,shirt,toptee", help="FashionIQ categories")
  ap.add_argument("--output", default="", help="also write the metrics as JSON here")
  ap.add_argument("--plot", default=None, metavar="PATH.png",
                  help=f"also save a PNG of the top-{PLOT_TOP} gallery images of the first --plot-queries queries "
                       "(target framed green)")
  ap.add_argument("--plot-queries", type=int, default=4, metavar="N", help="queries drawn by --plot")
  args = ap.parse_args(argv)
  if args.plot is not None and pathlib.Path(args.plot).suffix.lower() != ".png":
    ap.error(f"--plot writes a PNG: give a path ending in .png, got {args.plot}")
  if args.plot_queries < 1:
    ap.error("--plot-queries must be >= 1")
  return cli.run(lambda: _evaluate(args))


def _evaluate(args) -> int:
  import sys  # pylint: disable=import-outside-toplevel
  from mmret_jax.tasks import cir as cir_task  # pylint: disable=import-outside-toplevel
  log = lambda s: print(s, file=sys.stderr)
  data = _load_data(args, args.dataset, args.split)
  if any(q.target is None for q in data.queries):
    raise ValueError(f"{args.dataset} {args.split} has no targets; use the val split (CIRR test1: "
                     "python -m mmret_jax.eval.cir_submission)")
  model = CirModel(args.model, args.dtype)
  index, feats, ok = features_for(model, data, args, log)
  metrics = cir_task.evaluate_cir(
      data, lambda qs: model.query_features(feats[[index[q.reference] for q in qs]], model.texts(qs), args.batch_size),
      lambda n: n in index and bool(ok[index[n]]), lambda names: feats[[index[n] for n in names]])
  print(format_table(metrics))
  if metrics.get("queries_skipped") or metrics.get("images_skipped"):
    print(f"skipped: {int(metrics['queries_skipped'])} queries, {int(metrics['images_skipped'])} gallery images "
          "(missing or unreadable images)")
  if args.output:
    pathlib.Path(args.output).write_text(json.dumps(metrics, indent=1, sort_keys=True))
  if args.plot:
    rows = topk_rows(data, model, feats, index, ok, args.plot_queries, PLOT_TOP, args.batch_size)
    path = plot_topk(rows, args.plot)
    log(f"wrote {path} (the top-{PLOT_TOP} of the first {len(rows)} queries)")
  return 0


if __name__ == "__main__":
  import sys  # pylint: disable=ungrouped-imports
  sys.exit(main())
