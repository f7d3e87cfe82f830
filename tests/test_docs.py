"""The README and docs cannot drift from the code: every `dng …` command they show composes (and, where it names
no placeholder path, passes the command's validator); every relative link resolves; the figures quoted for the
shipped assets equal their cards; the published matched-safety table is regenerated from its committed files."""

import json
import re
import shlex
from pathlib import Path

import pytest

from dng_cli import UserError, cli, validate
from dng_cli.spec import SHIPPED

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "dng_cli" / "assets").glob("*/README.md"))]
PLACEHOLDERS = ("/my/", "/models/", "outputs/train/", "<", "/path/")  # a reader's own files: compose only
REFUSED = {"dng sample method.p_max=1.0", "dng evaluate -m n_samples=-3"}  # shown as examples of bad input


def shown_commands() -> list[tuple[str, str]]:
    """(page, command line) of every `dng …` line in a bash block (continuations joined, comments dropped)."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            text = block.replace("\\\n", " ")
            for line in text.splitlines():
                line = line.split(" # ", 1)[0].split("  #", 1)[0].strip()
                if "dng " in line and not line.startswith("#"):
                    cmd = line[line.index("dng "):] if not line.startswith("dng ") else line
                    if cmd.startswith("dng ") and not cmd.startswith("dng_"):
                        found.append((page.relative_to(REPO).as_posix(), cmd))
        for span in re.findall(r"`(dng [^`]+)`", page.read_text()):  # examples in tables and text
            if "|" not in span and "…" not in span and "<" not in span and span not in ("dng train",):
                found.append((page.relative_to(REPO).as_posix(), span))
    return list(dict.fromkeys(found))


COMMANDS = shown_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 40 and {c.split()[1] for _, c in COMMANDS} >= {
        "evaluate", "sample", "calibrate", "compare", "plan", "report", "train", "data", "sd"}


@pytest.mark.parametrize("page, line", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_every_shown_command_composes(page, line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative run folders land here, never in the repository
    argv = shlex.split(line)[1:]
    if line in REFUSED:
        import importlib

        cmd, args = cli.command_line(argv)
        with pytest.raises(UserError):
            validate.check(cmd.config, args, getattr(importlib.import_module(cmd.module), cmd.check, None))
        return
    cmd, args = cli.command_line(argv)
    if cmd.config in ("report", "data", "plan"):
        return  # they take a folder / download: their arguments are their own (test_report, test_data, test_plan)
    validate.check_choices(args)
    overrides = [a for a in args if not a.startswith("-")]
    jobs = validate.sweep_jobs(cmd.config, overrides) if any(a in ("-m", "--multirun") for a in args) else [overrides]
    assert jobs
    for job in jobs[:3]:
        validate.compose(cmd.config, job)
    import torch

    gpu_only = "cuda" in line and not torch.cuda.is_available()
    if not any(p in line for p in PLACEHOLDERS) and cmd.config != "sd" and not gpu_only:
        import importlib

        module = importlib.import_module(cmd.module)
        try:
            validate.check(cmd.config, args, getattr(module, cmd.check, None))
        except UserError as err:  # a command shown in the docs must be accepted as written
            raise AssertionError(f"{page}: `{line}` is refused: {err}") from None


def test_every_relative_link_resolves():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")) and not (page.parent / target).exists():
                missing.append(f"{page.relative_to(REPO)} -> {target}")
    assert not missing, missing


def test_the_figures_quoted_for_the_shipped_assets_equal_their_cards():
    readme = (REPO / "README.md").read_text()
    for name, folder in SHIPPED.items():
        card = json.loads((folder / "classifier" / "card.json").read_text())
        acc = 100 * card["test_accuracy"]
        page = (folder / "README.md").read_text()
        assert f"{acc:.2f} %" in page, (name, acc)
        assert f"{acc:.2f} %" in readme, (name, acc)
        size = (folder / "ddpm" / "diffusion_pytorch_model.safetensors").stat().st_size / 1e6
        assert f"{size:.1f} MB safetensors" in page, (name, size)


COMPARES = sorted((REPO / "docs" / "results").glob("*/*/compare.json"))


def test_published_comparisons_have_their_files():
    assert COMPARES, "docs/results/<table>/<dataset>/compare.json: the files behind the matched-safety table"


@pytest.mark.parametrize("path", COMPARES, ids=[p.parent.relative_to(REPO).as_posix() for p in COMPARES])
def test_a_published_comparison_table_is_regenerated_from_its_files(path):
    """The table in docs/results.md and the committed compare.md are what `dng compare`'s own table code makes of
    the committed compare.json (no number copied by hand)."""
    from dng_cli.commands.compare import markdown

    summary = json.loads(path.read_text())
    table = markdown(summary, summary["compared"], summary["not_reached"], summary.get("method_overrides"))
    assert table.strip() and table in (path.parent / "compare.md").read_text()
    assert table in (REPO / "docs" / "results.md").read_text()
    for cal in summary["calibration"]:  # the calibration files behind λ0
        assert (path.parent / "calibrate" / cal / "calibration.json").is_file(), cal


RECOMPUTED = [p for p in COMPARES if (p.parent / "overrides.yaml").is_file() and any(p.parent.glob("eval/*/*/records.npz"))]


def test_a_comparison_with_committed_records_exists():
    assert RECOMPUTED, "docs/results/<table>/<dataset>/ with overrides.yaml and eval/*/*/records.npz"


@pytest.mark.parametrize("path", RECOMPUTED, ids=[p.parent.relative_to(REPO).as_posix() for p in RECOMPUTED])
def test_a_published_comparison_is_recomputed_from_its_committed_records(path, tmp_path, capsys):
    """`dng compare grid=existing`, re-run with the published overrides on a copy of the committed folder
    (metrics.json of every probe and grid point, records.npz of every grid point), samples nothing and gives the
    published λ*, evaluation rates and band-averaged metrics: the records are the ones behind the table."""
    import shutil

    from omegaconf import OmegaConf

    run = tmp_path / "run"
    shutil.copytree(path.parent, run)
    overrides = [o for o in OmegaConf.load(path.parent / "overrides.yaml") if not o.startswith("hydra.")]
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    cli.main(["compare", *overrides, "grid=existing", "bootstrap=0", f"hydra.run.dir={run}"])
    assert not list(run.rglob("samples.npz"))  # nothing was sampled
    assert sorted(p.relative_to(run) for p in run.rglob("*") if ".hydra" not in p.parts and p.name != "compare.log"
                  and not p.name.startswith(".dng")) == before
    published, again = (json.loads(p.read_text()) for p in (path, run / "compare.json"))
    for m, r in zip(published["methods"], again["methods"], strict=True):
        assert (r["method"], r["target"], r["grid"]) == (m["method"], m["target"], m["grid"])
        assert r["scale_star"] == pytest.approx(m["scale_star"], rel=1e-9)
        assert r["eval_rate"] == pytest.approx(m["eval_rate"], rel=1e-9)
        for key, stats in m["metrics"].items():
            assert r["metrics"][key]["value"] == pytest.approx(stats["value"], rel=1e-6), (m["method"], key)
            assert r["matched"][key]["value"] == pytest.approx(m["matched"][key]["value"], rel=1e-6), (m["method"], key)
    for c, again_c in zip(published["claims"], again["claims"], strict=True):
        assert again_c["diff"] == pytest.approx(c["diff"], rel=1e-6, abs=1e-6), c  # a difference of two FIDs: abs


REPORTS = sorted(d.parent for d in (REPO / "docs" / "results").glob("*/run.sh") if any(d.parent.glob("*/metrics.json")))


def test_published_report_tables_have_their_files():
    assert {d.name for d in REPORTS} >= {"main_job", "several_classes"}


@pytest.mark.parametrize("folder", REPORTS, ids=[d.name for d in REPORTS])
def test_a_published_report_table_is_regenerated_from_its_files(folder):
    """Each `dng report` table in docs/results.md is what report's own table code makes of the metrics.json files
    committed under docs/results/<table>/ (written there by its run.sh): no number copied by hand."""
    from dng_cli.commands.report import collect, markdown

    rows = collect(folder)
    assert rows and all(r["fingerprint"] for r in rows)
    table = markdown(rows).split("\n\nFID features:")[0]
    assert table in (REPO / "docs" / "results.md").read_text(), f"{folder.name}: regenerated table not published"


def test_the_main_job_row_comes_from_its_committed_files():
    """README's main-job row against the metrics.json files behind it (docs/results/main_job/run.sh)."""
    dng, none = (json.loads((REPO / "docs" / "results" / "main_job" / n / "metrics.json").read_text())
                 for n in ("dng", "unguided"))
    lo, hi = dng["forbidden_rate_ci"]
    row = (f"forbidden {100 * dng['forbidden_rate']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}] vs "
           f"{100 * none['forbidden_rate']:.1f} % unguided; KL {dng['kl_uniform']:.3f} ± {dng['kl_uniform_se']:.3f}; "
           f"FID {dng['fid']:.1f} ± {dng['fid_se']:.1f}")
    assert row in (REPO / "README.md").read_text(), row
    assert dng["config"]["method"]["name"] == "dng" and dng["n_samples"] == 200 and none["config"]["method"]["name"] == "none"
    n500 = json.loads((REPO / "docs" / "results" / "main_job" / "dng_n500" / "metrics.json").read_text())
    lo, hi = n500["forbidden_rate_ci"]
    line = (f"at N = {n500['n_samples']} (seeds 0…{n500['n_samples'] - 1}, which contain those 200) it is "
            f"{n500['histogram_counts'][0]} zeros, {100 * n500['forbidden_rate']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]")
    assert line in (REPO / "README.md").read_text(), line
    kept = f"KL kept {dng['kl_kept']:.3f} ± {dng['kl_kept_se']:.3f} vs {none['kl_kept']:.3f} ± {none['kl_kept_se']:.3f}"
    assert kept in (REPO / "README.md").read_text(), kept


def test_the_precision_table_and_the_cleared_set_come_from_their_files():
    """docs/performance.md's paired fp32/bf16 table is what scripts/precision_pairs.py --table makes of the committed
    docs/results/precision/<dataset>_<method>/ files, and `sampler.precision=auto` clears exactly the methods whose
    every row there is unchanged."""
    import importlib.util

    from dng_cli import spec

    loader = importlib.util.spec_from_file_location("precision_pairs", REPO / "scripts" / "precision_pairs.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    folder = REPO / "docs" / "results" / "precision"
    for pair in folder.glob("*/pairs.json"):
        assert all((pair.parent / p / "metrics.json").is_file() for p in ("fp32", "bf16")), pair.parent.name
    table = module.table(folder)
    assert table.count("\n") >= 2 and table in (REPO / "docs" / "performance.md").read_text()
    assert spec.BF16_CLEARED == frozenset(module.cleared(folder))
