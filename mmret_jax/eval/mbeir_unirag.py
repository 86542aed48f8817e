"""UniRAG records of the M-BEIR pipeline (`python -m mmret_jax.eval.mbeir score --unirag`).

Seed: `src/common/mbeir_retriever.py` (`get_raw_retrieved_candidates`, `raw_retrieval: true`) and
`src/common/interactive_retriever.py`; shared/reference/uniir.md "UniRAG mode".

`OUT/retrieved_candidates/<run_id>_retrieved.jsonl`, one line per query in run-file order:
`{"query": <query line>, "candidates": [<top-k candidate lines>]}` plus, with complements,
`"complement_candidates": [...]` (`mbeir.unirag_record`, written with `json.dumps` defaults as the seed's
`json.dump`). Candidate lines come from the local pool files (the UNION pool's records are the
local pools' records; a did is looked up in the pools in the seed's order).

Complements (the seed's `retrieve_image_text_pairs: true`): every retrieved candidate whose modality
is "text" or "image" becomes a query of that modality (its txt / img_path) asking for the other one,
with qid "9:<n>" (n = 1, 2, ... per run file) so that it gets an MSCOCO instruction (text -> image or
image -> text, `--instructions` as for the eval queries); it is embedded with the model and searched
in the same pool with k = 10 under the pipeline's tie rule. The complement is the first result of the
wanted modality whose img_path is set and differs from the original query's query_img_path, or whose
txt is set and differs from its query_txt; otherwise null. Candidates of modality "image,text" get
no entry, so the list can be shorter than "candidates", as in the seed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from mmret_jax.data.sources import mbeir
from mmret_jax.eval import mbeir_store as store
from mmret_jax.eval.retrieval import l2_normalize

COMPLEMENT = {"text": "image", "image": "text"}
COMPLEMENT_K = 10
COMPLEMENT_DATASET_ID = 9  # MSCOCO: its instructions cover text -> image and image -> text
BLOCK = 256  # queries per block (bounds the complement queries embedded at once)


class CandidateLookup:
  """did -> `mbeir.Candidate` from one or more pool files (first pool that has it)."""

  def __init__(self, pools: Sequence[mbeir.JsonlRecords]):
    self.pools = list(pools)

  def get(self, did: str) -> mbeir.Candidate:
    for p in self.pools:
      c = p.get(did)
      if c is not None:
        return c
    raise KeyError(f"candidate {did} is in a run file but in none of the pools {[str(p.path) for p in self.pools]}")


def complement_queries(cands: Sequence[mbeir.Candidate], start: int) -> list[mbeir.Query]:
  """The seed's complement queries of the text-only / image-only candidates, qids 9:<start>, ..."""
  out = []
  for c in cands:
    if c.modality in COMPLEMENT:
      want = COMPLEMENT[c.modality]
      out.append(mbeir.Query(f"{COMPLEMENT_DATASET_ID}:{start + len(out)}", c.text, c.img_path, c.modality, (), (),
                             mbeir.get_task_id(c.modality, want), None))
  return out


def pick_complement(query: mbeir.Query, wanted: str, results: Sequence[mbeir.Candidate]) -> mbeir.Candidate | None:
  """Seed rule: the first result of modality `wanted` with an img_path other than the query's
  query_img_path, or a txt other than its query_txt."""
  for c in results:
    if c.modality != wanted:
      continue
    if c.img_path and c.img_path != query.img_path:
      return c
    if c.text and c.text != query.text:
      return c
  return None


def write_all(plan, encoder=None, log=print) -> list[str]:
  """Writes the records of every (set, pool) run of `plan` (an `eval.mbeir.Plan`); with an encoder,
  also the complements. Returns the files written."""
  from mmret_jax.eval import mbeir as pipeline  # pylint: disable=import-outside-toplevel
  from mmret_jax.eval.mbeir import mbeir_pool, mbeir_queries  # pylint: disable=import-outside-toplevel
  data, args = plan.data, plan.args
  out_dir = plan.out / "retrieved_candidates"
  out_dir.mkdir(parents=True, exist_ok=True)
  fwd = store.Forward(encoder, args.batch_size) if encoder is not None else None
  instr = data.instructions() if encoder is not None and args.instructions != "none" else None
  written = []
  for g in plan.pool_groups():
    lookup = CandidateLookup([mbeir_pool(data, n) for n in g.names])
    emb = searcher = None
    if fwd is not None:
      emb, searcher = pipeline.open_pool(plan, g, args.backend)
    for spec, pool in g.members:
      run = mbeir.read_run_file(plan.run_path(spec, pool))
      queries = mbeir_queries(data, spec.name, plan.split, check_images=False)
      path = out_dir / f"{plan.run_id(spec, pool)}_retrieved.jsonl"
      tmp = path.with_name(path.name + ".tmp")
      qids, n_comp, found = list(run.ranked), 0, 0
      with open(tmp, "w", encoding="utf-8") as f:
        for b0 in range(0, len(qids), BLOCK):
          block = [(queries.get(q), [lookup.get(d) for d in run.ranked[q]]) for q in qids[b0:b0 + BLOCK]]
          if any(q is None for q, _ in block):
            raise KeyError(f"a query of {plan.run_path(spec, pool).name} is not in {queries.path}")
          comps = None
          if fwd is not None:
            comps = _complements(block, fwd, instr, args, data.image_root, emb, searcher, lookup, n_comp + 1)
            n_comp += sum(len(c) for c in comps)
            found += sum(x is not None for c in comps for x in c)
          for i, (q, cands) in enumerate(block):
            f.write(json.dumps(mbeir.unirag_record(q, cands, None if comps is None else comps[i])) + "\n")
      os.replace(tmp, path)
      written.append(str(path))
      log(f"unirag: {path.name} ({len(qids)} queries" + (f", {found} of {n_comp} complements found)" if fwd else ")"))
  return written


def _complements(block, fwd, instr, args, image_root, emb, searcher, lookup: CandidateLookup,
                 start: int) -> list[list]:
  """Complement candidates (or None) of each query's text / image candidates in a block."""
  from mmret_jax.eval import mbeir as pipeline  # pylint: disable=import-outside-toplevel
  per_query, cq = [], []
  for _, cands in block:
    qs = complement_queries(cands, start + len(cq))
    per_query.append(qs)
    cq += qs
  if not cq:
    return [[] for _ in block]
  items = [store.item_inputs(q, image_root, instr, args.instructions, args.seed) for q in cq]
  x = l2_normalize(fwd([t for t, _ in items], [p for _, p in items]))
  _, top = pipeline.rank(searcher, emb, x, COMPLEMENT_K)
  out, pos = [], 0
  for (query, _), qs in zip(block, per_query):
    row = []
    for q in qs:
      results = [lookup.get(mbeir.unhash_did(h)) for h in emb.ids[top[pos]]]
      row.append(pick_complement(query, mbeir.TASKS[q.task_id][1], results))
      pos += 1
    out.append(row)
  return out
