"""`prepare_blair --images`: BLaIR-CLIP rows + one downloaded image per item, against a real HTTP server.

The server (127.0.0.1, a thread of this process) serves generated JPEG / PNG files, 404s, a non-image
body, a response that stalls past the timeout, a 503-then-200 and an always-500. Checked: the TSV equals
the fork's selection rules written out here (aokhader/BLAIR-MultiModal `blair/sample_multimodal_data.py`:
meta text > 30 chars, review filters, first `images` entry with an http URL preferring hi_res > large >
thumb, optional drop of imageless rows and of repeated pairs), each image equals PIL's
`convert("RGB").resize((224, 224), BICUBIC)` of the served file pixel for pixel, the failure counts and
request counts are exact, a rerun requests nothing already on disk, a run killed mid-download
completes on rerun with no temporary or truncated file left, and a smoke-sized BLaIR-CLIP training
runs on the produced TSV.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import PIL.Image
import pytest

from mmret_jax.data import image_download, prepare_blair
from mmret_jax.data.sources.amazon_reviews import MultimodalPairsSource

REPO = pathlib.Path(__file__).resolve().parents[1]
T1 = 1628643414042
SIZE = 224
FAST = ["--timeout", "0.5", "--retries", "2", "--backoff", "0.01", "--download-workers", "4"]
UA = "mmret-test-agent/1.0"


# ---------------------------------------------------------------------------
# A real HTTP server
# ---------------------------------------------------------------------------
def _image_bytes(seed: int, w: int, h: int, mode: str, fmt: str) -> bytes:
  """A smooth gradient with noise (so bicubic resizing has something to do), in the given mode."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  px = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 7) % 256], -1)
  px = np.clip(px + rng.integers(-40, 41, px.shape), 0, 255).astype(np.uint8)
  img = PIL.Image.fromarray(px)
  if mode == "RGBA":
    img = img.convert("RGBA")
    img.putalpha(PIL.Image.fromarray((x * 3 % 256).astype(np.uint8)))
  elif mode == "P":
    img = img.convert("P", palette=PIL.Image.ADAPTIVE, colors=64)
  elif mode == "L":
    img = img.convert("L")
  buf = io.BytesIO()
  img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
  return buf.getvalue()


class Server:
  """Paths: /img/N (a file), /slow/N (the file after `slow` s), /404/N, /html/N (200, not an image),
  /stall/N (sleeps past the timeout), /flaky/N (503 once, then the file), /500/N. Counts requests."""

  def __init__(self, files: dict[str, bytes], slow: float = 0.3):
    self.files, self.slow = files, slow
    self.counts: dict[str, int] = {}
    self.agents: set[str] = set()
    self.lock = threading.Lock()
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *a):  # quiet
        pass

      def do_GET(self):  # noqa: N802
        with outer.lock:
          n = outer.counts[self.path] = outer.counts.get(self.path, 0) + 1
          outer.agents.add(self.headers.get("User-Agent", ""))
        _, kind, name = self.path.split("/", 2)
        try:
          if kind == "stall":  # the client gave up long ago
            time.sleep(2.0)
            return
          if kind == "slow":
            time.sleep(outer.slow)
          if kind in ("404", "500") or (kind == "flaky" and n == 1):
            code = {"404": 404, "500": 500, "flaky": 503}[kind]
            self.send_response(code)
            if code == 503:
              self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
          body, ctype = (b"<html><body>Robot check</body></html>", "text/html") if kind == "html" else \
              (outer.files[name], "image/png" if outer.files[name][:4] == b"\x89PNG" else "image/jpeg")
          self.send_response(200)
          self.send_header("Content-Type", ctype)
          self.send_header("Content-Length", str(len(body)))
          self.end_headers()
          self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
          pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def url(self, kind: str, name: str) -> str:
    return f"{self.base}/{kind}/{name}"

  def snapshot(self) -> dict[str, int]:
    with self.lock:
      return dict(self.counts)

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


