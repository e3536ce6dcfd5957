"""Score the demo's cleaned output against its world's ground truth.

Precision for a corruption kind is computed as ``flagged of that kind / (flagged of that
kind + flagged clean texts)``: the precision of the filter on the clean texts plus that
kind's texts, so it depends on how common each kind is (15% of web texts each here).
A web text is "flagged" when the filter does not keep it.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from pipelines.world import Scene, Shape, is_true_of

KINDS = ("swap", "attribute", "boilerplate")
TARGETS = {
    "swap_precision": 0.9, "swap_recall": 0.9, "boilerplate_precision": 0.9, "boilerplate_recall": 0.9,
    "attribute_recall": 0.6, "clean_wrongly_dropped": 0.10, "synthetic_kept_true": 0.8,
}


def load_rows(out_dir: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, "*.parquet"))):
        for row in pq.read_table(path).to_pylist():
            meta = json.loads(row["input_json"] or "{}")
            row["kind"] = meta.get("demo_kind")
            row["scene"] = Scene(tuple(Shape(*s) for s in meta.get("demo_shapes", [])))
            rows.append(row)
    return rows


def flag_metrics(rows: list[dict], flagged) -> dict[str, float]:
    by_kind = {k: [r for r in rows if r["kind"] == k] for k in (*KINDS, "clean")}
    flagged_clean = sum(flagged(r) for r in by_kind["clean"])
    result = {"clean_wrongly_dropped": flagged_clean / max(1, len(by_kind["clean"]))}
    for kind in KINDS:
        hits = sum(flagged(r) for r in by_kind[kind])
        result[f"{kind}_recall"] = hits / max(1, len(by_kind[kind]))
        result[f"{kind}_precision"] = hits / max(1, hits + flagged_clean)
    return result


def evaluate(web_dir: str, out_dir: str, threshold: float = 0.5) -> dict[str, Any]:
    rows = [r for r in load_rows(out_dir) if r["status"] != "error"]
    metrics: dict[str, Any] = {"threshold": threshold, "web_samples": len(rows),
                               "kinds": {k: sum(r["kind"] == k for r in rows) for k in (*KINDS, "clean")}}
    metrics.update(flag_metrics(rows, lambda r: not r["web_kept"]))
    synthetic = [(t, r["scene"]) for r in rows
                 for t, o in zip(r["kept_texts"], r["kept_origins"]) if o == "synthetic"]
    metrics["synthetic_kept"] = len(synthetic)
    metrics["synthetic_kept_true"] = sum(is_true_of(t, s) for t, s in synthetic) / max(1, len(synthetic))
    all_captions = [(c, r["scene"]) for r in rows for c in r["captions"]]
    metrics["synthetic_all_true"] = sum(is_true_of(c, s) for c, s in all_captions) / max(1, len(all_captions))
    metrics["images_kept"] = sum(r["status"] == "kept" for r in rows) / max(1, len(rows))
    corrupted = [r for r in rows if r["kind"] != "clean"]
    rescued = [r for r in corrupted if any(o == "synthetic" and is_true_of(t, r["scene"])
                                           for t, o in zip(r["kept_texts"], r["kept_origins"]))]
    metrics["corrupted_images"] = len(corrupted)
    metrics["corrupted_rescued_by_true_caption"] = len(rescued) / max(1, len(corrupted))
    metrics["by_threshold"] = {
        str(t): flag_metrics(rows, lambda r, t=t: r["web_score"] is None or r["web_score"] < t)
        for t in sorted({0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, threshold})
    }
    metrics["targets"] = {name: {"target": goal, "value": metrics[name],
                                 "met": metrics[name] <= goal if name == "clean_wrongly_dropped"
                                 else metrics[name] >= goal}
                          for name, goal in TARGETS.items()}
    return metrics


def print_table(m: dict[str, Any]) -> None:
    print(f"\ncapfilt demo: the filter against the ground truth (threshold {m['threshold']:.2f})")
    print(f"  {'web text corrupted by':<24}{'count':>7}{'precision':>11}{'recall':>9}")
    for kind in KINDS:
        print(f"  {kind:<24}{m['kinds'][kind]:>7}{m[kind + '_precision']:>11.3f}{m[kind + '_recall']:>9.3f}")
    print(f"  clean web texts wrongly dropped: {m['clean_wrongly_dropped']:.3f} of {m['kinds']['clean']}")
    print(f"  kept synthetic captions true of their image: {m['synthetic_kept_true']:.3f} "
          f"({m['synthetic_kept']} kept; {m['synthetic_all_true']:.3f} of all sampled)")
    print(f"  images kept: {m['images_kept']:.3f}; corrupted images rescued by a true caption: "
          f"{m['corrupted_rescued_by_true_caption']:.3f}")
    print("  targets: " + ", ".join(f"{k} {'met' if v['met'] else 'MISSED'} ({v['value']:.3f} vs {v['target']})"
                                    for k, v in m["targets"].items()))
    at_half = m["by_threshold"]["0.5"]
    print(f"  at BLIP's 0.5 instead: clean dropped {at_half['clean_wrongly_dropped']:.3f}; " + ", ".join(
        f"{k} P {at_half[k + '_precision']:.3f} R {at_half[k + '_recall']:.3f}" for k in KINDS))
    if "seconds" in m:
        print(f"  total time: {m['seconds']:.0f} s")
