"""Run every benchmark in this folder, one after the other (`make bench`).

Each benchmark measures slimtune side by side with its peer in one run and writes its own
report; this script only runs them in turn and stops at the first failure.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    scripts = sorted(p for p in HERE.glob("bench_*.py"))
    for script in scripts:
        print(f"=== {script.name}", flush=True)
        result = subprocess.run([sys.executable, str(script)], cwd=HERE.parent)
        if result.returncode != 0:
            print(f"{script.name} failed with exit code {result.returncode}", file=sys.stderr)
            return result.returncode
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
