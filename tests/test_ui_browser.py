"""The standalone app in a real browser: scan a dataset, train on the embedded model, use the LoRA and the
Tools; while a run trains, clicks and the API answer within 1 s and a page reload follows the run again.

Starts `python -m lib_lora ui` on a free loopback port and drives Debian's Chromium with
Playwright (never a downloaded browser). Screenshots of each state go to $LIB_LORA_SCREENSHOTS
(default: the test's tmp folder). With $LIB_LORA_DOCS_SCREENSHOTS=docs the training test also writes
the README's pictures there: 1280 px wide, cut to the part of the page they show, 256 colours
(`LIB_LORA_DOCS_SCREENSHOTS=docs python -m pytest -q tests/test_ui_browser.py`). Skipped when gradio,
playwright or /usr/bin/chromium is missing; .ci/run installs all three.
"""

import base64
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")

ROOT = Path(__file__).resolve().parents[1]
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]
START_TIMEOUT_S, TRAIN_TIMEOUT_S = 90, 150
VIEWPORT = {"width": 1280, "height": 900}  # also the README pictures' width: both columns side by side, small as PNG
HEADER = ".train-lora-header"  # the standalone app's first line; it names this test's tmp folders, so pictures start below it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the app exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the app did not answer within {START_TIMEOUT_S} s:\n{log.read_text()}")


@pytest.fixture
def app(tmp_path):
    port = free_port()
    log = tmp_path / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "lib_lora", "ui", "--port", str(port), "--out-dir", str(tmp_path / "out")],
                                   cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_server(url, process, log)
        yield url, tmp_path / "out"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("LIB_LORA_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def docs() -> Path | None:
    """Where the README's pictures go, or None (not asked for)."""
    folder = os.environ.get("LIB_LORA_DOCS_SCREENSHOTS")
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder)


def page_box(page, selector: str) -> dict:
    """The element's box in page coordinates (bounding_box is relative to the scrolled viewport)."""
    box = page.locator(selector).first.bounding_box()
    return {**box, "y": box["y"] + page.evaluate("window.scrollY")}


def docs_shot(page, folder: Path | None, name: str, top: float, bottom: str, column: str | None = None) -> None:
    """Save the page from `top` (px) to the bottom of `bottom`, across `column` or the whole width, as folder/name.

    Quantised to 256 colours without dithering (flat UI colours stay exact) and saved with optimize=True:
    about a quarter of the RGB file, so docs/ stays small."""
    if folder is None:
        return
    page.wait_for_timeout(300)  # let images that just arrived finish drawing
    end = page_box(page, bottom)
    left, width = 0, VIEWPORT["width"]
    if column:
        box = page_box(page, column)
        left, width = max(0, box["x"] - 8), box["width"] + 16
    clip = {"x": left, "y": top, "width": width, "height": end["y"] + end["height"] + 8 - top}
    png = page.screenshot(full_page=True, clip=clip)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(folder / name, optimize=True)


def below_header(page) -> float:
    box = page_box(page, HEADER)
    return box["y"] + box["height"] + 2


def fill(page, elem_id: str, value) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(str(value))
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.press("Tab")


def image_bytes(page, selector: str) -> bytes:
    src = page.locator(selector).get_attribute("src")
    if src.startswith("data:"):
        return base64.b64decode(src.split(",", 1)[1])
    return page.request.get(src).body()  # Gradio 4 serves outputs as files


def generate(page, prompt: str, count: int) -> bytes:
    fill(page, "lora_app_prompt", prompt)
    page.click("#lora_app_generate")
    page.wait_for_function(f"document.querySelector('#lora_app_info') && document.querySelector('#lora_app_info').innerText.includes('#{count} ')",
                           timeout=60_000)
    return image_bytes(page, "#lora_app_image img")


def pick(page, elem_id: str, label: str) -> None:
    """Choose `label` in a dropdown; opening it refreshes its list (files written since the page loaded)."""
    page.click(f"#{elem_id} input")
    page.click(f"#{elem_id} li:has-text('{label}')", timeout=10_000)


def use_the_tools(page, out_dir: Path) -> None:
    """The Tools section on the trained file: inspect it, then resize it to rank 2 (a new file, its module report)."""
    page.click("#train_lora_sections button:has-text('Tools')")
    pick(page, "train_lora_inspect_file", "ui_test.safetensors")
    page.click("#train_lora_inspect_run")
    page.wait_for_selector("#train_lora_inspect_result pre", timeout=30_000)
    report = page.inner_text("#train_lora_inspect_result")
    assert "trigger phrase: zkz" in report and "architecture: " in report and "ranks: " in report
    page.click("#train_lora_tool_resize >> text=Resize a LoRA")
    pick(page, "train_lora_resize_file", "ui_test.safetensors")
    fill(page, "train_lora_resize_rank", 2)
    fill(page, "train_lora_resize_name", "ui_test_r2")
    page.click("#train_lora_resize_run")
    page.wait_for_function("document.querySelector('#train_lora_resize_result').innerText.includes('wrote ui_test_r2.safetensors')",
                           timeout=30_000)
    assert page.locator("#train_lora_resize_result tbody tr").count() > 10  # one row per module, with its error
    assert (out_dir / "lora" / "ui_test_r2.safetensors").is_file()