def _diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
  return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


# ---------------------------------------------------------------------------
# Raw Amazon Reviews 2023 files (meta `images` as in the raw jsonl: a list of dicts)
# ---------------------------------------------------------------------------
def _meta(asin, title, images, features=("Stainless steel", "Easy to clean"), **extra):
  return {"main_category": "X", "title": title, "features": list(features), "description": ["Made to last."],
          "images": images, "parent_asin": asin, **extra}


def _img(hi_res=None, large=None, thumb=None):
  return {"thumb": thumb, "large": large, "variant": "MAIN", "hi_res": hi_res}


def _review(asin, title, text, ts):
  return {"rating": 5.0, "title": title, "text": text, "images": [], "asin": asin, "parent_asin": asin,
          "user_id": "U", "timestamp": ts, "helpful_vote": 0, "verified_purchase": True}


FILES = {  # name -> (seed, w, h, mode, format)
    "a1": (1, 300, 200, "RGB", "PNG"), "a2": (2, 640, 480, "RGB", "JPEG"), "a3": (3, 120, 90, "RGBA", "PNG"),
    "a8": (8, 200, 260, "L", "JPEG"), "a10": (10, 150, 150, "P", "PNG"), "b1": (11, 256, 256, "RGB", "JPEG"),
    "b3": (13, 90, 300, "RGB", "PNG"),
}


def build_raw(root: pathlib.Path, srv: Server):
  """Two categories; returns (reviews dir, meta dir, RAW records, expected outcome per item)."""
  u = srv.url
  raw = {
      "Appliances": {"meta": [
          _meta("A1", "AcmeBrew Kettle", [_img(large=u("img", "a1"), thumb=u("img", "x"))]),  # large
          _meta("A2", "Chill Fridge Filter", [_img(hi_res=u("img", "a2"), large=u("img", "x"))]),  # hi_res
          _meta("A3", "Toaster Deluxe", [_img(), _img(thumb=u("img", "a3")), _img(hi_res=u("img", "x"))]),
          _meta("A4", "Blender Without Pictures", []),  # no URL
          _meta("A5", "Mixer Gone Missing", [_img(hi_res=u("404", "a5"))]),
          _meta("A6", "Grill With A Bot Wall", [_img(large=u("html", "a6"))]),
          _meta("A7", "Slow Server Oven", [_img(hi_res=u("stall", "a7"))]),
          _meta("A8", "Flaky Host Microwave", [_img(hi_res=u("flaky", "a8"))]),
          _meta("A9", "Broken Host Dishwasher", [_img(large=u("500", "a9"))]),
          # the Hugging Face datasets layout (a dict of lists): entry 0 = {hi_res: None, large: a10}
          _meta("A10", "Kettle Descaler Tablets", {"hi_res": [None, u("img", "x")], "large": [u("img", "a10"), None],
                                                   "thumb": [None, None], "variant": ["MAIN", "PT01"]}),
          _meta("A11", "Tiny", [_img(hi_res=u("img", "x"))], features=()),  # meta too short: never requested
          _meta("A12", "A Product Nobody Reviewed", [_img(hi_res=u("img", "x"))]),  # no rows: not requested
          "{not json",
      ], "reviews": []},
      "All_Beauty": {"meta": [
          _meta("B1", "Rose Water Toner", [_img(hi_res=u("img", "b1"))]),
          _meta("B2", "Shampoo With Only An FTP Link", [_img(hi_res="ftp://example.com/b2.jpg")]),  # no URL
          _meta("B3", "Vitamin C Serum Bottle", [_img(hi_res="", large="ftp://x/y.png", thumb=u("img", "b3"))]),
      ], "reviews": []},
  }
  outcome = {"A1": "a1", "A2": "a2", "A3": "a3", "A4": "no_url", "A5": "http_error", "A6": "not_image",
             "A7": "timeout", "A8": "a8", "A9": "http_error", "A10": "a10", "B1": "b1", "B2": "no_url",
             "B3": "b3"}
  for cat, items in (("Appliances", [f"A{i}" for i in range(1, 12)]), ("All_Beauty", ["B1", "B2", "B3"])):
    revs = raw[cat]["reviews"]
    for k, asin in enumerate(items):
      revs.append(_review(asin, "Works well", f"Review {k} of {asin}: does exactly what it should do.", 100 + k))
      revs.append(_review(asin, "Too new", f"Written after the cutoff, review of {asin}, must go.", T1 + k))
      revs.append(_review(asin, "Short", "ok", 5))
      if k % 3 == 0:  # the same review twice: a repeated (review, meta) pair
        revs.append(_review(asin, "Works well", f"Review {k} of {asin}: does exactly what it should do.", 200))
      revs.append(_review(asin, "Second opinion", f"Another long enough review number {k} for {asin}.", 300))
    revs.append(_review("Z9", "No such item", "This review's item has no metadata line at all.", 7))
  rev, met = root / "reviews", root / "meta"
  rev.mkdir(parents=True)
  met.mkdir(parents=True)
  for cat, ext in (("Appliances", ".jsonl"), ("All_Beauty", ".jsonl.gz")):
    for sub, path in (("reviews", rev / f"{cat}{ext}"), ("meta", met / f"meta_{cat}{ext}")):
      data = ("\n".join(r if isinstance(r, str) else json.dumps(r) for r in raw[cat][sub]) + "\n").encode()
      path.write_bytes(gzip.compress(data) if ext.endswith(".gz") else data)
  return rev, met, raw, outcome


