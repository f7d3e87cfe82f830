"""`dng plan`: the power of a finished compare (issue 44) — its MDE at the compare's own N is the compare's, the N it
prints resolves the stated effect with 80 % power, the cost comes from the compare's grid and recorded throughput,
and bad input is one line."""

import json
import math
from pathlib import Path

import pytest

from dng_cli import cli, matching
from dng_cli.commands import plan

REPO = Path(__file__).resolve().parents[1]
FASHION = REPO / "docs" / "results" / "matched_safety" / "fashion"


def test_plan_of_a_committed_compare_agrees_with_it_and_prices_the_n_it_needs(capsys):
    summary = json.loads((FASHION / "compare.json").read_text())
    rows = plan.plan(summary, FASHION, effects={"kl_kept": 0.05})
    claims = [c for c in summary["claims"] if c["se"]]
    assert len(rows) == len(claims)
    for row, claim in zip(rows, claims):
        assert row["mde_at_n"] == pytest.approx(claim["mde"], rel=1e-9)  # the compare's own MDE at its own N
        if row["metric"] == "kl_kept":
            assert row["effect"] == 0.05 and not row["observed"]
            assert matching.power_at(row["sigma1"], 0.05, row["n_needed"], row["claims"]) >= 0.8
            assert matching.power_at(row["sigma1"], 0.05, row["n_needed"] - 1, row["claims"]) < 0.8
        else:
            assert row["observed"] and row["effect"] == pytest.approx(abs(claim["diff"]))
        assert row["grid_points"] == 30 and row["samples"] == 30 * row["n_needed"]
        assert row["hours"] == pytest.approx(row["samples"] / row["images_per_s"] / 3600)
    cli.main(["plan", str(FASHION), "n=2000", "effects={kl_kept:0.05}"])
    out = capsys.readouterr().out
    assert "**Power plan**" in out and "MDE at N = 2000" in out and "| 3 % | np − dng | KL kept | primary |" in out


@pytest.mark.parametrize("args, match", [
    ([], "plan needs a finished compare folder"),
    (["{empty}"], "holds no compare.json"),
    (["{fashion}", "n=0"], "n=0 is invalid"),
    (["{fashion}", "power=1.5"], "power=1.5 is invalid"),
    (["{fashion}", "effects={kl_kept:-1}"], "effects.kl_kept=-1 is invalid"),
])
def test_plan_bad_input_is_one_line(tmp_path, capsys, args, match):
    args = [a.replace("{empty}", str(tmp_path)).replace("{fashion}", str(FASHION)) for a in args]
    with pytest.raises(SystemExit) as exc:
        cli.main(["plan", *args])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and match in err, err
