"""A data file as the trainer will read it: the detected format, the first rows, the bad rows."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from slimtune.data import BadRow, detect_format
from slimtune.data.reading import read_records
from slimtune.errors import SlimtuneError


def preview(path: Path, limit: int = 5, max_bad: int = 20) -> dict[str, Any]:
    """Rows, format and problems of `path`; each problem names its line (or row)."""
    try:
        records, unreadable = read_records(path, skip_bad_rows=True)
    except SlimtuneError as error:  # the file as a whole (missing, unknown type, not JSON)
        return {"ok": False, "error": str(error), "rows": [], "bad": [], "count": 0}
    bad: list[dict[str, str]] = []
    if unreadable:
        # The reader names the first unreadable row in its error; read once more to get it.
        try:
            read_records(path)
        except BadRow as error:
            bad.append({"where": _where(str(error)), "error": str(error)})
    formats: Counter[str] = Counter()
    good = []
    for record in records:
        try:
            formats[detect_format(record.row)] += 1
            good.append(record)
        except BadRow as error:
            bad.append({"where": record.where, "error": f"{record.where}: {error}"})
    fmt = formats.most_common(1)[0][0] if formats else None
    mixed = [f for f in formats if f != fmt]
    return {
        "ok": bool(good) and not bad,
        "format": fmt,
        "other_formats": mixed,
        "count": len(records),
        "unreadable": unreadable,
        "rows": [{"where": r.where, "row": r.row} for r in good[:limit]],
        "bad": bad[:max_bad],
        "bad_count": len(bad) - (1 if unreadable else 0) + unreadable,
        "error": None if good else "no usable rows",
    }


def _where(message: str) -> str:
    return message.split(": ", 1)[0]