# ---------------------------------------------------------------------------
# The fork's rules, written out independently of the module under test (sample rate 1)
# ---------------------------------------------------------------------------
def seed_select_image_url(images):
  if isinstance(images, dict):
    n = max(len(v) for v in images.values())
    images = [{k: v[i] for k, v in images.items()} for i in range(n)]
  for entry in images:
    for key in ("hi_res", "large", "thumb"):
      url = entry.get(key)
      if url and isinstance(url, str) and url.startswith("http"):
        return url
  return None


def _clean(s):
  return s.replace("\t", " ").replace("\n", " ").replace("\r", "").strip()


def expected_rows(raw, outcome, categories, drop_missing=False, dedup=False):
  """[(review, meta, image_path)]: the text prep's rows; the image name when the item's download
  succeeds, else "" (or the row dropped); repeated pairs dropped after that with `dedup`."""
  rows = []
  for cat in categories:
    index = {}
    for m in raw[cat]["meta"]:
      if isinstance(m, str):
        continue
      parts = [m["title"]] + m["features"] + m["description"]
      text = _clean(" ".join(p for p in parts if p))
      if len(text) > 30:
        index[m["parent_asin"]] = text
    for r in raw[cat]["reviews"]:
      text = _clean(" ".join(x for x in (r["title"], r["text"]) if x))
      if r["timestamp"] < T1 and r["parent_asin"] in index and len(text) > 30:
        asin = r["parent_asin"]
        rows.append((text, index[asin], f"{asin}.png" if outcome[asin] not in image_download.REASONS else ""))
  if drop_missing:
    rows = [r for r in rows if r[2]]
  if dedup:
    seen, kept = set(), []
    for r in rows:
      h = hashlib.md5((r[0] + "\n" + r[1]).encode()).hexdigest()
      if h not in seen:
        seen.add(h)
        kept.append(r)
    rows = kept
  return rows


def read_tsv(path):
  lines = pathlib.Path(path).read_text(encoding="utf-8").split("\n")
  assert lines[0] == "review\tmeta\timage_path" and lines[-1] == ""
  return [tuple(ln.split("\t")) for ln in lines[1:-1]]