def answered_within(page, action, done: str, limit_s: float = 1.0) -> float:
    """Seconds from `action()` to the page showing `done` (a JS condition); fails beyond `limit_s`."""
    started = time.perf_counter()
    action()
    page.wait_for_function(done, timeout=10_000)
    elapsed = time.perf_counter() - started
    assert elapsed < limit_s, f"the page took {elapsed:.2f} s to answer while training"
    return elapsed


def progress_get_seconds(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url + "train-lora/v1/progress", timeout=5) as response:
        assert response.status == 200 and b'"status"' in response.read()
    return time.perf_counter() - started


def test_train_in_the_browser_then_generate_with_the_lora(app, shots, docs, tmp_path):
    from lib_lora.demo.dataset import make_lora_dataset

    url, out_dir = app
    dataset = make_lora_dataset(tmp_path / "dataset", concept="star", trigger="zkz", n_images=12, repeats=10)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(url)
        page.wait_for_selector("#train_lora_train", timeout=30_000)

        fill(page, "train_lora_train_data_dir", dataset)
        fill(page, "train_lora_trigger_words", "zkz")
        fill(page, "train_lora_num_class_images", 0)  # the step counts below are those of the dataset alone
        page.click("#train_lora_scan")
        page.wait_for_selector("#train_lora_report table", timeout=30_000)
        assert "12 images" in page.inner_text("#train_lora_report")
        assert "10_zkz" in page.inner_text("#train_lora_report")
        page.screenshot(path=shots / "1-dataset-report.png", full_page=True)
        docs_shot(page, docs, "tab-dataset.png", below_header(page), "#train_lora_main")

        page.click("#train_lora_sections button:has-text('Training')")
        fill(page, "train_lora_max_train_epochs", 2)  # 2 x 15 steps: a sample and a file after the first epoch
        fill(page, "train_lora_train_batch_size", 8)
        fill(page, "train_lora_resolution", 64)
        fill(page, "train_lora_output_name", "ui_test")
        fill(page, "train_lora_save_every_n_epochs", 1)
        page.click("#train_lora_group_samples >> text=Samples")
        fill(page, "train_lora_sample_every_n_epochs", 1)
        fill(page, "train_lora_sample_prompts", "a zkz star --s 10 --d 1")
        page.wait_for_function("document.querySelector('#train_lora_summary').innerText.includes('30 steps')", timeout=15_000)

        page.click("#train_lora_train")
        page.wait_for_selector("#train_lora_chart svg polyline", timeout=TRAIN_TIMEOUT_S * 1000)
        progress = page.inner_text("#train_lora_progress")
        assert "step " in progress and "/30" in progress and "ETA" in progress
        page.screenshot(path=shots / "2-training.png", full_page=True)
        if docs:
            page.wait_for_selector("#train_lora_samples img", timeout=TRAIN_TIMEOUT_S * 1000)
            docs_shot(page, docs, "tab-training.png", below_header(page), "#train_lora_log")
        page.wait_for_selector("#train_lora_progress [data-status='finished']", timeout=TRAIN_TIMEOUT_S * 1000)
        page.wait_for_timeout(500)
        assert "step 30/30" in page.inner_text("#train_lora_progress")
        page.wait_for_selector("#train_lora_samples img", timeout=10_000)
        page.screenshot(path=shots / "3-finished.png", full_page=True)
        assert (out_dir / "lora" / "ui_test.safetensors").is_file()

        page.click("#train_lora_after >> text=Compare epochs and keep one")
        fill(page, "train_lora_cmp_prompt", "a zkz star")
        page.click("#train_lora_cmp_run")
        page.wait_for_selector("#train_lora_cmp_grid img", timeout=60_000)  # rows: epoch 1, final; columns: weights
        after = page_box(page, "#train_lora_after")["y"]
        docs_shot(page, docs, "tab-finished.png", after, "#train_lora_cmp_grid", column="#train_lora_run")

        use_the_tools(page, out_dir)
        page.screenshot(path=shots / "4-tools.png", full_page=True)

        page.click("button:has-text('txt2img')")
        without = generate(page, "a zkz star <lora:ui_test:0>", 1)
        with_lora = generate(page, "a zkz star <lora:ui_test:1>", 2)  # last, so the panel (and its picture) shows the LoRA's image
        page.screenshot(path=shots / "5-txt2img.png", full_page=True)
        docs_shot(page, docs, "txt2img.png", below_header(page), "#tab_lora_txt2img")
        browser.close()
    assert with_lora != without


