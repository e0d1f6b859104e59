"""Where the research scripts write their rows: ``$OUT/<stem>.json`` (the measuring machine's
output folder), else the current folder, with the run's environment."""

from __future__ import annotations

import json
import os

from macopt.bench import timing


def write_rows(stem: str, rows: list[dict]) -> None:
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump({"environment": timing.environment("cuda"), "rows": rows}, f, indent=1)
