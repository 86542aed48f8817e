"""M-BEIR data layer (`mmret_jax.data.sources.mbeir`) and the fabricated mini M-BEIR.

Expected values are worked out by hand from the seed (`TIGER-AI-Lab/UniIR`
`src/data/preprocessing/utils.py`, `src/data/mbeir_dataset.py`, `src/common/mbeir_retriever.py`).
"""

import json
import pickle
import random

import numpy as np
import pytest

from mmret_jax.data.samples import make_mbeir_mini
from mmret_jax.data.sources import mbeir


@pytest.fixture(scope="module")
def mini():
  return mbeir.MBEIR(mbeir.mini_root())


# ---------------------------------------------------------------------------
# Seed helpers
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    (None, ""),  # `(s or "")`
    ("", ""),
    ("  hello world  ", "Hello world."),
    ('"quoted text"', "Quoted text."),
    ("line\r\nnext", "Line\nnext."),  # \r dropped, inner \n kept
    ("Is it red?", "Is it red?"),
    ("wow!", "Wow!"),
    ("done.", "Done."),
    (' "  spaced" ', "  spaced."),  # blanks stripped before quotes: inner blanks survive
    ('""', ""),
    ("a", "A."),
    ("éclair", "Éclair."),
    ("3 dogs", "3 dogs."),
    ("Find a photo. a red star", "Find a photo. a red star."),  # only the first character
])
def test_format_string(raw, expected):
  assert mbeir.format_string(raw) == expected


def test_hashing_and_tasks():
  assert mbeir.hash_qid("9:123") == 4_500_123 and mbeir.unhash_qid(4_500_123) == "9:123"
  assert mbeir.hash_did("8:456") == 80_000_456 and mbeir.unhash_did(80_000_456) == "8:456"
  assert mbeir.hash_did("0:7") == 7 and mbeir.unhash_did(np.int64(7)) == "0:7"
  assert mbeir.hash_qid("5:499999") == 2_999_999
  assert mbeir.get_task_id("image,text", "image") == 7
  assert mbeir.get_task_id("image", "text,image") == 5
  assert mbeir.get_task_id("text", "video") is None
  assert len(mbeir.EVAL_SETS) == 16
  assert [s.name for s in mbeir.EVAL_SETS.values() if s.headline_k == 10] == [
      "fashion200k_task0", "fashion200k_task3", "fashioniq_task7"]
  assert mbeir.EVAL_SETS["fashioniq_task7"].metrics == ("Recall@10", "Recall@20", "Recall@50")
  assert mbeir.EVAL_SETS["mscoco_task3"].pool_name("val") == "mscoco_task3_val"
  assert mbeir.EVAL_SETS["cirr_task7"].pool_name("test") == "cirr_task7"


def test_upsample_like_seed():
  rows = [1, 2, 3]
  assert mbeir.upsample(rows, 5, random.Random(0)) == rows + random.Random(0).choices(rows, k=2)
  assert mbeir.upsample(rows, 2, random.Random(0)) == rows  # never shrinks


# ---------------------------------------------------------------------------
# Instructions, query text, positives
# ---------------------------------------------------------------------------
def _tsv(tmp_path, lines):
  path = tmp_path / "query_instructions.tsv"
  path.write_text("\n".join(["qm\tcm\tdataset\tid\tinst1\tinst2\tinst3\tinst4", *lines]) + "\n")
  return mbeir.Instructions.from_tsv(path)


