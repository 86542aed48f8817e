"""One product image per item for BLaIR-CLIP: pick the URL, download, resize, store (resumable).

As the fork's `sample_multimodal_data.py` (aokhader/BLAIR-MultiModal; shared/reference/blair.md §7):

* `select_image_url(images)`: the first `images` entry that has a URL, preferring its `hi_res`,
  then `large`, then `thumb` (a URL is a string starting with "http"). Raw `meta_*.jsonl` files hold
  a list of dicts; the Hugging Face `datasets` form (a dict of lists) is read as the same entries.
* each image is decoded, converted to RGB (`PIL.Image.convert("RGB")`: alpha dropped, palette
  expanded; 16-bit grey scaled to 8 bits instead of clipped) and resized to `size x size` with PIL
  bicubic (aspect ratio not kept, as the fork). The fork saves JPEG (quality 75); we save PNG by
  default (lossless: the stored pixels are exactly the resized ones), `image_format="jpg"` (quality
  95) for about 5x less disk.

`download_images(items, out_dir, cfg)` fetches every item's image once, into `out_dir/<name>` with
`<name> = image_file_name(item_id, format)` (the item id itself when it is a plain file name, as
`parent_asin`s are, else a digest). Downloading:

* a bounded thread pool (`workers`), one `requests.Session` per thread (keep-alive connection pools),
  at most `4 * workers` items in flight, a tqdm bar;
* `timeout` seconds to connect and between received bytes; a whole response is cut off after
  `3 * timeout`, and a body over `max_bytes` is refused;
* retries (`retries`, back-off `backoff * 2**k`, +-10% jitter; `Retry-After` honoured up to 60 s) on
  timeouts, connection errors, HTTP 5xx, 408 and 429; not on other 4xx or on a body that is not an
  image;
* every image is written to a temporary `.dl-*.tmp` file in `out_dir`, then renamed (`os.replace`), so
  a killed run never leaves a truncated image under a final name; stale temporary files are removed
  when the next run starts. A lock file (`.download.lock`, `flock`) keeps two runs out of one dir.

Resuming: an image already in `out_dir` that decodes fully at `size x size` is kept and not
requested again (a damaged one is deleted and fetched again). Failures are recorded in
`out_dir/download_failures.json` (URL, reason, HTTP status); `retry_failed` says which a rerun
requests again: "transient" (default: timeouts, connection errors, 5xx / 408 / 429), "all", or
"none". A failure not retried is counted under its recorded reason, and in `not_retried`.

Counts (`DownloadResult.counts`): `items` = `on_disk` + `downloaded` + `failed`, and `failed` =
the sum over `REASONS`: `no_url`, `http_error`, `timeout`, `connection_error`, `not_image`,
`too_large`; plus `not_retried` and `requests` (HTTP requests sent, retries included).
`DownloadResult.http_status` counts the final status of each `http_error`.

Library choice: `requests` (already a dependency of the stack; urllib3 connection pools) on
threads. The work is I/O-bound and PIL releases the GIL while decoding and resizing, so threads
suffice; img2dataset writes numbered shards (not names derived from the item id) and resizes with
OpenCV (not PIL's bicubic), and httpx / aiohttp would add a dependency for no gain here.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import glob
import hashlib
import io
import json
import os
import pathlib
import random
import re
import sys
import tempfile
import threading
import time
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import PIL.Image
import requests
import tqdm
import urllib3

REASONS = ("no_url", "http_error", "timeout", "connection_error", "not_image", "too_large")
URL_KEYS = ("hi_res", "large", "thumb")
FORMATS = {"png": "PNG", "jpg": "JPEG"}
RETRY_FAILED = ("transient", "all", "none")
FAILURES_FILE = "download_failures.json"
LOCK_FILE = ".download.lock"
TMP_PREFIX, TMP_SUFFIX = ".dl-", ".tmp"
DEFAULT_USER_AGENT = "Mozilla/5.0 (compatible; mmret_jax-prepare_blair/0.1)"
MAX_RETRY_AFTER = 60.0
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,150}")


@dataclasses.dataclass(frozen=True)
class DownloadConfig:
  """Download settings (see the module docstring)."""
  size: int = 224
  image_format: str = "png"
  workers: int = 16
  timeout: float = 10.0
  retries: int = 3
  backoff: float = 1.0
  user_agent: str = DEFAULT_USER_AGENT
  retry_failed: str = "transient"
  max_bytes: int = 50 << 20
  progress: bool = True

  def __post_init__(self):
    if self.image_format not in FORMATS:
      raise ValueError(f"image_format must be one of {tuple(FORMATS)}, got {self.image_format!r}")
    if self.retry_failed not in RETRY_FAILED:
      raise ValueError(f"retry_failed must be one of {RETRY_FAILED}, got {self.retry_failed!r}")
    for name, lo in (("size", 1), ("workers", 1), ("retries", 0), ("max_bytes", 1)):
      if getattr(self, name) < lo:
        raise ValueError(f"{name} must be >= {lo}, got {getattr(self, name)}")
    if not self.timeout > 0 or self.backoff < 0:
      raise ValueError(f"timeout must be > 0 and backoff >= 0, got {self.timeout}, {self.backoff}")


@dataclasses.dataclass
class DownloadResult:
  """`files[item_id]`: the image's file name inside the output dir, or None (failed / no URL)."""
  files: dict[str, str | None]
  counts: dict[str, int]
  http_status: dict[str, int]
  examples: list[dict[str, Any]]  # the first few failures: item, url, reason, detail


