"""The one place that turns results into text for people (and JSON for machines)."""

from __future__ import annotations

import json
from typing import Any

from .merge import MergeResult


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def merge_text(result: MergeResult) -> str:
    m = result.manifest
    merged = {k: v for k, v in m["tensors"].items() if v.get("adapters")}
    replaced = [k for k, v in m["tensors"].items() if "replaced_by_adapter" in v]
    size = sum(f["size"] for f in m["output"]["files"])
    lines = [
        f"merged {len(m['adapters'])} adapter(s) into {m['base']['path']}",
        f"  output      {result.output}  ({len(m['output']['files'])} shard(s), {human_bytes(size)}, dtype {m['output']['dtype']})",
        f"  tensors     {len(merged)} changed by LoRA deltas, {len(replaced)} replaced (modules_to_save / biases)",
    ]
    casts = [v["cast"] for v in merged.values() if v.get("cast") and v["cast"]["error_norm_rel_to_delta"] is not None]
    if casts:
        worst = max(c["error_norm_rel_to_delta"] for c in casts)
        unchanged = max(c["unchanged_after_cast_fraction"] or 0.0 for c in casts)
        lines.append(
            f"  cast        worst ‖cast error‖/‖ΔW‖ = {worst:.3g}; worst share of elements the cast returned to their base value = {unchanged:.2%}"
        )
    for note in m["notes"]:
        lines.append(f"  note        {note}")
    lines.append(f"  manifest    {result.output / 'lora_export.json'}  ({m['seconds']:.1f} s)")
    return "\n".join(lines)


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)
