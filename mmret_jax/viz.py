"""Pictures of results, for the notebooks and the eval CLIs' `--plot`: image grids of retrieved candidates (images or
texts, framed green / red by relevance), loss curves from `metrics.jsonl`, similarity heatmaps and highlighted token
spans (BagFormer's entity bags). matplotlib only; the Agg backend when there is no display (CLIs, CI), the notebook's
own backend inside Jupyter.

Every function returns a `matplotlib.figure.Figure`; `save_png(fig, path)` writes it and closes it. Images may be
paths, PIL images or arrays [H, W, 3] (uint8, or float in [0, 1] / a normalised model input, rescaled per image);
an unreadable or missing image becomes a grey tile that says so (counted in the figure's `viz_missing` attribute),
never an exception in the middle of a plot.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import textwrap
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

GOOD, BAD, NEUTRAL = "#2ca02c", "#d62728", "#7f7f7f"
_TILE = 224  # images are drawn at most this many pixels on a side


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  if "ipykernel" not in sys.modules and not os.environ.get("DISPLAY") and not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


_CJK_NAMES = ("Noto Sans CJK", "Noto Serif CJK", "Noto Sans SC", "WenQuanYi", "SimHei", "Microsoft YaHei",
              "PingFang", "Heiti", "Source Han Sans", "AR PL")


def cjk_font() -> str | None:
  """The family name of an installed font with Chinese glyphs (Debian / Colab: `apt install fonts-noto-cjk`), or
  None. Text with CJK characters is drawn in it; without one, those characters show as empty boxes."""
  from matplotlib import font_manager  # pylint: disable=import-outside-toplevel
  for f in font_manager.fontManager.ttflist:
    if any(name.lower() in f.name.lower() for name in _CJK_NAMES):
      return f.name
  return None


def _has_cjk(texts: Iterable[str]) -> bool:
  return any("\u2e80" <= ch <= "\uffef" for t in texts for ch in str(t))


def _text_font(texts: Iterable[str]) -> dict[str, Any]:
  """fontfamily kwargs for texts with CJK characters (a CJK font when one is installed)."""
  if not _has_cjk(texts):
    return {}
  name = cjk_font()
  return {"fontfamily": name} if name else {}


def as_image(item: Any, size: int = _TILE) -> np.ndarray | None:
  """uint8 [H, W, 3] (longest side <= size) of a path / PIL image / array, or None if it cannot be read."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    if isinstance(item, (str, os.PathLike)):
      with Image.open(item) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        return np.asarray(im)
    if isinstance(item, Image.Image):
      im = item.convert("RGB")
      im.thumbnail((size, size))
      return np.asarray(im)
    a = np.asarray(item)
  except (OSError, ValueError):
    return None
  if a.ndim == 4 and a.shape[0] == 1:
    a = a[0]
  if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):  # CHW
    a = np.moveaxis(a, 0, -1)
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or a.shape[-1] not in (1, 3) or a.size == 0:
    return None
  if a.shape[-1] == 1:
    a = np.repeat(a, 3, axis=-1)
  if a.dtype != np.uint8:  # float: [0, 1] as is, anything else (a normalised model input) min-max rescaled
    a = a.astype(np.float32)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if lo < 0.0 or hi > 1.0:
      a = (a - lo) / max(hi - lo, 1e-8)
    a = (np.clip(np.nan_to_num(a), 0.0, 1.0) * 255).round().astype(np.uint8)
  return a