def reference_resize(content: bytes) -> np.ndarray:
  return np.asarray(PIL.Image.open(io.BytesIO(content)).convert("RGB").resize((SIZE, SIZE), PIL.Image.BICUBIC))


def run(env, out, *extra, images=None):
  return prepare_blair.main(["--reviews", str(env["rev"]), "--meta", str(env["met"]), "--output", str(out),
                             "--images", str(images or env["images"]), "--sample-rate", "1",
                             "--categories", "Appliances,All_Beauty", "--no-progress", "--user-agent", UA,
                             *FAST, *extra])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("blair_images")
  files = {name: _image_bytes(*spec) for name, spec in FILES.items()}
  srv = Server(files)
  rev, met, raw, outcome = build_raw(root / "raw", srv)
  e = {"root": root, "srv": srv, "files": files, "rev": rev, "met": met, "raw": raw, "outcome": outcome,
       "images": root / "images"}
  before = srv.snapshot()
  e["result"] = run(e, root / "pairs.tsv")
  e["first_requests"] = _diff(srv.snapshot(), before)
  yield e
  srv.close()


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------
def test_select_image_url_and_file_names():
  assert image_download.select_image_url([_img(thumb="http://t", large="http://l", hi_res="http://h")]) == "http://h"
  assert image_download.select_image_url([_img(thumb="http://t", large="http://l")]) == "http://l"
  assert image_download.select_image_url([_img(), _img(thumb="https://t2"), _img(hi_res="http://h3")]) == "https://t2"
  assert image_download.select_image_url([_img(hi_res="ftp://x", large="", thumb=None)]) is None
  assert image_download.select_image_url({"hi_res": [None, "http://b"], "large": ["http://a", None]}) == "http://a"
  for bad in (None, [], {}, "http://x", [None, "http://x"]):
    assert image_download.select_image_url(bad) is None
  assert image_download.image_file_name("B01N0TQ0OH") == "B01N0TQ0OH.png"
  assert image_download.image_file_name("B01N0TQ0OH", "jpg") == "B01N0TQ0OH.jpg"
  odd = {image_download.image_file_name(s) for s in ("../etc/passwd", "a/b", ".hidden", "id-x", "a b")}
  assert len(odd) == 5 and all(n.startswith("id-") and "/" not in n for n in odd)


def test_tsv_images_and_counts(env):
  res, srv, files = env["result"], env["srv"], env["files"]
  expected = expected_rows(env["raw"], env["outcome"], ["Appliances", "All_Beauty"])
  got = read_tsv(env["root"] / "pairs.tsv")
  assert got == expected and res["rows"] == len(expected)
  img = res["images"]
  n_with = sum(1 for r in expected if r[2])
  assert (img["rows_with_image"], img["rows_without_image"], img["rows_dropped_missing_image"]) == \
         (n_with, len(expected) - n_with, 0)
  # 13 distinct items have rows (A11: meta too short, A12: no reviews): 7 images, 6 failures.
  assert img["items"] == 13
  assert img["download"]["counts"] == {
      "items": 13, "on_disk": 0, "downloaded": 7, "failed": 6, "no_url": 2, "http_error": 2, "timeout": 1,
      "connection_error": 0, "not_image": 1, "too_large": 0, "not_retried": 0, "requests": 16}
  assert img["download"]["http_status"] == {"404": 1, "500": 1}
  # 1 request per image; stall and 500: 1 + 2 retries; flaky: 503 then 200; never the unchosen URLs
  assert env["first_requests"] == {
      "/img/a1": 1, "/img/a2": 1, "/img/a3": 1, "/img/a10": 1, "/img/b1": 1, "/img/b3": 1, "/404/a5": 1,
      "/html/a6": 1, "/stall/a7": 3, "/flaky/a8": 2, "/500/a9": 3}
  assert srv.agents == {UA}
  stats = json.loads((env["root"] / "pairs.tsv.stats.json").read_text())
  assert stats["images"]["download"]["counts"] == img["download"]["counts"]
  # every stored image: 224 x 224, equal to PIL's RGB + bicubic resize of the served bytes
  names = sorted(p.name for p in env["images"].iterdir() if not p.name.startswith("."))
  ok = {a: f for a, f in env["outcome"].items() if f not in image_download.REASONS}
  assert names == sorted([f"{a}.png" for a in ok] + [image_download.FAILURES_FILE])
  for asin, f in ok.items():
    with PIL.Image.open(env["images"] / f"{asin}.png") as im:
      assert im.format == "PNG" and im.mode == "RGB" and im.size == (SIZE, SIZE)
      np.testing.assert_array_equal(np.asarray(im), reference_resize(files[f]))
  rec = image_download.load_failures(env["images"])
  assert {a: r["reason"] for a, r in rec.items()} == {"A5": "http_error", "A6": "not_image", "A7": "timeout",
                                                      "A9": "http_error"}


