"""BIG-bench social_iqa (from the bigbench source archive) as lm-eval multiple-choice JSONL."""

from __future__ import annotations

import json
import random
import tarfile
from pathlib import Path
from typing import Any

from gradmap.assets.fetch import AssetError, file_sha256, log

SOCIAL_IQA_JSON = "bigbench-1.0.0/bigbench/benchmark_tasks/social_iqa/task.json"  # member of the archive
SOCIAL_IQA_SEED = 1234

def convert_social_iqa(task: dict[str, Any], seed: int = SOCIAL_IQA_SEED) -> list[dict[str, Any]]:
    """BIG-bench task.json -> multiple-choice records, shuffled once with `seed` so `limit=N` is a fixed subset."""
    records = []
    for idx, ex in enumerate(task["examples"]):
        choices = list(ex["target_scores"])
        correct = [i for i, c in enumerate(choices) if ex["target_scores"][c] == 1]
        if len(correct) != 1:
            raise AssetError(f"social_iqa example {idx} has {len(correct)} choices scored 1, expected exactly 1")
        records.append({"idx": idx, "question": ex["input"].strip(), "choices": choices, "label": correct[0]})
    random.Random(seed).shuffle(records)
    return records


def build_social_iqa(tar_path: Path, out_dir: Path, member: str = SOCIAL_IQA_JSON, source: str = "") -> int:
    """Stream `member` (social_iqa's task.json) out of the bigbench source archive -> `test.jsonl`, `meta.json`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    task = None
    # Streaming mode ("r|gz") reads the archive once front to back without extracting anything else.
    with tarfile.open(tar_path, "r|gz") as tar:
        for info in tar:
            if info.name == member:
                fh = tar.extractfile(info)
                task = json.load(fh) if fh is not None else None
                break
    if task is None:
        raise AssetError(f"{tar_path.name} has no member {member!r}")
    records = convert_social_iqa(task)
    with open(out_dir / "test.jsonl", "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    meta = {"source": source or tar_path.name, "sha256": file_sha256(tar_path), "member": member,
            "count": len(records), "seed": SOCIAL_IQA_SEED,
            "order": "shuffled with random.Random(seed); `idx` is the position in task.json"}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"social_iqa: {len(records)} examples")
    return len(records)
