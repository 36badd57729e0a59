"""The studio in a real browser (Playwright driving Debian's chromium; `.ci/run` installs it): launch a tiny
run from the form and watch its curve gain points, stop it, resume it, open its adapter's provenance, be
refused a second launch into its folder, see a bad value refused with the CLI's message, chat with a run's
adapter beside its base and see the answers stream, and start a compare report from its form and open its
heatmap.

Set DELTATUNE_SCREENSHOTS=FOLDER to keep a screenshot of each page (the README's come from here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import free_port
from train_helpers import instruction_rows, write_jsonl

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.subprocess, pytest.mark.slow]
GUARD_S = 900  # hang guard only: every wait below ends on an event
sync_api.expect.set_options(timeout=GUARD_S * 1000)


def _chromium() -> str:
    found = (
        os.environ.get("DELTATUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("no chromium on a CI machine: .ci/run installs it with apt-get install chromium")
    pytest.skip("no chromium here: apt-get install chromium (or set DELTATUNE_CHROMIUM)")


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    port = free_port()
    with (root.parent / "studio.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "deltatune", "studio", "--runs", str(root), "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + GUARD_S
        while True:
            assert process.poll() is None, (root.parent / "studio.log").read_text()
            try:
                if httpx.get(url + "/api/runs").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the studio did not start"
            time.sleep(0.2)
        try:
            yield root, url
        finally:
            process.terminate()
            process.wait(timeout=60)


@pytest.fixture(scope="module")
def page(studio):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium())
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(GUARD_S * 1000)
        yield context.new_page()
        browser.close()


def _shot(page, name: str) -> None:
    folder = os.environ.get("DELTATUNE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=False)


def _number(page, selector: str, attribute: str | None = None) -> int:
    """An integer the page shows (0 while the page is between loads)."""
    try:
        node = page.locator(selector)
        text = node.get_attribute(attribute, timeout=2000) if attribute else node.text_content(timeout=2000)
        return int(text or 0)
    except (sync_api.Error, ValueError):
        return 0


def _until(page, condition, what: str):
    deadline = time.monotonic() + GUARD_S
    while not (value := condition()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        page.wait_for_timeout(100)  # the page polls its run each second; this only re-reads the DOM
    return value


def _fill_launch(page, model: Path, data: Path, out: str, **extra: str) -> None:
    page.goto(page.url.split("/runs")[0].split("/launch")[0] + "/launch")
    fields = {
        "model.path": str(model), "data.train": str(data), "data.max_length": "64",
        "adapter.settings": "r: 4\nlora_alpha: 8\ntarget_modules: all-linear", "training.max_steps": "100000",
        "training.batch_size": "4", "training.log_every": "1", "training.checkpoint_every": "3",
        "eval.every": "4", "eval.batch_size": "8", "output_dir": out, **extra,
    }  # fmt: skip
    for name, value in fields.items():
        page.fill(f'[name="{name}"]', value)
    page.select_option('[name="data.format"]', "instruction")
    page.select_option('[name="training.progress"]', "False")


def test_launch_watch_stop_resume_and_provenance(studio, page, tiny_causal_lm, tmp_path):
    root, url = studio
    data = write_jsonl(tmp_path / "train.jsonl", instruction_rows(80, 0))
    page.goto(url + "/launch")
    _fill_launch(page, tiny_causal_lm, data, "tiny")
    sync_api.expect(page.locator("#preview")).to_contain_text("max_steps: 100000")  # the YAML it will run
    _shot(page, "launch")
    page.click("#start")
    page.wait_for_url(f"{url}/runs/tiny")
    sync_api.expect(page.locator("#status")).to_have_text("running")
    first = _until(
        page, lambda: _number(page, "#curve-loss", "data-points") >= 3 and _number(page, "#steps"), "3 points"
    )
    _until(page, lambda: _number(page, "#steps") > first + 2, "the curve to gain points")  # live, no reload
    _until(page, lambda: (root / "tiny" / "adapter" / "deltatune.json").is_file(), "the first kept adapter")
    _shot(page, "run-live")

    page.click("#stop")
    sync_api.expect(page.locator("#status")).to_have_text("killed")
    stopped_at = _number(page, "#steps")
    assert stopped_at > first and (root / "tiny" / "checkpoints").is_dir()
    sync_api.expect(page.locator("#resume")).to_be_visible()

    page.click("#resume")
    sync_api.expect(page.locator("#status")).to_have_text("running")
    _until(page, lambda: _number(page, "#steps") > stopped_at, "the resumed run to pass the stop")

    second = page.context.new_page()  # a second launch into the live run's folder is refused
    second.goto(url + "/launch")
    _fill_launch(second, tiny_causal_lm, data, "tiny")
    second.click("#start")
    sync_api.expect(second.locator("#error")).to_contain_text("being written by a running trainer")
    second.close()

    page.reload()
    page.click("#provenance summary")
    sync_api.expect(page.locator("#provenance pre")).to_contain_text("data_sha256")
    sync_api.expect(page.locator("#provenance pre")).to_contain_text('"peft_type": "LORA"')
    page.click("#stop")
    sync_api.expect(page.locator("#status")).to_have_text("killed")

    page.goto(url + "/")
    row = page.locator('tr[data-run="tiny"]')
    sync_api.expect(row.locator(".status")).to_have_text("killed")
    sync_api.expect(row).to_contain_text("lora")


def test_a_bad_value_shows_the_command_lines_message(studio, page, tiny_causal_lm, tmp_path):
    root, url = studio
    data = write_jsonl(tmp_path / "train.jsonl", instruction_rows(20, 0))
    page.goto(url + "/launch")
    _fill_launch(page, tiny_causal_lm, data, "bad", **{"training.max_steps": "-5"})
    sync_api.expect(page.locator("#preview-error")).to_contain_text("training.max_steps")  # as you type
    page.click("#start")
    message = page.locator("#error").text_content()
    config = tmp_path / "bad.yaml"
    shown = (root / "bad" / "launch.yaml").exists()
    assert not shown  # nothing was written
    import yaml

    from deltatune.studio.form import raw_config

    values = {"model.path": str(tiny_causal_lm), "data.train": str(data), "data.max_length": "64",
              "data.format": "instruction", "adapter.settings": "r: 4\nlora_alpha: 8\ntarget_modules: all-linear",
              "training.max_steps": "-5"}  # fmt: skip
    config.write_text(yaml.safe_dump(raw_config(values) | {"output_dir": str(root / "bad")}))
    cli = subprocess.run(
        [sys.executable, "-m", "deltatune", "train", str(config)], capture_output=True, text=True
    )
    said = cli.stderr.strip().split("error: ", 1)[1]
    assert cli.returncode == 2 and message.strip() == said.replace(
        str(config), str(root / "bad" / "launch.yaml")
    )
    _shot(page, "launch-error")


def test_chat_with_a_runs_adapter_streams_its_answer(studio, page, tiny_causal_lm, tmp_path):
    """From a run's page to the playground: its base loads, its adapter is ticked, and a message streams an
    answer into the base's column and the adapter's, each what the same chat asked without streaming gets."""
    import yaml
    from serve_helpers import saved_lora_adapters

    root, url = studio
    saved_lora_adapters(tiny_causal_lm, tmp_path, {"adapter": (4, "all-linear")}, b_std=0.5)
    (root / "chatty").mkdir()
    shutil.move(tmp_path / "adapter", root / "chatty" / "adapter")
    config = {"model": {"path": str(tiny_causal_lm)}, "data": {"system_prompt": "be brief"}}
    (root / "chatty" / "config.yaml").write_text(yaml.safe_dump(config))

    page.goto(url + "/runs/chatty")
    page.click("#chat")
    sync_api.expect(page.locator("#base-state")).to_have_text("ready")
    sync_api.expect(page.locator('[data-adapter="chatty"]')).to_be_checked()
    sync_api.expect(page.locator("#system")).to_have_value("be brief")  # the run's own system prompt
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "12")
    page.fill("#message", "good day to you")
    page.click("#send")
    answers = {}
    for model in (str(tiny_causal_lm), "chatty"):
        bubble = page.locator(f'.column[data-model="{model}"] .turn.assistant')
        sync_api.expect(bubble).to_have_attribute("data-finish", re.compile(r"stop|length"))
        answers[model] = (
            bubble.locator(".text").text_content(),
            int(bubble.get_attribute("data-chunks") or 0),
        )

    token = page.locator('meta[name="studio-token"]').get_attribute("content")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "good day to you"}]
    for model, (text, chunks) in answers.items():
        body = {"model": model, "messages": messages, "max_tokens": 12, "temperature": 0}
        reply = httpx.post(url + "/playground/api/v1/chat/completions", json=body,
                           headers={"x-studio-token": token}, timeout=GUARD_S)  # fmt: skip
        assert reply.status_code == 200 and text == reply.json()["choices"][0]["message"]["content"]
        assert chunks > 1  # it came in pieces
    assert answers["chatty"][0] != answers[str(tiny_causal_lm)][0]


def test_start_a_compare_from_the_form_and_open_its_heatmap(studio, page, tiny_causal_lm, tmp_path):
    """The reports page starts `deltatune compare` in its own process; its page follows the job to the end,
    and the report's heatmaps show the numbers compare.json holds."""
    import json

    import yaml
    from serve_helpers import saved_lora_adapters
    from train_helpers import causal_config

    root, url = studio
    saved_lora_adapters(tiny_causal_lm, tmp_path, {"adapter": (4, "all-linear")}, b_std=0.5)
    (root / "judged").mkdir()
    shutil.move(tmp_path / "adapter", root / "judged" / "adapter")
    (root / "judged" / "config.yaml").write_text(yaml.safe_dump({"model": {"path": str(tiny_causal_lm)}}))
    task = causal_config(tiny_causal_lm, write_jsonl(tmp_path / "t.jsonl", instruction_rows(40, 0)), tmp_path)
    task["eval"] = {"batch_size": 8, "metric": "loss"}
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(task))

    page.goto(url + "/reports")
    page.click("#new-compare")
    page.fill('[name="tasks"]', f"json={tmp_path / 'task.yaml'}")
    page.check('[data-run="judged"]')
    page.fill('[name="out"]', "reports/cmp")
    page.click("#start-report")
    page.wait_for_url(url + "/jobs/reports/cmp")
    sync_api.expect(page.locator("#job-status")).to_have_text("finished")  # the page reloads when it ends
    page.click("#open-report")
    page.wait_for_url(url + "/reports/reports/cmp")
    written = json.loads((root / "reports" / "cmp" / "compare.json").read_text())
    for entry in ("base", "judged"):
        cell = page.locator(f'#heatmap-headline tr[data-entry="{entry}"] td')
        sync_api.expect(cell).to_have_text(f"{written['headline'][entry]['json']:.4g}")
        sync_api.expect(cell).to_have_class(re.compile(r"heat b\d+"))
    gain = written["gain_vs_base"]["judged"]["json"]
    sync_api.expect(page.locator('#heatmap-gain tr[data-entry="judged"] td')).to_have_text(
        f"{gain + 0.0:+.4g}"
    )
    sync_api.expect(page.locator("img.report-picture")).to_have_attribute("src", re.compile("compare.png$"))
    _shot(page, "compare")
    page.goto(url + "/reports")
    sync_api.expect(page.locator('tr[data-report="reports/cmp"]')).to_contain_text("compare")
    _shot(page, "reports")