def test_instructions_tsv(tmp_path):
  ins = _tsv(tmp_path, [
      "text\timage\tMSCOCO\t9\tfind a photo\t\tshow it!\t",  # empty cells dropped
      "image\ttext\tMSCOCO\t9\tFirst caption.",
      "image\ttext\tMSCOCO\t9\tcaption it",  # repeated key: the last line wins
      "text\ttext\tWebQA",  # too few columns
      "text\ttext\tWebQA\t2\t\t",  # no variant
      "",
      "  image,text\timage\tCIRR\t8\tedit it  ",  # the seed strips the whole line
  ])
  assert ins.table == {"9, text, image": ("find a photo", "show it!"), "9, image, text": ("caption it",),
                       "8, image,text, image": ("edit it",)}
  assert ins.stats["skipped"] == 2 and ins.stats["skip_reasons"] == {"columns": 1, "no_instructions": 1}
  assert ins.stats["bad_lines"] == [5, 6]
  with pytest.raises(KeyError, match="2, text, text"):
    ins.variants("2", "text", "text")
  q = mbeir.parse_query({"qid": "9:5", "query_txt": "a red star", "query_modality": "text",
                         "pos_cand_list": ["9:1"], "task_id": 0})
  assert mbeir.query_text(q, ins, "first") == "Find a photo. a red star."
  assert mbeir.query_text(q, None, "none") == "A red star."
  img_q = mbeir.parse_query({"qid": "9:6", "query_txt": None, "query_img_path": "x.jpg",
                             "query_modality": "image", "pos_cand_list": ["9:2"], "task_id": 3})
  assert mbeir.query_text(img_q, ins, "first") == "Caption it."  # `f"{prompt} "` formatted
  assert mbeir.query_text(img_q, ins, "none") == ""  # -> txt_mask 0 in the seed's collator
  with pytest.raises(ValueError, match="mode"):
    mbeir.query_text(q, ins, "sometimes")


def test_instruction_draws_are_seeded_per_query(tmp_path):
  ins = _tsv(tmp_path, ["text\timage\tMSCOCO\t9\tone\ttwo\tthree\tfour"])
  queries = [mbeir.parse_query({"qid": f"9:{i}", "query_txt": "x", "query_modality": "text",
                                "pos_cand_list": ["9:1"], "task_id": 0}) for i in range(200)]
  texts = [mbeir.query_text(q, ins, "random", seed=7) for q in queries]
  assert texts == [mbeir.query_text(q, ins, "random", seed=7) for q in queries]  # reproducible
  assert set(texts) == {"One. x.", "Two. x.", "Three. x.", "Four. x."}
  assert texts != [mbeir.query_text(q, ins, "random", seed=8) for q in queries]
  assert texts != [mbeir.query_text(q, ins, "random", seed=7, key=(1,)) for q in queries]
  assert mbeir.draw(4, 7, "instruction", "9:3") == mbeir.draw(4, 7, "instruction", "9:3")


def test_pick_positive():
  q = mbeir.parse_query({"qid": "6:1", "query_txt": "q", "query_img_path": "i.jpg",
                         "query_modality": "image,text", "pos_cand_list": ["5:3", "6:2", "6:9"],
                         "task_id": 6})
  assert mbeir.pick_positive(q, shuffle=False) == "5:3"
  assert mbeir.pick_positive(q, shuffle=False, same_dataset=True) == "6:2"  # seed EVAL filter
  picks = [mbeir.pick_positive(q, seed=1, key=(step,)) for step in range(100)]
  assert picks == [mbeir.pick_positive(q, seed=1, key=(step,)) for step in range(100)]
  assert set(picks) == {"5:3", "6:2", "6:9"}
  assert {mbeir.pick_positive(q, seed=1, key=(s,), same_dataset=True) for s in range(50)} == {"6:2", "6:9"}


