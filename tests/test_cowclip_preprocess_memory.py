"""Preprocessing memory at small scale: the two growth rates the full-Criteo projection in docs/cowclip_ctr.md
rests on (bench/bench_ctr_preprocess.py): O(1) Python memory per raw row (rows are streamed; the split arrays
are 9 B a row) and ~190 B per distinct id (count dict, sorted list, lookup dict).

tracemalloc sees Python objects and numpy buffers. The same 2,000 rows written once and four times over have the
same distinct ids, so the difference of the two traced peaks is the per-row cost alone; a structure kept per
raw row (parsed rows held between the two passes: ~1 KB a row) breaks its budget 15 times over."""

import importlib.util
import os
import sys
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cowclip_ctr as cc  # noqa: E402

spec = importlib.util.spec_from_file_location("bench_ctr_preprocess", ROOT / "bench" / "bench_ctr_preprocess.py")
B = importlib.util.module_from_spec(spec)
spec.loader.exec_module(B)

PER_ROW, PER_ID = 64, 250  # budgets: 7x the split arrays' 9 B a row; 1.8x the 137 B an id traced here


def traced_peak(raw: Path, data: Path) -> tuple[int, dict]:
    tracemalloc.start()
    try:
        meta = cc.preprocess(cc.Config(preprocess="criteo", raw=str(raw), data=str(data)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, meta


def test_preprocess_memory_per_row_and_per_id_within_the_projection_budgets(tmp_path):
    once, four = tmp_path / "once.txt", tmp_path / "four.txt"
    B.write_tsv(str(once), 2_000, seed=0)
    four.write_text(once.read_text() * 4)
    p1, m1 = traced_peak(once, tmp_path / "d1")
    p4, m4 = traced_peak(four, tmp_path / "d4")
    os.remove(four)
    ids = sum(m1["field_dims"])
    assert sum(m4["field_dims"]) == ids and ids > 10_000  # the same vocabulary, many ids
    assert p4 - p1 <= PER_ROW * 6_000, (p1, p4)  # 6,000 more rows, no more ids
    assert p1 <= PER_ID * ids + 4 * 2**20, (p1, ids)  # the per-id cost, with 4 MiB of fixed slack