@pytest.mark.parametrize(
    ("kind", "form", "check"),
    [
        ("forgetting", {"texts": "8", "prompts": "2"}, ("#forgetting", "perplexity, base → adapted")),
        ("latency", {"batch_sizes": "1", "reps": "2"}, ("#latency", "merged")),
        ("sweep", {"trials": "2"}, ("#trials", "complete")),
    ],
)
def test_start_each_other_report_from_its_form(studio, page, tiny_causal_lm, tmp_path, kind, form, check):
    """Forgetting, latency and sweep start from their forms like compare, and their pages show what the
    command wrote (a sweep's trials link to their run pages)."""
    import yaml
    from serve_helpers import saved_lora_adapters
    from train_helpers import causal_config

    root, url = studio
    run = f"measured-{kind}"
    saved_lora_adapters(tiny_causal_lm, tmp_path, {"adapter": (4, "all-linear")}, b_std=0.5)
    (root / run).mkdir()
    shutil.move(tmp_path / "adapter", root / run / "adapter")
    (root / run / "config.yaml").write_text(yaml.safe_dump({"model": {"path": str(tiny_causal_lm)}}))
    if kind == "sweep":
        task = causal_config(
            tiny_causal_lm, write_jsonl(tmp_path / "t.jsonl", instruction_rows(40, 0)), tmp_path
        )
        task["training"] |= {"max_steps": 3}
        task["eval"] = {"batch_size": 8, "metric": "loss"}
        (tmp_path / "task.yaml").write_text(yaml.safe_dump(task))
        (tmp_path / "space.yaml").write_text("optim.lr: {float: [0.002, 0.01], log: true}\n")
        form = form | {"config": str(tmp_path / "task.yaml"), "space": str(tmp_path / "space.yaml")}

    page.goto(url + "/reports")
    page.click(f"#new-{kind}")
    if kind != "sweep":
        page.select_option('[name="run"]', run)
    for name, value in (form | {"out": f"reports/{kind}"}).items():
        page.fill(f'[name="{name}"]', value)
    page.click("#start-report")
    page.wait_for_url(f"{url}/jobs/reports/{kind}")
    sync_api.expect(page.locator("#job-status")).to_have_text("finished")
    sync_api.expect(page.locator("#command")).to_contain_text(f"--out {root / 'reports' / kind}")
    page.click("#open-report")
    table, text = check
    sync_api.expect(page.locator(table)).to_contain_text(text)
    sync_api.expect(page.locator("img.report-picture").first).to_be_visible()
    if kind == "sweep":
        sync_api.expect(page.locator("#trials tr[data-trial]")).to_have_count(2)
        page.click('#trials tr[data-trial="0"] a')
        page.wait_for_url(f"{url}/runs/reports/sweep/trials/0000")
        sync_api.expect(page.locator("#status")).to_have_text("finished")
        page.go_back()
    _shot(page, kind)
