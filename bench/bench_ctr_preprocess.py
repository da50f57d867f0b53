"""Peak memory and speed of `cowclip_ctr.py --preprocess criteo` on a synthetic Criteo-format TSV.

    OMP_NUM_THREADS=1 python bench/bench_ctr_preprocess.py                    # 0.25M and 1M rows
    OMP_NUM_THREADS=1 python bench/bench_ctr_preprocess.py --rows 1000000,4000000

Writes a Criteo Kaggle `train.txt` look-alike (label, I1-I13, C1-C26 as 8-hex ids with Zipf frequencies and
per-field missing rates, see cowclip_ctr.make_synthetic), runs the preprocessing of each size in a fresh
subprocess, and reports its peak RSS (ru_maxrss), rows/s and the distinct ids it kept. The projection to the
full file (45,840,617 rows, 33,762,577 distinct ids: facebookresearch/dlrm Kaggle cardinalities) is derived,
not measured: peak = the largest run's peak + 9 B per further row (the split arrays) + bytes/id per further
id, with bytes/id measured by tracemalloc on the vocabulary structures preprocess() builds.
Writes out/bench/bench_ctr_preprocess.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cowclip_ctr as cc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CRITEO_ROWS, CRITEO_IDS = 45_840_617, sum(cc.CRITEO_CARDS)
RAM_GB = 24  # this machine's memory


def write_tsv(path: str, rows: int, seed: int = 0, chunk: int = 200_000) -> None:
    rng = np.random.default_rng(seed)
    salt = rng.integers(1, 2**31, size=26)
    with open(path, "w") as f:
        for lo in range(0, rows, chunk):
            n = min(chunk, rows - lo)
            cols = [np.where(rng.random(n) < 0.256, "1", "0")]
            for j in range(13):
                x = np.floor(np.exp(rng.normal(np.log(cc.INT_MEDIAN[j] + 1), 1.3, n))).astype(np.int64) - (j == 1)
                s = x.astype(str)
                s[rng.random(n) < cc.INT_MISSING[j]] = ""
                cols.append(s)
            for c, card in enumerate(cc.CRITEO_CARDS):
                # Zipf ids (exponent as in make_synthetic), hashed to 32 bits like Criteo's hex ids
                a = 1.1 if card > 1_000_000 else 1.3 if card > 50_000 else 1.2
                k = rng.zipf(a, n) % card if card < 1_000 else rng.zipf(a, n)
                h = (k.astype(np.uint64) * np.uint64(2654435761) + np.uint64(salt[c])) % np.uint64(2**32)
                s = np.char.mod("%08x", h)
                s[rng.random(n) < cc.CAT_MISSING.get(c, 0.0)] = ""
                cols.append(s)
            f.write("\n".join("\t".join(r) for r in zip(*cols)) + "\n")


CHILD = """
import resource, sys, time
sys.path.insert(0, {root!r})
import cowclip_ctr as cc
t = time.perf_counter()
meta = cc.preprocess(cc.Config(preprocess="criteo", raw={raw!r}, data={data!r}))
print("RESULT", time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, sum(meta["field_dims"]))
"""


def measure(raw: str, data: str) -> dict:
    code = CHILD.format(root=ROOT, raw=raw, data=data)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    secs, kb, ids = out.strip().splitlines()[-1].split()[1:]
    return {"seconds": float(secs), "peak_rss_mb": int(kb) / 1024, "distinct_ids": int(ids)}


def vocab_bytes_per_id(n: int = 1_000_000) -> float:
    """tracemalloc bytes per distinct id of preprocess()'s vocabulary structures for one field: the count dict
    (8-hex str -> int), the sorted vocabulary list and the lookup dict (str -> int), alive together at its peak."""
    import tracemalloc

    keys = np.char.mod("%08x", np.random.default_rng(0).choice(2**32, n, replace=False)).tolist()
    tracemalloc.start()
    counts = {}
    for k in keys:
        s = "".join(k)  # a fresh str object per id, as the row parser makes
        counts[s] = counts.get(s, 0) + 1000  # counts above 256 are separate int objects
    vocab = sorted(counts)
    lookup = {t: i for i, t in enumerate(vocab)}
    used = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del counts, vocab, lookup
    return used / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="250000,1000000")
    p.add_argument("--out", default="out/bench")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.rows.split(",")]:
            raw = os.path.join(tmp, f"train_{n}.txt")
            t = time.time()
            write_tsv(raw, n)
            print(f"wrote {n:,} rows ({os.path.getsize(raw) / 2**20:.0f} MiB, {time.time() - t:.0f}s)", flush=True)
            r = {"rows": n, "raw_mib": os.path.getsize(raw) / 2**20, **measure(raw, os.path.join(tmp, f"data_{n}"))}
            r["rows_per_s"] = n / r["seconds"]
            results.append(r)
            os.remove(raw)
            print(
                f"{n:,} rows: peak RSS {r['peak_rss_mb']:,.0f} MB, {r['rows_per_s']:,.0f} rows/s (both passes), "
                f"{r['distinct_ids']:,} ids",
                flush=True,
            )
    proj = None
    if results:
        b = results[-1]
        # the growth with size: the per-row arrays of the split (int8 `which` + int64 permutation, 9 B/row, from
        # the code) and the vocabulary structures per distinct id, measured directly with tracemalloc (a fit of
        # RSS between two small sizes is dominated by the interpreter, torch and allocator slack)
        per_row, per_id = 9.0, vocab_bytes_per_id()
        peak = (
            b["peak_rss_mb"] * 2**20 + per_row * (CRITEO_ROWS - b["rows"]) + per_id * (CRITEO_IDS - b["distinct_ids"])
        )
        proj = {
            "bytes_per_id": per_id,
            "bytes_per_row": per_row,
            "projected_peak_gb": peak / 1e9,
            "projected_hours": CRITEO_ROWS / b["rows_per_s"] / 3600,
            "ram_gb": RAM_GB,
        }
    print("\n| rows | raw MiB | distinct ids | peak RSS (MB) | rows/s (2 passes) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['rows']:,} | {r['raw_mib']:,.0f} | {r['distinct_ids']:,} | {r['peak_rss_mb']:,.0f} | "
            f"{r['rows_per_s']:,.0f} |"
        )
    if proj:
        print(
            f"projection (derived) for full Criteo, {CRITEO_ROWS:,} rows and {CRITEO_IDS:,} ids: "
            f"{proj['bytes_per_id']:.0f} B/id -> peak {proj['projected_peak_gb']:.1f} GB "
            f"({'over' if proj['projected_peak_gb'] > RAM_GB else 'under'} {RAM_GB} GB), "
            f"{proj['projected_hours']:.1f} h at the measured rows/s"
        )
    os.makedirs(args.out, exist_ok=True)
    name = os.path.join(args.out, "bench_ctr_preprocess.json")
    with open(name + ".tmp", "w") as f:
        json.dump({"results": results, "projection": proj}, f, indent=2)
    os.replace(name + ".tmp", name)
    print(f"bench done -> {name}")


if __name__ == "__main__":
    main()
