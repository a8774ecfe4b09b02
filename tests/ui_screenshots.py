"""Take the screenshots in docs/ui.md: the demo fine-tune (SmolLM2 on the bundled date data)
started, watched, asked and exported through `slimtune ui` in headless chromium.

    python tests/ui_screenshots.py docs/images    # a few minutes on a CPU
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from ui_browser import CHART_LINE_PIXELS, browser_page, served

from slimtune.data import demo_data_path

PROMPT = "Shipped October 24th, 2019, arrived late."


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="slimtune-ui-shots-"))
    (work / "data").mkdir()
    for split in ("train", "test"):
        shutil.copy(demo_data_path(split), work / "data" / f"dates-{split}.jsonl")
    with served(work) as url, browser_page() as page:
        page.set_default_timeout(600_000)
        page.goto(url)
        page.select_option("#data-select", "data/dates-train.jsonl")
        page.wait_for_selector("#preview-format")
        page.fill("#eval-path", "data/dates-test.jsonl")
        settings = {"rank": "16", "alpha": "32", "lr": "0.001", "max_steps": "30",
                    "batch_size": "8", "grad_accum": "1", "max_length": "128",
                    "eval_every": "10", "save_every": "10", "max_new_tokens": "12",
                    "threads": "2"}  # fmt: skip
        for key, value in settings.items():
            page.fill(f"[data-key={key}]", value)
        page.select_option("[data-key=lr_scheduler]", "cosine")
        page.fill("#run-name", "dates-qlora")
        page.wait_for_timeout(1500)
        page.screenshot(path=out / "ui-new-run.png", full_page=True)

        page.click("#start")
        page.wait_for_function(
            "() => (document.getElementById('run-step').innerText.match(/^(\\d+) \\//) || [0, 0])[1] >= 14"
        )
        page.wait_for_function(f"({CHART_LINE_PIXELS})() > 40")
        page.screenshot(path=out / "ui-runs.png", full_page=True)
        page.wait_for_selector("#run-state-badge:text('finished')")
        page.wait_for_timeout(1200)
        page.screenshot(path=out / "ui-runs-finished.png", full_page=True)

        page.click("#tab-play")
        page.check("#play-adapters input[data-name='dates-qlora']")
        page.fill("#play-max", "16")
        page.fill("#play-prompt", PROMPT)
        page.click("#play-send")
        page.wait_for_function("document.querySelectorAll('.answer-text').length == 2")
        page.screenshot(path=out / "ui-playground.png", full_page=True)

        page.click("#tab-export")
        page.wait_for_selector("#export-run option")
        page.click("#export-buttons button[data-kind=nf4]")
        page.click("#export-buttons button[data-kind=survival]")
        page.wait_for_selector("#export-status tr:nth-child(3) .badge:text('done')")
        page.wait_for_selector("#export-status tr:nth-child(2) .badge:text('done')")
        page.wait_for_timeout(1200)
        page.screenshot(path=out / "ui-export.png", full_page=True)
    print(f"screenshots in {out}; the run in {work}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images"))