# ---------------------------------------------------------------------------
# Mini M-BEIR: counts and consistency
# ---------------------------------------------------------------------------
def test_mini_counts(mini):
  names = ["mscoco_task0", "webqa_task1", "mscoco_task3", "nights_task4", "fashioniq_task7",
           "cirr_task7", "oven_task8"]
  assert [s.name for s in mini.eval_sets("test")] == names  # seed report order
  assert [s.name for s in mini.eval_sets("val")] == names
  pool_sizes = {"mscoco_task0": 16, "mscoco_task3": 19}
  for split, n_q in (("test", 6), ("val", 3)):
    for name in names:
      es = mini.load_eval_set(name, split, check_images=False)
      assert len(es.queries) == n_q and es.queries.stats["skipped"] == 0
      assert set(es.qrels.relevant) == {q.qid for q in es.queries}
      for q in es.queries:
        assert es.qrels.relevant[q.qid] == q.pos_cand_list and es.qrels.task_ids[q.qid] == q.task_id
        assert q.task_id == es.spec.task_id and q.modality == mbeir.TASKS[q.task_id][0]
        for did in q.pos_cand_list + q.neg_cand_list:
          assert es.pool.get(did).modality == mbeir.TASKS[q.task_id][1]
      if split == "test":
        assert len(es.pool) == pool_sizes.get(name, 24)
  assert len(mini.load_eval_set("mscoco_task0", "val", check_images=False).pool) == 8
  assert len(mini.instructions().table) == 7


def test_mini_union_pools(mini):
  local = [mini.load_eval_set(s.name, "test", check_images=False).pool for s in mini.eval_sets("test")]
  union = mini.global_pool("test")
  assert len(union) == 155 == sum(len(p) for p in local)
  np.testing.assert_array_equal(union.ids, np.sort(np.concatenate([p.ids for p in local])))
  assert all(union.get(c.did).raw == c.raw for p in local for c in p)  # the same lines, did order
  union_eval = mini.load_eval_set("cirr_task7", "test", pool="union", check_images=False)
  assert len(union_eval.pool) == 155
  # Val pool: trimmed to the candidates the union val queries name (seed --generate_union_val_data).
  val_q = mini.queries("query/union_val/mbeir_union_val.jsonl", check_images=False)
  named = {d for q in val_q for d in q.pos_cand_list + q.neg_cand_list}
  assert len(val_q) == 21 and {mbeir.unhash_did(h) for h in mini.global_pool("val").ids} == named
  # Union train: up-sampled (repeated qids kept), all positives in the train pool.
  train, pool = mini.union_train(), mini.global_pool("train")
  assert len(train) == 85 and len(np.unique(train.ids)) == 56 and train.stats["skipped"] == 0
  counts = {}
  for q in train:
    counts[mbeir.DATASET_NAMES[int(q.dataset_id)]] = counts.get(mbeir.DATASET_NAMES[int(q.dataset_id)], 0) + 1
    assert all(pool.index_of(d) is not None for d in q.pos_cand_list + q.neg_cand_list)
  assert counts == {"MSCOCO": 16, "WebQA": 25, "NIGHTS": 12, "FashionIQ": 12, "CIRR": 12, "OVEN": 8}


def test_mini_generator_is_deterministic(tmp_path):
  make_mbeir_mini.write_mini(tmp_path)
  bundled = mbeir.mini_root()
  files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
  assert files == sorted(p.relative_to(bundled) for p in bundled.rglob("*") if p.is_file())
  for f in files:
    assert (tmp_path / f).read_bytes() == (bundled / f).read_bytes(), f
  assert sum((bundled / f).stat().st_size for f in files) < 200_000


