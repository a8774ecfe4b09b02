"""`slimtune ui` end to end in a real browser (Debian's chromium, driven by Playwright): start a
tiny run from the page, watch its progress and loss curve move, stop and resume it, then ask the playground."""

import json
import re

import pytest
import torch
from helpers import CHART_LINE_PIXELS, browser_page, save_char_model, served, sums, write_jsonl

pytestmark = pytest.mark.browser


def test_train_watch_and_ask_from_the_browser(tmp_path):
    model_dir = tmp_path / "models" / "tiny"
    save_char_model(model_dir, initializer_range=0.3)
    data = tmp_path / "data"
    data.mkdir()
    rows = sums(49)
    write_jsonl(data / "train.jsonl", rows[:40])
    write_jsonl(data / "test.jsonl", rows[40:])

    with served(tmp_path) as url, browser_page() as page:
        page.set_default_timeout(20_000)
        page.goto(url)
        page.select_option("#model-select", "models/tiny")
        assert page.locator("#data-select option[value='data/train.jsonl']").count() == 1
        page.set_input_files("#data-upload", str(data / "train.jsonl"))  # saved under uploads/
        page.wait_for_selector("#preview-format:text('completion')")
        assert page.input_value("#data-path") == "uploads/train.jsonl"
        assert "40 rows" in page.inner_text("#preview")
        page.fill("#eval-path", "data/test.jsonl")

        page.wait_for_selector("#memory:has-text('fits in')")
        before = page.inner_text("#memory")
        settings = {"rank": "4", "lr": "0.01", "batch_size": "2", "grad_accum": "1",
                    "epochs": "20", "eval_every": "100", "save_every": "10",
                    "max_new_tokens": "3", "threads": "1"}  # fmt: skip
        for key, value in settings.items():
            page.fill(f"[data-key={key}]", value)
        page.select_option("[data-key=method]", "lora")
        page.wait_for_function(f"document.getElementById('memory').innerText != {before!r}")
        page.fill("#run-name", "tiny-run")
        page.click("#start")

        # 400 steps: far more than a fast machine runs between seeing step 12 and the stop below,
        # so the stop always lands mid-run.
        # The Runs tab follows the run: a step part-way while it trains, the curve drawn.
        page.wait_for_selector("#run-title:text('tiny-run')")
        page.wait_for_function(
            """() => {
              const m = document.getElementById('run-step').innerText.match(/^(\\d+) \\/ 400$/);
              const badge = document.getElementById('run-state-badge');
              return m && +m[1] >= 12 && +m[1] < 400 && badge.innerText == 'running';
            }""",
            timeout=60_000,
        )
        page.wait_for_function(f"({CHART_LINE_PIXELS})() > 40")
        early_curve = page.evaluate(CHART_LINE_PIXELS)
        assert re.fullmatch(r"\d+", page.inner_text("#run-tps"))
        assert page.inner_text("#run-eta") != "–"
        assert page.inner_text("#run-loss") != "–"

        # Stop it (Ctrl-C to the training process), then resume from its last checkpoint.
        page.click("#run-stop")
        page.wait_for_selector("#run-state-badge:text('stopped')")
        stopped_at = int(page.inner_text("#run-step").split()[0])
        assert 12 <= stopped_at < 400
        page.wait_for_selector("#run-resume:enabled")
        page.click("#run-resume")
        page.wait_for_selector("#run-state-badge:text('finished')", timeout=300_000)
        assert page.inner_text("#run-step") == "400 / 400"
        assert page.evaluate(CHART_LINE_PIXELS) > early_curve  # the curve grew
        evals = page.locator("#eval-table tr")
        assert evals.count() == 21  # header + the end of each of the 20 epochs
        assert evals.nth(20).inner_text().startswith("400")
        records = (tmp_path / "runs" / "tiny-run" / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(r)["step"] for r in records if "loss" in json.loads(r)]
        assert steps == list(range(1, 401))  # the resumed run took over at its checkpoint

        # The playground: the base and the adapter side by side, then a chat turn.
        page.click("#tab-play")
        page.check("#play-adapters input[data-name='tiny-run']")
        page.fill("#play-max", "6")
        page.fill("#play-prompt", "2+3=")
        page.click("#play-send")
        page.wait_for_function("document.querySelectorAll('.answer-text').length == 2")
        labels = page.locator(".answer h3").all_inner_texts()
        answers = page.locator(".answer-text").all_inner_texts()
        assert labels == ["base", "tiny-run"]
        assert answers[1] == greedy(model_dir, tmp_path / "runs" / "tiny-run", "2+3=", 6)
        assert answers[0] == greedy(model_dir, None, "2+3=", 6)

        page.select_option("#play-mode", "chat")
        page.fill("#play-prompt", "1+1=")
        page.click("#play-send")
        page.wait_for_selector(".msg.assistant")
        assert page.locator(".msg.user").inner_text().endswith("1+1=")


def greedy(model_dir, adapter, prompt: str, max_tokens: int) -> str:
    """The oracle: transformers' own greedy generate on the same model (and adapter)."""
    from slimtune.lora import load_adapter
    from slimtune.models import load_model

    model, tokenizer = load_model(str(model_dir))
    if adapter is not None:
        load_adapter(model, str(adapter))
    ids = torch.tensor([tokenizer(prompt).input_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) or "(empty)"
