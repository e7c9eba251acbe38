"""``fastmt check``: a case that cannot run is reported and counted, and the others still are."""

from __future__ import annotations

import json

from fastmt.tools import check


def test_a_crashing_case_is_counted_and_the_rest_still_run(monkeypatch, tmp_path, capsys):
    good = check.Row("mt_kl_loss", "T=1 N=1 C=2", "fp32", {"loss": 0.0}, {"loss": 0.0}, 1e-4, 0.0)

    def broken():
        raise NameError("Cannot access global variable _NEG from within @jit'ed function")

    monkeypatch.setattr(check, "cases", lambda device, quick: [lambda: good, broken, lambda: good])
    out = tmp_path / "check.json"
    failed = check.run_check("cpu", json_out=str(out))
    assert failed == 1
    result = json.loads(out.read_text())
    assert result["complete"] and len(result["rows"]) == 2 and "_NEG" in result["crashed"][0]
    assert "2/3 cases pass; 1 could not run" in capsys.readouterr().out
