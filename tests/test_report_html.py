"""report.html: one self-contained page, checked in a real headless browser (Debian's chromium via playwright):
it loads without console errors, every image decodes, the runs table sorts, and the numbers shown are report.csv's."""

import csv
import json
import re
import shutil

import pytest
import torch

from conftest import REPO
from dng_cli import cli
from dng_cli.html_report import NUMBER_COLUMNS

COMPARE = REPO / "docs" / "results" / "matched_safety" / "mnist_ccfg_pilot_bam"


@pytest.fixture
def folder(tmp_path):
    """A committed compare (real metrics.json files, compare.md/png) plus two fixture runs with sample grids and
    one failed job."""
    from dng_cli.plots import save_grid

    root = tmp_path / "runs"
    shutil.copytree(COMPARE, root / "compare")
    shutil.copy(COMPARE / "compare.md", root / "compare.md")  # the folder itself holds a compare
    shutil.copy(COMPARE / "compare.png", root / "compare.png")
    for name, scale, rate, fid in (("sweep/np", 0.5, 0.04, 7.5), ("sweep/dng", 10.0, 0.005, 6.25)):
        run = root / name
        run.mkdir(parents=True)
        m = {"method": name.split("/")[1], "forbidden": [0], "guidance_scale": scale, "forbidden_rate": rate,
             "forbidden_rate_ci": [rate / 2, rate * 2], "kl_uniform": 0.05, "kl_kept": 0.03, "fid": fid, "fid_se": 0.4,
             "fid_full": fid + 1, "fid_features": "classifier-abc", "n_samples": 200, "steps": 50, "images_per_s": 2.5,
             "fingerprint": f"fp-{name}"}
        (run / "metrics.json").write_text(json.dumps(m))
        save_grid(torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8), run / "samples.png", nrow=4)
    bad = root / "sweep" / "sld"
    (bad / ".hydra").mkdir(parents=True)
    (bad / ".hydra" / "config.yaml").write_text("{}")
    (bad / "error.txt").write_text("sampler.backend=tensorrt is invalid\n")
    cli.main(["report", str(root)])
    return root


def _csv(root):
    return {r["run"]: r for r in csv.DictReader((root / "report.csv").open())}


def test_the_page_is_self_contained_and_complete(folder):
    page = (folder / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # nothing fetched from anywhere
    runs = _csv(folder)
    assert len(runs) >= 30 and all(f'data-run="{run}"' in page for run in runs)
    assert "Matched safety (dng compare)" in page and "ccfg − dng" in page and "inconclusive at N = 500" in page
    assert "sampler.backend=tensorrt is invalid" in page and page.count("<figure>") == 2


def test_the_page_in_a_real_browser(folder, browser):
    page = browser.new_page()
    errors = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto((folder / "report.html").as_uri())
    assert errors == []
    # decode() rejects for an image the browser cannot decode in full (naturalWidth alone passes a truncated PNG)
    widths = page.evaluate("""Promise.all(Array.from(document.images).map(i =>
        i.decode().then(() => [i.alt, i.naturalWidth], () => [i.alt, 0])))""")
    assert len(widths) == 5 and all(w > 0 for _, w in widths), widths  # 2 fronts, compare.png, 2 sample grids
    # the numbers shown are report.csv's (to the 4 significant digits shown), row by row
    runs = _csv(folder)
    cells = page.evaluate("""Array.from(document.querySelectorAll('#runs tbody tr')).map(tr =>
        [tr.dataset.run, Array.from(tr.querySelectorAll('td[data-col]')).map(td =>
            [td.dataset.col, td.textContent, td.dataset.value])])""")
    assert {run for run, _ in cells} == set(runs)
    digits = {col: d for col, _, d in NUMBER_COLUMNS}
    checked = 0
    for run, row in cells:
        for col, text, value in row:
            if col in ("run", "label"):
                assert text == runs[run][col]
            elif text:  # the cell's value is the csv's (6 digits there); the text shows it to the column's digits
                assert float(value) == pytest.approx(float(runs[run][col]), rel=1e-5), (run, col)
                assert float(text) == pytest.approx(float(runs[run][col]), rel=10 ** (1 - digits[col])), (run, col)
                checked += 1
            else:
                assert runs[run][col] == ""
    assert checked > 200

    def column(col):
        return page.evaluate(f"""Array.from(document.querySelectorAll('#runs tbody td[data-col="{col}"]'))
            .map(td => td.dataset.value)""")

    # sorting: a click on FID sorts ascending (empty cells last), a second click descending
    page.click("#runs th:text-is('FID')")
    fids = [float(v) for v in column("fid") if v]
    assert fids == sorted(fids) and len(fids) == len(runs)
    page.click("#runs th:text-is('FID')")
    fids = [float(v) for v in column("fid") if v]
    assert fids == sorted(fids, reverse=True)
    page.click("#runs th:text-is('run')")
    names = column("run")
    assert names == sorted(names, key=str.lower) or names == sorted(names)
    assert errors == []  # nor while sorting
    page.close()


def test_the_committed_compare_renders_and_gives_the_readme_its_screenshot(tmp_path, browser):
    """report.html of a committed compare alone (docs/results/matched_safety/mnist_ccfg_pilot_bam): no console
    errors, every image decodes, the claims are on the page. With DNG_SCREENSHOT=<png> the page is photographed
    there (the README's picture: DNG_SCREENSHOT=docs/images/report.png pytest tests/test_report_html.py -k committed)."""
    import os

    root = tmp_path / "compare"
    shutil.copytree(COMPARE, root)
    cli.main(["report", str(root)])
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto((root / "report.html").as_uri())
    widths = page.evaluate("Promise.all(Array.from(document.images).map(i => i.decode().then(() => i.naturalWidth)))")
    assert widths and all(w > 0 for w in widths) and errors == []
    assert "ccfg − dng" in page.content()
    if os.environ.get("DNG_SCREENSHOT"):
        page.screenshot(path=os.environ["DNG_SCREENSHOT"], full_page=False)
    page.close()