def _is_image_like(item: Any) -> bool:
  if isinstance(item, str):
    return pathlib.Path(item).suffix.lower() in (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
  return item is not None


def _draw_cell(ax, item: Any, title: str | None, mark: bool | None, wrap: int) -> bool:
  """One tile: an image, or a text in a box. Returns False when an image could not be read."""
  ok = True
  ax.set_xticks([])
  ax.set_yticks([])
  if isinstance(item, str) and not _is_image_like(item):
    ax.text(0.5, 0.5, textwrap.fill(item, wrap), ha="center", va="center", fontsize=8, wrap=True,
            transform=ax.transAxes, **_text_font([item]))
    ax.set_facecolor("#f4f4f4")
  else:
    img = as_image(item)
    if img is None:
      ok = False
      ax.set_facecolor("#cccccc")
      name = pathlib.Path(item).name if isinstance(item, (str, os.PathLike)) else type(item).__name__
      ax.text(0.5, 0.5, f"missing image\n{name}", ha="center", va="center", fontsize=8, transform=ax.transAxes)
    else:
      ax.imshow(img)
  if title:
    # wrapped to the tile's width (at most 3 lines), so long captions never run off the figure
    ax.set_title(textwrap.fill(textwrap.shorten(title, 3 * wrap, placeholder="..."), wrap), fontsize=8,
                 **_text_font([title]))
  color = NEUTRAL if mark is None else (GOOD if mark else BAD)
  for side in ax.spines.values():
    side.set_edgecolor(color)
    side.set_linewidth(1 if mark is None else 4)
  return ok


def image_grid(items: Sequence[Any], *, titles: Sequence[str | None] | None = None,
               marks: Sequence[bool | None] | None = None, ncols: int = 5, cell: float = 2.3,
               suptitle: str | None = None, wrap: int = 28):
  """A grid of images and / or texts (a str that is not an image path is drawn as text).

  titles: one per item (scores, ids); marks: True (green frame: relevant), False (red) or None per item."""
  n = len(items)
  if n == 0:
    raise ValueError("image_grid: no items to draw")
  if ncols < 1:
    raise ValueError(f"image_grid: ncols must be >= 1, got {ncols}")
  for name, seq in (("titles", titles), ("marks", marks)):
    if seq is not None and len(seq) != n:
      raise ValueError(f"image_grid: {len(seq)} {name} for {n} items")
  plt = _pyplot()
  cols = min(ncols, n)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, cell * rows + (0.4 if suptitle else 0)), squeeze=False)
  missing = 0
  for i, ax in enumerate(axes.flat):
    if i >= n:
      ax.axis("off")
      continue
    if not _draw_cell(ax, items[i], titles[i] if titles else None, marks[i] if marks else None, wrap):
      missing += 1
  if suptitle:
    fig.suptitle(suptitle, fontsize=10)
  _quiet_tight_layout(fig)
  fig.viz_missing = missing
  return fig


def topk_rows(queries: Sequence[Mapping[str, Any]], *, k: int | None = None, cell: float = 2.3, wrap: int = 28):
  """One row per query: the query (its image and / or text) then its top-k candidates.

  Each query is a dict: `query` (an image, a text, or a tuple (image, text) drawn as the image titled by the
  text), `title` (optional), `candidates` (images or texts, best first), `scores` (optional floats),
  `relevant` (optional bools, frame colours), `names` (optional candidate ids)."""
  if not queries:
    raise ValueError("topk_rows: no queries to draw")
  width = max(len(q["candidates"][:k]) for q in queries) + 1
  plt = _pyplot()
  fig, axes = plt.subplots(len(queries), width, figsize=(cell * width, cell * len(queries)), squeeze=False)
  missing = 0
  for r, q in enumerate(queries):
    cands = list(q["candidates"][:k])
    query = q["query"]
    qtitle = q.get("title")
    if isinstance(query, tuple):  # (reference image, modification text): the image titled by the text
      query, text = query
      qtitle = text if qtitle is None else f"{qtitle}: {text}"
    if not _draw_cell(axes[r, 0], query, qtitle, None, wrap):
      missing += 1
    axes[r, 0].set_ylabel("query", fontsize=8)
    scores, rel, names = q.get("scores"), q.get("relevant"), q.get("names")
    for j in range(1, width):
      ax = axes[r, j]
      if j - 1 >= len(cands):
        ax.axis("off")
        continue
      parts = [f"#{j}"]
      if names is not None:
        parts.append(str(names[j - 1]))
      if scores is not None:
        parts.append(f"{float(scores[j - 1]):.3f}")
      mark = None if rel is None else bool(rel[j - 1])
      if not _draw_cell(ax, cands[j - 1], " ".join(parts), mark, wrap):
        missing += 1
  _quiet_tight_layout(fig)
  fig.viz_missing = missing
  return fig


def read_metrics(source: str | os.PathLike | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Rows of a run's `metrics.jsonl` (a workdir, the file, or rows already read). Malformed lines are an error
  naming the line."""
  if not isinstance(source, (str, os.PathLike)):
    return [dict(r) for r in source]
  path = pathlib.Path(source)
  if path.is_dir():
    path = path / "metrics.jsonl"
  if not path.is_file():
    raise FileNotFoundError(f"no metrics file: {path}")
  rows = []
  for i, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{i}: not a JSON line ({e.msg})") from None
  return rows


def loss_curve(source: str | os.PathLike | Iterable[Mapping[str, Any]], keys: Sequence[str] = ("loss",),
               title: str | None = None):
  """Lines of `keys` against `step` from a run's metrics (read_metrics); keys found in no row are an error."""
  rows = read_metrics(source)
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  drawn = []
  for key in keys:
    pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r and r[key] is not None]
    if pts:
      x, y = zip(*pts)
      ax.plot(x, y, marker="o" if len(pts) < 20 else None, markersize=3, label=key)
      drawn.append(key)
  if not drawn:
    seen = sorted({k for r in rows for k in r if k != "step"})
    raise ValueError(f"none of {list(keys)} in the metrics (they have: {seen[:20]})")
  ax.set_xlabel("step")
  ax.legend()
  ax.grid(alpha=0.3)
  if title:
    ax.set_title(title)
  fig.tight_layout()
  return fig