class Failure(Exception):
  """One image that could not be had: `reason` in REASONS; `transient` failures are worth retrying."""

  def __init__(self, reason: str, detail: str, transient: bool = False, status: int | None = None,
               retry_after: float | None = None):
    super().__init__(f"{reason}: {detail}")
    self.reason, self.detail, self.transient, self.status = reason, detail, transient, status
    self.retry_after = retry_after


# ---------------------------------------------------------------------------
# URL choice and file names
# ---------------------------------------------------------------------------
def _entries(images: Any) -> list[Any]:
  if isinstance(images, list):
    return images
  if isinstance(images, dict):  # HF datasets: {"hi_res": [...], "large": [...], ...}
    cols = {k: v for k, v in images.items() if isinstance(v, list)}
    n = max((len(v) for v in cols.values()), default=0)
    return [{k: v[i] for k, v in cols.items() if i < len(v)} for i in range(n)]
  return []


def select_image_url(images: Any) -> str | None:
  """The first entry's URL that exists, preferring `hi_res`, then `large`, then `thumb`; else None."""
  for entry in _entries(images):
    if not isinstance(entry, dict):
      continue
    for key in URL_KEYS:
      url = entry.get(key)
      if isinstance(url, str) and url.startswith("http"):
        return url
  return None


def image_file_name(item_id: str, image_format: str = "png") -> str:
  """A stable file name for an item's image: `<item_id>.<ext>` when the id is a plain name (letters,
  digits, `_.-`, as Amazon `parent_asin`s are), else `id-<sha1 of the id>.<ext>`."""
  if _PLAIN_NAME.fullmatch(item_id) and not item_id.startswith("id-"):
    return f"{item_id}.{image_format}"
  return f"id-{hashlib.sha1(item_id.encode('utf-8')).hexdigest()}.{image_format}"


