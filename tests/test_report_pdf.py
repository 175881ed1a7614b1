"""The PDF report (`riskpipe report --format pdf`, the bundle's report.pdf), laid out for real
by WeasyPrint and read back with pdfminer: every line of text lies on its page (a table
wider than A4 used to run off the right edge, and with it the policies' decision counts
and the control mapping's "cited by decisions" column), and the evidence is in the text.
The bundle's report.pdf (a stage ledger of non-demo models) is checked the same way in
test_bundle."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from ledger_records import POLICY, POLICY_V4, build_ledger
from pdfkit import check_pdf
from riskpipe import report as report_pkg
from riskpipe.cli import cli

pytest.importorskip("pdfminer")  # the dev extra
if report_pkg.pdf_unavailable() is not None:  # the dev extra and `make system-packages` provide both
    pytest.skip(f"PDF output is not available here: {report_pkg.pdf_unavailable()}", allow_module_level=True)

TITLES = ["Scope and limitations", "Policies in effect", "Volumes", "Decisions over time", "Abstention",
          "Radius against epsilon", "Human review", "Dead letters", "Control mapping", "Ledger integrity"]


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    path = tmp_path_factory.mktemp("pdf") / "ledger.db"
    return path, build_ledger(path, n=60, seed=3)


def test_pdf_report_has_every_section_on_the_page(ledger, tmp_path):
    path, data = ledger
    out = tmp_path / "report.pdf"
    r = CliRunner().invoke(cli, ["report", "--ledger", str(path), "--format", "pdf", "--out", str(out)])
    assert r.exit_code == 0, r.output
    text = check_pdf(out.read_bytes())
    flat = re.sub(r"\s+", "", text)
    for title in TITLES:
        assert re.sub(r"\s+", "", title) in flat, title
    assert "Ledger integrity: intact" in " ".join(text.split())
    for policy in (POLICY, POLICY_V4):  # each full sha256, however its cell wrapped it
        assert policy["sha256"] in flat
    assert "citedbydecisions" in flat and "Theorem1" in flat and "Theorem2" in flat
    routed = sum(x["review"]["routed"] for x in data["decisions"])
    assert "routedtoreview" in flat and f"{routed}({100 * routed / len(data['decisions']):.1f}%)" in flat


def test_names_without_a_break_point_stay_on_the_page(tmp_path):
    """Model and policy names are the user's: ones of ~90 characters with no space or
    hyphen (where break-word cannot break) used to widen their tables past the page, and the
    columns after them (decision counts, model faults) were cut off."""
    from ledger_records import MODEL, decision_record
    from riskpipe.ledger import Ledger

    model = "imageclassifierresnet50v220261203productioncanaryeuwest1withaverylongnamewithoutbreaks"
    policy = {**POLICY, "name": "fraudscreeningpolicyfortheeuwest1productioncanarycohortwithaverylongnamewithout"}
    records = []
    for i in range(12):
        r = decision_record(i, policy=policy, decision="review" if i % 3 else "allow")
        r["model"] = {**MODEL, "name": model}
        records.append(r)
    with Ledger(tmp_path / "long.db") as led:
        led.append_many(records)
    out = report_pkg.write_report(tmp_path / "long.db", tmp_path / "long.pdf", "pdf")
    flat = re.sub(r"\s+", "", check_pdf(out.read_bytes()))
    assert model in flat and policy["name"] in flat
    assert "lastdecision" in flat and "modelfaults" in flat  # the columns that used to fall off


def test_the_pdf_renderer_fetches_nothing_but_inline_data(monkeypatch, tmp_path, ledger):
    """WeasyPrint fetches what the HTML points at: a file: image or a rel=attachment link
    would put a local file into the compliance PDF, an http: one would call a server.
    The report's own figures are data: URLs; anything else is refused, even if markup got
    past autoescaping (here the rendered HTML is replaced outright)."""
    from PIL import Image

    secret = tmp_path / "secret.txt"
    secret.write_text("db password: hunter2\n")
    Image.new("RGB", (8, 8), "red").save(tmp_path / "local.png")
    inline = report_pkg.render(report_pkg.gather(str(ledger[0]), verify=False), "html")
    assert 'src="data:image/png;base64,' in inline  # the real report's figures, still drawn below
    hostile = (f'<link rel="attachment" href="{secret.as_uri()}"><img src="{(tmp_path / "local.png").as_uri()}">'
               f'<a rel="attachment" href="{secret.as_uri()}">x</a>')
    monkeypatch.setattr(report_pkg, "render", lambda *a, **k: inline.replace("<main>", "<main>" + hostile, 1))
    data = report_pkg.write_report(ledger[0], tmp_path / "r.pdf", "pdf", verify=False).read_bytes()
    check_pdf(data)
    assert b"/EmbeddedFile" not in data and b"hunter2" not in data
    figures = data.count(b"/Subtype /Image")
    monkeypatch.setattr(report_pkg, "render", lambda *a, **k: inline)
    plain = report_pkg.write_report(ledger[0], tmp_path / "p.pdf", "pdf", verify=False).read_bytes()
    assert figures == plain.count(b"/Subtype /Image") > 0  # the inline figures, and not the local image


def test_pdf_of_an_empty_ledger(tmp_path):
    from riskpipe.ledger import Ledger

    Ledger(tmp_path / "empty.db").close()
    out = report_pkg.write_report(tmp_path / "empty.db", tmp_path / "e.pdf", "pdf")
    assert "no decisions in this period" in " ".join(check_pdf(out.read_bytes()).split())


def test_no_pdf_without_weasyprint_or_its_libraries_says_why(monkeypatch, tmp_path, ledger):
    """WeasyPrint absent, or present without Pango (its import raises OSError): a one-line
    reason, exit 2, no traceback; the check itself tells the two apart."""
    import importlib

    real_import, check = importlib.import_module, report_pkg.pdf_unavailable.__wrapped__
    for exc, why in ((ImportError("No module named 'weasyprint'"), "WeasyPrint is not installed"),
                     (OSError("cannot load library 'libpango-1.0-0': not found"), "cannot load its system libraries")):
        def fake(name, *a, exc=exc, **kw):
            if name == "weasyprint":
                raise exc
            return real_import(name, *a, **kw)

        monkeypatch.setattr(importlib, "import_module", fake)
        reason = check()
        monkeypatch.setattr(importlib, "import_module", real_import)
        assert reason is not None and why in reason
        monkeypatch.setattr(report_pkg, "pdf_unavailable", lambda reason=reason: reason)
        r = CliRunner().invoke(cli, ["report", "--ledger", str(ledger[0]), "--format", "pdf", "--out",
                                     str(tmp_path / "x.pdf")])
        assert r.exit_code == 2 and "format: pdf is not available here" in r.output and why in r.output, r.output
        assert "Traceback" not in r.output and not (tmp_path / "x.pdf").exists()
    assert "Pango" in reason