def test_drop_missing_and_dedup_pairs(env, tmp_path):
  before = env["srv"].snapshot()
  out = tmp_path / "dropped.tsv"
  res = run(env, out, "--drop-missing-images", "--dedup-pairs", "--retry-failed", "none")
  expected = expected_rows(env["raw"], env["outcome"], ["Appliances", "All_Beauty"], drop_missing=True, dedup=True)
  assert read_tsv(out) == expected
  all_rows = expected_rows(env["raw"], env["outcome"], ["Appliances", "All_Beauty"])
  with_img = [r for r in all_rows if r[2]]
  assert res["images"]["rows_dropped_missing_image"] == len(all_rows) - len(with_img)
  assert res["duplicate_pairs"] == len(with_img) - len(expected) > 0
  assert _diff(env["srv"].snapshot(), before) == {}  # everything on disk or a recorded failure
  # text-only dedup as well
  text = prepare_blair.main(["--reviews", str(env["rev"]), "--meta", str(env["met"]), "--output",
                             str(tmp_path / "text.tsv"), "--sample-rate", "1", "--no-progress", "--dedup-pairs",
                             "--categories", "Appliances,All_Beauty"])
  no_img = expected_rows(env["raw"], env["outcome"], ["Appliances", "All_Beauty"], dedup=True)
  assert text["rows"] == len(no_img) and text["duplicate_pairs"] == len(all_rows) - len(no_img)


def test_rerun_requests_nothing_on_disk(env, tmp_path):
  srv = env["srv"]
  # default: failures that may pass next time (timeout, 5xx) are requested again, not 404 / non-image
  before = srv.snapshot()
  res = run(env, tmp_path / "again.tsv")
  assert _diff(srv.snapshot(), before) == {"/stall/a7": 3, "/500/a9": 3}
  c = res["images"]["download"]["counts"]
  assert (c["on_disk"], c["downloaded"], c["failed"], c["not_retried"], c["requests"]) == (7, 0, 6, 2, 6)
  assert (c["no_url"], c["http_error"], c["timeout"], c["not_image"]) == (2, 2, 1, 1)
  assert read_tsv(tmp_path / "again.tsv") == read_tsv(env["root"] / "pairs.tsv")
  # --retry-failed none: zero requests
  before = srv.snapshot()
  res = run(env, tmp_path / "none.tsv", "--retry-failed", "none")
  assert _diff(srv.snapshot(), before) == {} and res["images"]["download"]["counts"]["requests"] == 0
  assert res["images"]["download"]["counts"]["not_retried"] == 4
  assert read_tsv(tmp_path / "none.tsv") == read_tsv(env["root"] / "pairs.tsv")
  # --retry-failed all: every failure with a URL once more (and nothing on disk)
  before = srv.snapshot()
  run(env, tmp_path / "all.tsv", "--retry-failed", "all")
  assert _diff(srv.snapshot(), before) == {"/404/a5": 1, "/html/a6": 1, "/stall/a7": 3, "/500/a9": 3}