# ---------------------------------------------------------------------------
# Decoding, resizing, atomic writes
# ---------------------------------------------------------------------------
def to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
  """`img.convert("RGB")` (the fork's rule), except that 16-bit grey is scaled to 8 bits, not clipped."""
  if img.mode.startswith("I;16") or img.mode == "I":
    a = np.clip(np.round(np.asarray(img).astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    img = PIL.Image.fromarray(a)
  return img if img.mode == "RGB" else img.convert("RGB")


def resize_image(content: bytes, size: int) -> PIL.Image.Image:
  """Decodes encoded bytes -> RGB -> `size x size` bicubic. Raises `Failure("not_image")`."""
  try:
    with PIL.Image.open(io.BytesIO(content)) as img:
      img.load()
      rgb = to_rgb(img)
    return rgb.resize((size, size), PIL.Image.BICUBIC)
  except MemoryError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises many types on bad data (UnidentifiedImageError / truncation: OSError, broken PNG
    # chunks: SyntaxError, DecompressionBombError, struct.error, EOFError, ...).
    raise Failure("not_image", f"cannot decode the body as an image ({type(e).__name__}: {e})") from e


def write_atomic(img: PIL.Image.Image, path: pathlib.Path, image_format: str) -> None:
  """Saves to a temporary file in `path`'s dir, then renames it to `path`."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX, suffix=TMP_SUFFIX)
  try:
    with os.fdopen(fd, "wb") as f:
      if image_format == "jpg":
        img.save(f, format="JPEG", quality=95)
      else:
        img.save(f, format="PNG")
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def verify_image(path: pathlib.Path, size: int) -> bool:
  """Whether `path` decodes fully as a `size x size` image."""
  try:
    with PIL.Image.open(path) as img:
      img.load()
      return img.size == (size, size)
  except MemoryError:
    raise
  except Exception:  # pylint: disable=broad-except
    return False


def remove_stale_temp_files(out_dir: pathlib.Path) -> int:
  """Deletes temporary files a killed run left behind; returns how many."""
  n = 0
  for p in glob.glob(os.path.join(glob.escape(os.fspath(out_dir)), f"{TMP_PREFIX}*{TMP_SUFFIX}")):
    with contextlib.suppress(FileNotFoundError):
      os.unlink(p)
      n += 1
  return n


@contextlib.contextmanager
def dir_lock(out_dir: pathlib.Path) -> Iterator[None]:
  """An exclusive `flock` on `out_dir/.download.lock` (released when the process ends, even killed)."""
  try:
    import fcntl  # pylint: disable=import-outside-toplevel
  except ImportError:  # not POSIX: no lock
    yield
    return
  with open(out_dir / LOCK_FILE, "a+b") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise RuntimeError(f"another run is downloading into {out_dir} (it holds {out_dir / LOCK_FILE}); "
                         "wait for it or use another --images dir") from None
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------
def _retry_after(r: requests.Response) -> float | None:
  v = r.headers.get("Retry-After")
  try:
    return min(max(float(v), 0.0), MAX_RETRY_AFTER) if v is not None else None
  except ValueError:
    return None  # an HTTP date: use the back-off


def _is_timeout(e: BaseException) -> bool:
  """requests wraps a read timeout while streaming the body into a ConnectionError."""
  if isinstance(e, requests.exceptions.Timeout):
    return True
  return any(isinstance(a, (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ConnectTimeoutError))
             for a in getattr(e, "args", ()))


def fetch_once(session: requests.Session, url: str, cfg: DownloadConfig) -> bytes:
  """One GET; the body, or raises `Failure`."""
  deadline = time.monotonic() + 3 * cfg.timeout
  try:
    with session.get(url, timeout=(cfg.timeout, cfg.timeout), stream=True) as r:
      if r.status_code >= 400 or r.status_code < 200:
        transient = r.status_code >= 500 or r.status_code in (408, 429)
        raise Failure("http_error", f"HTTP {r.status_code}", transient, r.status_code, _retry_after(r))
      length = r.headers.get("Content-Length")
      if length and length.isdigit() and int(length) > cfg.max_bytes:
        raise Failure("too_large", f"Content-Length {length} > {cfg.max_bytes} bytes")
      buf, n = [], 0
      for chunk in r.iter_content(1 << 16):
        buf.append(chunk)
        n += len(chunk)
        if n > cfg.max_bytes:
          raise Failure("too_large", f"body over {cfg.max_bytes} bytes")
        if time.monotonic() > deadline:
          raise Failure("timeout", f"body not received within {3 * cfg.timeout:g} s", transient=True)
      return b"".join(buf)
  except Failure:
    raise
  except requests.exceptions.RequestException as e:
    if _is_timeout(e):
      raise Failure("timeout", f"no response within {cfg.timeout:g} s ({type(e).__name__})", True) from e
    if isinstance(e, requests.exceptions.ConnectionError):
      raise Failure("connection_error", f"{type(e).__name__}: {e}", True) from e
    raise Failure("connection_error", f"{type(e).__name__}: {e}") from e  # bad URL, too many redirects


class _Fetcher:
  """Per-thread sessions, retries with back-off, a request counter."""

  def __init__(self, cfg: DownloadConfig):
    self.cfg = cfg
    self._local = threading.local()
    self._sessions: list[requests.Session] = []
    self._lock = threading.Lock()
    self.requests = 0

  def _session(self) -> requests.Session:
    s = getattr(self._local, "session", None)
    if s is None:
      s = requests.Session()
      s.headers.update({"User-Agent": self.cfg.user_agent,
                        "Accept": "image/webp,image/apng,image/*,*/*;q=0.8"})
      self._local.session = s
      with self._lock:
        self._sessions.append(s)
    return s

  def get(self, url: str) -> bytes:
    for attempt in range(self.cfg.retries + 1):
      with self._lock:
        self.requests += 1
      try:
        return fetch_once(self._session(), url, self.cfg)
      except Failure as f:
        if not f.transient or attempt == self.cfg.retries:
          raise
        delay = f.retry_after if f.retry_after is not None else self.cfg.backoff * 2 ** attempt
        time.sleep(delay * (1.0 + 0.1 * (2 * random.random() - 1)) if f.retry_after is None else delay)
    raise AssertionError("unreachable")

  def close(self):
    for s in self._sessions:
      s.close()


# ---------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------
def load_failures(out_dir: pathlib.Path) -> dict[str, dict[str, Any]]:
  """The failure record of earlier runs ({} when absent or unreadable)."""
  p = out_dir / FAILURES_FILE
  try:
    data = json.loads(p.read_text(encoding="utf-8"))
    return data["failures"] if isinstance(data.get("failures"), dict) else {}
  except (OSError, ValueError, AttributeError, KeyError):
    return {}


def _save_failures(out_dir: pathlib.Path, failures: Mapping[str, dict[str, Any]]) -> None:
  p = out_dir / FAILURES_FILE
  tmp = out_dir / (TMP_PREFIX + FAILURES_FILE + TMP_SUFFIX)
  tmp.write_text(json.dumps({"version": 1, "failures": dict(sorted(failures.items()))}, indent=0) + "\n",
                 encoding="utf-8")
  os.replace(tmp, p)


def _skip_known(record: dict[str, Any] | None, url: str, mode: str) -> bool:
  if record is None or record.get("url") != url or mode == "all":
    return False
  return mode == "none" or not record.get("transient", True)


def download_images(items: Mapping[str, str | None] | Iterable[tuple[str, str | None]],
                    out_dir: str | os.PathLike, cfg: DownloadConfig = DownloadConfig()) -> DownloadResult:
  """Makes sure each item's image is in `out_dir` (see the module docstring).

  Args:
    items: item_id -> image URL (None: no URL), or (item_id, url) pairs (a repeated id: its first URL).
    out_dir: created if needed.
    cfg: settings.

  Returns:
    A `DownloadResult` (file names for the items that have an image, counts, failure examples).
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  urls: dict[str, str | None] = {}
  for item, url in (items.items() if isinstance(items, Mapping) else items):
    urls.setdefault(item, url)  # an id given twice: the first URL
  pairs = list(urls.items())
  counts = dict.fromkeys(("items", "on_disk", "downloaded", "failed", *REASONS, "not_retried", "requests"), 0)
  counts["items"] = len(pairs)
  status: dict[str, int] = {}
  examples: list[dict[str, Any]] = []
  files: dict[str, str | None] = {}
  fetcher = _Fetcher(cfg)

  with dir_lock(out_dir):
    remove_stale_temp_files(out_dir)
    failures = load_failures(out_dir)
    old_failures = dict(failures)

    def work(item: str, url: str | None) -> tuple[str, str | None, Failure | None, bool]:
      """-> (item, file name or None, failure, whether the failure was only read from the record)."""
      if url is None:
        return item, None, Failure("no_url", "no hi_res / large / thumb URL in `images`"), False
      name = image_file_name(item, cfg.image_format)
      path = out_dir / name
      if path.exists():
        if verify_image(path, cfg.size):
          return item, name, None, True
        path.unlink(missing_ok=True)  # damaged or another size: fetch again
      rec = old_failures.get(item)
      if _skip_known(rec, url, cfg.retry_failed):
        return item, None, Failure(rec.get("reason", "http_error"), rec.get("detail", ""),
                                   bool(rec.get("transient")), rec.get("status")), True
      try:
        img = resize_image(fetcher.get(url), cfg.size)
        write_atomic(img, path, cfg.image_format)
      except Failure as f:
        return item, None, f, False
      return item, name, None, False

    def note(fut: concurrent.futures.Future, bar: tqdm.tqdm) -> None:
      item, name, fail, cached = fut.result()
      files[item] = name
      if fail is None:
        counts["on_disk" if cached else "downloaded"] += 1
        failures.pop(item, None)
      else:
        counts["failed"] += 1
        counts[fail.reason if fail.reason in REASONS else "http_error"] += 1
        counts["not_retried"] += int(cached)
        if fail.status is not None and fail.reason == "http_error":
          status[str(fail.status)] = status.get(str(fail.status), 0) + 1
        if fail.reason != "no_url":
          failures[item] = {"url": urls[item], "reason": fail.reason, "detail": fail.detail,
                            "transient": fail.transient, "status": fail.status}
          if len(examples) < 5:
            examples.append({"item": item, "url": urls[item], "reason": fail.reason, "detail": fail.detail})
      bar.update(1)
      if bar.n % 64 == 0 or bar.n == bar.total:
        bar.set_postfix(ok=counts["on_disk"] + counts["downloaded"], failed=counts["failed"], refresh=False)

    pool = concurrent.futures.ThreadPoolExecutor(cfg.workers, thread_name_prefix="image-download")
    pending: set[concurrent.futures.Future] = set()
    try:
      with tqdm.tqdm(total=len(pairs), desc="images", unit=" img", disable=not cfg.progress,
                     mininterval=1.0, file=sys.stderr) as bar:
        for item, url in pairs:
          if len(pending) >= 4 * cfg.workers:
            done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
              note(fut, bar)
          pending.add(pool.submit(work, item, url))
        for fut in concurrent.futures.as_completed(pending):
          note(fut, bar)
        pending = set()
    finally:
      pool.shutdown(wait=True, cancel_futures=True)  # in-flight items finish their atomic write
      fetcher.close()
      counts["requests"] = fetcher.requests
      _save_failures(out_dir, failures)
  return DownloadResult(files=files, counts=counts, http_status=status, examples=examples)