def test_queue_two_runs_from_the_tab_they_finish_in_order(app, shots, tmp_path):
    from lib_lora.demo.dataset import make_lora_dataset

    url, out_dir = app
    dataset = make_lora_dataset(tmp_path / "dataset", concept="star", trigger="zkz", n_images=4, repeats=1)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_selector("#train_lora_queue_add", timeout=30_000)
        assert "The queue is empty" in page.inner_text("#train_lora_queue")
        fill(page, "train_lora_train_data_dir", dataset)
        page.click("#train_lora_sections button:has-text('Training')")
        fill(page, "train_lora_resolution", 64)
        fill(page, "train_lora_train_batch_size", 1)
        fill(page, "train_lora_max_train_epochs", 10)  # 40 steps: time to queue and edit the others
        fill(page, "train_lora_output_name", "first")
        page.click("#train_lora_queue_add")
        page.wait_for_function("document.querySelector('#train_lora_queue_note').innerText.includes('first started')", timeout=15_000)
        page.wait_for_selector("#train_lora_progress [data-status='running']", timeout=TRAIN_TIMEOUT_S * 1000)
        refused = "document.querySelector('#train_lora_run_note').innerText.includes('first is training, so no second run was started')"
        train_s = answered_within(page, lambda: page.click("#train_lora_train"), refused)  # a click answered while training: no second run
        api_s = progress_get_seconds(url)
        assert api_s < 1.0, f"GET /progress took {api_s:.2f} s while training"
        page.click("button:has-text('txt2img')")
        busy = "document.querySelector('#lora_app_info').innerText.includes('the model is busy')"
        generate_s = answered_within(page, lambda: page.click("#lora_app_generate"), busy)  # training and generation take turns
        print(f"while training: second Train refused in {train_s:.2f} s, GET /progress {api_s:.3f} s, Generate refused in {generate_s:.2f} s")
        page.click("button:has-text('Train LoRA')")

        fill(page, "train_lora_max_train_epochs", 1)
        for name in ("second", "third"):
            fill(page, "train_lora_output_name", name)
            page.click("#train_lora_queue_add")
            page.wait_for_function(f"document.querySelector('#train_lora_queue_note').innerText.includes('queued {name}')", timeout=15_000)
        page.click("#train_lora_queue_job input")  # opening the list refreshes it from the queue
        page.click("#train_lora_queue_job li:has-text('third')", timeout=10_000)
        page.click("#train_lora_queue_up")
        page.wait_for_function("document.querySelector('#train_lora_queue_note').innerText.includes('third is now job 1 of 2')", timeout=15_000)
        rows = page.locator("#train_lora_queue tbody tr").all_inner_texts()
        assert [row.split("\t")[1] for row in rows] == ["third", "second"]
        page.screenshot(path=shots / "6-queue.png", full_page=True)
        page.click("#train_lora_queue_remove")
        page.wait_for_function("document.querySelector('#train_lora_queue_note').innerText.includes('removed third')", timeout=15_000)
        assert "third" not in page.inner_text("#train_lora_queue")

        page.reload()  # the page re-attaches: its poller follows the run and the queue to their end
        page.wait_for_selector("#train_lora_progress [data-status='running'], #train_lora_progress [data-status='finished']", timeout=15_000)
        page.screenshot(path=shots / "7-reloaded.png", full_page=True)
        ended = "document.querySelector('#train_lora_queue').innerText.includes('second finished')"
        page.wait_for_function(ended, timeout=2 * TRAIN_TIMEOUT_S * 1000)
        assert "first finished \u00b7 second finished" in page.inner_text("#train_lora_queue")
        assert "The queue is empty" in page.inner_text("#train_lora_queue")
        page.wait_for_selector("#train_lora_progress [data-status='finished']", timeout=10_000)
        assert "second" in page.inner_text("#train_lora_progress") and "step 4/4" in page.inner_text("#train_lora_progress")
        page.screenshot(path=shots / "8-queue-done.png", full_page=True)
        browser.close()
    first, second = out_dir / "lora" / "first.safetensors", out_dir / "lora" / "second.safetensors"
    assert first.is_file() and second.is_file() and not (out_dir / "lora" / "third.safetensors").exists()
    assert first.stat().st_mtime < second.stat().st_mtime