def test_killed_run_completes_on_rerun(env, tmp_path):
  """A real SIGKILL mid-download; then damage planted as a crash could leave it (a stale temporary
  file, a truncated image): the rerun cleans up, fetches only what is missing, and the result is whole."""
  srv = env["srv"]
  n = 12
  meta = [_meta(f"K{i}", f"Kitchen Gadget Number {i}", [_img(hi_res=srv.url("slow", f"k{i}"))]) for i in range(n)]
  revs = [_review(f"K{i}", "Good", f"Kitchen gadget {i} review, long enough to be kept.", 10) for i in range(n)]
  for i in range(n):
    srv.files[f"k{i}"] = _image_bytes(100 + i, 80 + 7 * i, 60 + 5 * i, "RGB", "PNG" if i % 2 else "JPEG")
  (tmp_path / "r").mkdir()
  (tmp_path / "m").mkdir()
  (tmp_path / "r" / "Kitchen.jsonl").write_text("\n".join(json.dumps(r) for r in revs) + "\n")
  (tmp_path / "m" / "meta_Kitchen.jsonl").write_text("\n".join(json.dumps(m) for m in meta) + "\n")
  images, out = tmp_path / "img", tmp_path / "k.tsv"
  args = ["--reviews", str(tmp_path / "r"), "--meta", str(tmp_path / "m"), "--output", str(out),
          "--images", str(images), "--sample-rate", "1", "--no-progress", "--timeout", "5",
          "--download-workers", "2"]
  before = srv.snapshot()
  proc = subprocess.Popen([sys.executable, "-m", "mmret_jax.data.prepare_blair", *args], cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 60
  while len(list(images.glob("*.png"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
  done = sorted(p.name for p in images.glob("*.png"))
  assert 3 <= len(done) < n and not out.exists()
  for p in images.glob("*.png"):  # whatever has a final name is whole
    assert image_download.verify_image(p, SIZE), p
  killed_requests = _diff(srv.snapshot(), before)
  # plant what a crash mid-write could leave, and damage one finished image
  (images / ".dl-crashed.tmp").write_bytes(b"\x89PNG half")
  victim = images / done[0]
  victim.write_bytes(victim.read_bytes()[:200])
  before = srv.snapshot()
  res = prepare_blair.main(args)
  rerun_requests = _diff(srv.snapshot(), before)
  assert res["rows"] == n and res["images"]["rows_with_image"] == n
  c = res["images"]["download"]["counts"]
  assert (c["on_disk"], c["downloaded"], c["failed"]) == (len(done) - 1, n - len(done) + 1, 0)
  fetched_again = {f"/slow/{p[:-4].lower()}" for p in done[1:]}
  assert not fetched_again & set(rerun_requests)  # nothing on disk is requested again
  assert rerun_requests == {f"/slow/k{i}": 1 for i in range(n) if f"/slow/k{i}" not in fetched_again}
  assert sum(killed_requests.values()) >= len(done)
  leftovers = [p.name for p in images.iterdir() if p.name.startswith(".dl-")]
  assert leftovers == [] and not list(tmp_path.glob("incomplete.*"))
  assert sorted(p.name for p in images.glob("*.png")) == sorted(f"K{i}.png" for i in range(n))
  for i in range(n):
    with PIL.Image.open(images / f"K{i}.png") as im:
      np.testing.assert_array_equal(np.asarray(im), reference_resize(srv.files[f"k{i}"]))
  assert [r[2] for r in read_tsv(out)] == [f"K{i}.png" for i in range(n)]


def test_jpg_format_and_cli_errors(env, tmp_path, capsys):
  img = image_download.resize_image(env["files"]["a1"], SIZE)
  image_download.write_atomic(img, tmp_path / "a.jpg", "jpg")
  with PIL.Image.open(tmp_path / "a.jpg") as im:
    assert im.format == "JPEG" and im.size == (SIZE, SIZE)
    buf = io.BytesIO()  # = PIL's JPEG (quality 95) of the reference resize
    PIL.Image.fromarray(reference_resize(env["files"]["a1"])).save(buf, format="JPEG", quality=95)
    np.testing.assert_array_equal(np.asarray(im), np.asarray(PIL.Image.open(buf)))
  assert image_download.verify_image(tmp_path / "a.jpg", SIZE)
  assert not image_download.verify_image(tmp_path / "a.jpg", 32)  # another --image-size: fetched again
  with pytest.raises(image_download.Failure, match="not_image"):
    image_download.resize_image(b"<html>", SIZE)
  base = ["--reviews", str(env["rev"]), "--meta", str(env["met"]), "--output", str(tmp_path / "x")]
  for extra, msg in ((["--images", "d", "--format", "array_record"], "--images writes a TSV"),
                     (["--drop-missing-images"], "needs --images"),
                     (["--images", "d", "--download-workers", "0"], "--download-workers must be >= 1"),
                     (["--images", "d", "--timeout", "0"], "--timeout must be > 0")):
    with pytest.raises(SystemExit) as e:
      prepare_blair.main(base + extra)
    assert e.value.code == 2 and msg in capsys.readouterr().err
  (tmp_path / "file").write_text("x")
  with pytest.raises(NotADirectoryError, match="not a directory"):
    prepare_blair.main(base + ["--images", str(tmp_path / "file"), "--no-progress"])


def test_smoke_training_on_the_produced_tsv(env, tmp_path):
  """`configs/blair_clip.py:smoke` (tiny towers from scratch) on the TSV and image dir just made."""
  sys.path.insert(0, str(REPO / "configs"))
  import blair_clip  # pylint: disable=import-outside-toplevel
  from fixtures import override  # pylint: disable=import-outside-toplevel
  from mmret_jax.train import loop  # pylint: disable=import-outside-toplevel
  from mmret_jax.train.metrics import read_metrics  # pylint: disable=import-outside-toplevel

  tsv = env["root"] / "pairs.tsv"
  src = MultimodalPairsSource(tsv, "image_path", str(env["images"]))
  img = env["result"]["images"]
  # rows without an image (empty image_path) are skipped by our loader and counted (data.missing_images=skip)
  assert len(src) == img["rows_with_image"] and src.stats["skip_reasons"] == {"no_image": img["rows_without_image"]}
  kept = MultimodalPairsSource(tsv, "image_path", str(env["images"]), keep_missing_images=True)  # ...=black
  assert len(kept) == len(src) + img["rows_without_image"] == kept.stats["rows"]
  assert kept.stats["rows_without_image"] == img["rows_without_image"]
  assert all(os.path.isfile(src[i]["image_path"]) for i in range(len(src)))
  cfg = override(blair_clip.get_config("smoke"), {
      "data.train_file": str(tsv), "data.image_root": str(env["images"]), "model.preset": "roberta-tiny",
      "tokenizer": "bpe:300", "mm.projection_dim": 32, "data.max_seq_length": 24, "data.eval_max_pairs": 8,
      "data.eval_batch_size": 8, "data.num_threads": 1, "total_steps": 3, "batch_size": 8, "log_every": 1,
      "eval_every": 0, "checkpoint_every": 100, "optim.warmup_steps": 0})
  cfg.checkpoint.async_save = False
  res = loop.train_and_evaluate(cfg, tmp_path / "w")
  losses = [r["loss"] for r in read_metrics(tmp_path / "w") if "loss" in r]
  assert len(losses) == 3 and all(np.isfinite(losses))
  assert res.eval["eval/images_skipped"] == 0 and res.eval["eval/train_images_skipped"] == 0
  assert res.eval["eval/num_images"] >= 1
