"""What the commands print and write: plain aligned text tables (compare, prepare, train, plan, the
benchmarks) and, when asked, the same figures as a JSON file.

>>> print(format_table(["arm", "rows"], [["padding", 359], ["bfd-cross", 168.0]]))
      arm  rows
---------  ----
  padding   359
bfd-cross   168
"""

from __future__ import annotations

import json
from pathlib import Path


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain aligned text table; floats get 4 significant digits."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def write_json(result, path: str) -> None:
    """Write the figures to path (its folder is made), and say so."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {path}")