def similarity_heatmap(sim: Any, rows: Sequence[str], cols: Sequence[str], title: str | None = None,
                       wrap: int = 30):
  """A [len(rows), len(cols)] score matrix with its values written in the cells."""
  sim = np.asarray(sim, np.float32)
  if sim.shape != (len(rows), len(cols)):
    raise ValueError(f"similarity_heatmap: scores {sim.shape} for {len(rows)} rows x {len(cols)} columns")
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(cols), 0.9 + 0.7 * len(rows)))
  im = ax.imshow(sim, cmap="viridis", aspect="auto")
  ax.set_xticks(range(len(cols)), [textwrap.fill(c, wrap // 2) for c in cols], fontsize=7)
  ax.set_yticks(range(len(rows)), [textwrap.shorten(r, wrap, placeholder="...") for r in rows], fontsize=7)
  mid = (float(sim.max()) + float(sim.min())) / 2
  for i in range(sim.shape[0]):
    for j in range(sim.shape[1]):
      ax.text(j, i, f"{sim[i, j]:.3f}", ha="center", va="center", fontsize=8,
              color="black" if sim[i, j] > mid else "white")
  fig.colorbar(im, ax=ax)
  if title:
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  return fig


def token_spans(rows: Sequence[Sequence[str]], groups: Sequence[Sequence[int]], titles: Sequence[str] | None = None,
                ignore: int = -1):
  """Tokens drawn as boxes in a line per row, coloured by group (e.g. BagFormer's entity bag of each token;
  `ignore` = no box colour). rows[i] and groups[i] have one entry per token."""
  if len(rows) != len(groups):
    raise ValueError(f"token_spans: {len(rows)} rows and {len(groups)} group lists")
  for i, (t, g) in enumerate(zip(rows, groups)):
    if len(t) != len(g):
      raise ValueError(f"token_spans: row {i} has {len(t)} tokens and {len(g)} groups")
  plt = _pyplot()
  font = _text_font(t for r in rows for t in r)
  palette = plt.get_cmap("tab20").colors
  width = max((sum(max(len(t), 1) + 1 for t in r) for r in rows), default=1)
  fig, ax = plt.subplots(figsize=(min(2 + 0.16 * width, 16), 0.6 + 0.55 * len(rows)))
  ax.set_xlim(0, width)
  ax.set_ylim(-len(rows), 0.5)
  ax.axis("off")
  for i, (toks, grp) in enumerate(zip(rows, groups)):
    x = 0.0
    y = -i
    if titles:
      ax.text(0, y + 0.35, titles[i], fontsize=7, color=NEUTRAL)
    for tok, g in zip(toks, grp):
      w = max(len(tok), 1) + 0.6
      face = "white" if g == ignore else palette[int(g) % len(palette)]
      ax.add_patch(plt.Rectangle((x, y - 0.3), w, 0.55, facecolor=face, edgecolor="#555555", linewidth=0.5))
      ax.text(x + w / 2, y, tok, ha="center", va="center", fontsize=8, **font)
      x += w + 0.4
  if _has_cjk(t for r in rows for t in r) and not font:
    fig.text(0.01, 0.01, "(no CJK font installed: apt install fonts-noto-cjk)", fontsize=6, color=NEUTRAL)
  _quiet_tight_layout(fig)
  return fig


def _quiet_tight_layout(fig) -> None:
  """tight_layout without matplotlib's one-warning-per-missing-glyph (the figure notes a missing CJK font)."""
  import warnings  # pylint: disable=import-outside-toplevel
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Glyph .* missing from font")
    fig.tight_layout()


def save_png(fig, path: str | os.PathLike, dpi: int = 100) -> pathlib.Path:
  """Writes `fig` as a PNG (parents created) and closes it; returns the path."""
  path = pathlib.Path(path)
  if path.suffix.lower() != ".png":
    raise ValueError(f"--plot / save_png writes PNG files: give a path ending in .png, got {path}")
  path.parent.mkdir(parents=True, exist_ok=True)
  import warnings  # pylint: disable=import-outside-toplevel
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Glyph .* missing from font")
    fig.savefig(path, dpi=dpi, format="png")
  _pyplot().close(fig)
  return path