def test_mini_images_and_missing_images(tmp_path, mini):
  es = mbeir.MBEIR(mini.root, image_root=tmp_path).load_eval_set("cirr_task7", "test")
  assert es.queries.stats["missing_images"] == 6 and es.pool.stats["missing_images"] == 24
  assert list(es.queries.missing_image_rows) == list(range(6))
  assert es.queries.stats["missing_image_examples"][0].startswith("mbeir_images/cirr_images/")
  counts = make_mbeir_mini.write_mini_images(mini.root, tmp_path)
  assert counts == {"written": len(make_mbeir_mini.image_paths(mini.root)), "existing": 0}
  assert make_mbeir_mini.write_mini_images(mini.root, tmp_path)["written"] == 0
  es = mbeir.MBEIR(mini.root, image_root=tmp_path).load_eval_set("cirr_task7", "test")
  assert es.queries.stats["missing_images"] == 0 and es.pool.stats["missing_images"] == 0
  path = tmp_path / es.queries[0].img_path
  from PIL import Image
  with Image.open(path) as im:
    assert im.format == "JPEG" and im.size == (64, 64)
  assert make_mbeir_mini.synthetic_image("a/red_star_1.jpg").tobytes() == \
      make_mbeir_mini.synthetic_image("a/red_star_1.jpg").tobytes()
  full = mbeir.MBEIR(make_mbeir_mini.make_mini_root(tmp_path / "root"))  # annotations + images
  assert full.load_eval_set("oven_task8", "val").pool.stats["missing_images"] == 0


# ---------------------------------------------------------------------------
# Malformed input
# ---------------------------------------------------------------------------
def _q(**kw):
  row = {"qid": "9:1", "query_txt": "t", "query_img_path": None, "query_modality": "text",
         "query_src_content": None, "pos_cand_list": ["9:2"], "neg_cand_list": [], "task_id": 0}
  row.update(kw)
  return json.dumps(row)


def test_malformed_query_lines(tmp_path):
  lines = [_q(), "{not json", "[1, 2]", _q(qid=5), _q(qid="x:1"), _q(qid="1:500000"),
           _q(pos_cand_list=[]), _q(task_id=True), _q(query_modality="video"), _q(query_txt=3),
           json.dumps({"qid": "9:3", "query_modality": "text", "pos_cand_list": ["9:2"]}),
           _q(pos_cand_list=["9:2", "a:b"]), "", _q(qid="9:4", neg_cand_list=None),
           _q()]  # the last repeats qid 9:1
  path = tmp_path / "q.jsonl"
  path.write_text("\n".join(lines) + "\n")
  recs = mbeir.JsonlRecords(path, "query")
  assert [q.qid for q in recs] == ["9:1", "9:4"]
  assert recs.stats["skipped"] == 12 and recs.stats["bad_lines"] == [2, 3, 4, 5, 6]
  assert recs.stats["skip_reasons"] == {
      "json": 1, "not_object": 1, "type:qid": 1, "bad_id:qid": 2, "empty:pos_cand_list": 1,
      "type:task_id": 1, "bad_modality:query_modality": 1, "type:query_txt": 1,
      "missing:task_id": 1, "bad_id:pos_cand_list": 1, "duplicate_id": 1}
  assert recs.stats["duplicate_examples"] == ["9:1"]
  assert recs[1].neg_cand_list == () and recs.get("9:4").qid == "9:4" and recs.get("9:9") is None
  assert len(mbeir.JsonlRecords(path, "query", unique=False)) == 3  # union train keeps repeats
  assert pickle.loads(pickle.dumps(recs))[0].to_json() == json.loads(lines[0])


def test_malformed_candidates_qrels_and_missing_files(tmp_path):
  good = {"did": "8:456", "txt": None, "img_path": "a.jpg", "modality": "image",
          "src_content": "{\"id\": \"dev-7-2-img1\"}"}
  path = tmp_path / "pool.jsonl"
  path.write_text("\n".join([json.dumps(good), json.dumps({**good, "did": None}),
                             json.dumps({**good, "did": "8:1", "txt": 4}),
                             json.dumps({"did": "8:2", "modality": "text", "txt": "x"})]) + "\n")
  pool = mbeir.JsonlRecords(path, "candidate")
  assert [c.did for c in pool] == ["8:456", "8:2"] and pool[0].hashed_did == 80_000_456
  assert pool.stats["skip_reasons"] == {"type:did": 1, "type:txt": 1}
  assert pool.index_of(80_000_002) == 1 and mbeir.candidate_text(pool[1]) == "X."
  qrels = tmp_path / "qrels.txt"
  qrels.write_text("9:1 0 9:2 1 0\n9:1 0 9:3 0 0\n9:1 0 9:4 1 3\nbad line\n9:5 0 9:6 x 0\n\n")
  qr = mbeir.read_qrels(qrels)
  assert qr.relevant == {"9:1": ("9:2", "9:4")} and qr.task_ids == {"9:1": 0}
  assert qr.stats["skip_reasons"] == {"columns": 1, "not_int": 1}
  with pytest.raises(FileNotFoundError, match="expected the M-BEIR layout"):
    mbeir.read_qrels(tmp_path / "nope.txt")
  with pytest.raises(FileNotFoundError, match="not an M-BEIR root"):
    mbeir.MBEIR(tmp_path)
  with pytest.raises(ValueError, match="check_images needs image_root"):
    mbeir.JsonlRecords(path, "candidate", check_images=True)


