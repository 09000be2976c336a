"""Markdown rows for docs/PERFORMANCE.md from `benchmarks.decode --json` outputs (the last line of each file).

    python -m benchmarks.performance_table out/bf16.log out/4bit.log
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = (
    ("size", "size"), ("gpu", "device"), ("dtype", "dtype"), ("quant", "quant"), ("expert_path", "experts"),
    ("graphs", "graphs"), ("decode_tok_s", "decode tok/s"), ("decode_tok_s_plain", "plain tok/s"),
    ("speedup", "speed-up"), ("ttft_ms", "TTFT ms"), ("mask_ms", "<SEG>→mask ms"),
    ("followup_prefill_ms", "follow-up ms (reuse)"), ("followup_prefill_ms_plain", "follow-up ms (full)"),
    ("peak_mem_gb", "peak GB"), ("weight_bytes_per_token", "weight bytes/token"), ("hbm_gbps", "copy GB/s"),
    ("roofline_fraction", "of roofline"), ("graph_breaks", "graph breaks"), ("matches_plain", "matches plain"),
    ("token_agreement_vs_unquantized", "token agreement vs unquantised"),
    ("mask_iou_vs_unquantized", "mask IoU vs unquantised"), ("date", "date"),
)


def last_json(path: Path) -> dict[str, object]:
    for line in reversed(path.read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"{path} holds no JSON line: did the benchmark run to its end? (see the log)")


def cell(row: dict[str, object], key: str) -> str:
    value = row.get(key)
    if key == "gpu" and value is None:
        return str(row.get("device", ""))
    if key == "weight_bytes_per_token" and isinstance(value, int):
        return f"{value / 1e9:.2f} GB" if value > 1e8 else f"{value / 1e6:.2f} MB"
    return "–" if value is None else str(value)


def table(rows: list[dict[str, object]]) -> str:
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(cell(r, key) for key, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print(table([last_json(Path(p)) for p in sys.argv[1:]]))


if __name__ == "__main__":
    main()
