"""Take the screenshots in docs/ui.md: the demo fine-tune (SmolLM2 on the bundled date data)
started, watched, asked and exported through `slimtune ui` in headless chromium.

    python tests/ui_screenshots.py docs/images            # some minutes on a CPU
    python tests/ui_screenshots.py docs/images WORK_DIR   # again, on WORK_DIR's finished run
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from helpers import CHART_LINE_PIXELS, browser_page, served

from slimtune.data import demo_data_path

RUN = "dates-qlora"
SYSTEM = "Write the date as YYYY-MM-DD."
PROMPT = "Shipped October 24th, 2019, arrived late."


def main(out: Path, work: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if work is None:
        work = Path(tempfile.mkdtemp(prefix="slimtune-ui-shots-"))
        (work / "data").mkdir()
        for split in ("train", "test"):
            shutil.copy(demo_data_path(split), work / "data" / f"dates-{split}.jsonl")
    with served(work) as url, browser_page() as page:
        page.set_default_timeout(1_800_000)
        page.goto(url)
        if not (work / "runs" / RUN / "adapter_model.safetensors").is_file():
            train(page, out)
        playground(page, out)
        export(page, out)
    print(f"screenshots in {out}; the run in {work}")


def train(page, out: Path) -> None:
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
    page.fill("#run-name", RUN)
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


def playground(page, out: Path) -> None:
    page.click("#tab-play")
    page.check(f"#play-adapters input[data-name='{RUN}']")
    page.fill("#play-max", "16")
    page.fill("#play-system", SYSTEM)
    page.fill("#play-prompt", PROMPT)
    page.click("#play-send")
    page.wait_for_function("document.querySelectorAll('.answer-text').length == 2")
    page.screenshot(path=out / "ui-playground.png", full_page=True)


def export(page, out: Path) -> None:
    page.click("#tab-export")
    page.wait_for_selector("#export-run option", state="attached")
    for kind, row in [("nf4", 2), ("survival", 3)]:
        if page.inner_text(f"#export-status tr:nth-child({row}) .badge") == "none":
            page.click(f"#export-buttons button[data-kind={kind}]")
    page.wait_for_selector("#export-status tr:nth-child(3) .badge:text('done')")
    page.wait_for_selector("#export-status tr:nth-child(2) .badge:text('done')")
    page.wait_for_timeout(1200)
    page.screenshot(path=out / "ui-export.png", full_page=True)


if __name__ == "__main__":
    main(
        Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images"),
        Path(sys.argv[2]) if len(sys.argv) > 2 else None,
    )