# ---------------------------------------------------------------------------
# Recall@K, run files, UniRAG
# ---------------------------------------------------------------------------
def test_recall_by_task_hand_example():
  qrels = mbeir.Qrels({"q1": ("a",), "q2": ("b", "c"), "q3": ("d",), "q4": ("e",)},
                      {"q1": 0, "q2": 0, "q3": 3, "q4": 0})
  run = {"q1": ["x", "a", "y"], "q2": ["c", "x", "y"], "q3": ["x", "y", "z"], "q4": ["y", "x", "z"]}
  # q1: hit at rank 2; q2: hit at rank 1 (any positive counts); q3, q4: no hit.
  out = mbeir.recall_by_task(run, qrels, ks=(1, 2, 3))
  assert out == {0: {"Recall@1": 0.3333, "Recall@2": 0.6667, "Recall@3": 0.6667, "queries": 3},
                 3: {"Recall@1": 0.0, "Recall@2": 0.0, "Recall@3": 0.0, "queries": 1}}
  assert mbeir.recall_at_k([], ["a"], 1) == 0.0 and mbeir.recall_at_k(["a"], ["b", "a"], 1) == 0.0
  with pytest.raises(KeyError, match="q9"):
    mbeir.recall_by_task({"q9": ["a"]}, qrels)


def test_run_file_round_trip(tmp_path, mini):
  rid = mbeir.run_id("cirr_task7", "UNION", "test", 10)
  assert rid == "mbeir_cirr_task7_union_pool_test_k10"
  assert mbeir.run_id("mscoco_task0", "mscoco_task0_test", "val", 10) == "mbeir_mscoco_task0_single_pool_val_k10"
  results = [("8:1", ["8:3", "8:5"], np.array([0.5, 0.25], np.float32)),
             ("8:2", ["8:7", "8:1"], np.array([0.75, 0.1], np.float32))]
  path = tmp_path / f"{rid}_run.txt"
  mbeir.write_run_file(path, results, rid, {"8:1": 7, "8:2": 7})
  assert path.read_text().splitlines()[0] == f"8:1 Q0 8:3 1 0.5 {rid} 7"
  with open(path, "a") as f:
    f.write("garbage line\n")
  run = mbeir.read_run_file(path)
  assert run.ranked == {"8:1": ("8:3", "8:5"), "8:2": ("8:7", "8:1")}
  assert run.scores["8:2"] == (0.75, pytest.approx(0.1)) and run.task_ids == {"8:1": 7, "8:2": 7}
  assert run.run_ids == (rid,) and run.stats["skipped"] == 1
  es = mini.load_eval_set("cirr_task7", "test", check_images=False)
  rec = mbeir.unirag_record(es.queries[0], [es.pool[0], es.pool[1]], [None, es.pool[2]])
  assert rec["query"] == json.loads(es.queries.path.read_text().splitlines()[0])
  assert rec["candidates"][1] == es.pool[1].to_json() and rec["complement_candidates"][0] is None
