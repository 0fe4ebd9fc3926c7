"""Results display themselves: a one-line repr, the CLI's table as str, the same table as HTML."""

import html
import re
from html.parser import HTMLParser

import numpy as np
import onnx
import pytest
import torch

import bncal
from bncal.checking import CheckThresholds, LayerCheck, OutputCheck, CheckReport
from bncal.report import SkippedLayer, format_table, text_to_html
from bncal.verify import ComparisonReport, OutputComparison
from models import zoo


class _Tables(HTMLParser):
    """The cells of every <table>, and the text of every <pre>."""

    def __init__(self):
        super().__init__()
        self.tables, self.pre, self._cell, self._in_pre = [], [], None, False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "pre":
            self._in_pre, self._text = True, ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None
        elif tag == "pre":
            self.pre.append(self._text)
            self._in_pre = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        elif self._in_pre:
            self._text += data


def _parsed(report):
    parser = _Tables()
    parser.feed(report._repr_html_())
    return parser


@pytest.fixture(scope="module")
def stale():
    return onnx.load(str(zoo.HERE / "mnist_cnn_stale.onnx"))


@pytest.fixture(scope="module")
def reports(stale):
    """One of every report type, from real runs on the shipped model (the demo's figures built by hand)."""
    model = zoo.mnist_cnn_stale()
    heldout = [x.numpy() for x in zoo.heldout_batches(batch_size=100)]
    recalibration = bncal.recalibrate(model, zoo.calibration_batches())
    example = (torch.randn(2, 1, 28, 28),)
    folded = bncal.fold(model, example)
    _, export = bncal.fold_export_onnx(bncal.export_onnx(model, example, keep_batchnorm=True), None,
                                       verify_feeds=[{"input": heldout[0]}])
    from bncal.demo import DemoResult

    demo = DemoResult(0.101, 0.977, 0.977, False, True, True, {"a.onnx": 100}, {}, 9.5)
    return {
        "recalibrate": recalibration,
        "check": bncal.check_onnx(stale, heldout),
        "fold": folded,
        "fold-export": export,
        "comparison": export.comparison,
        "inspect": bncal.inspect_model(stale),
        "demo": demo,
    }


EXPECTED_REPR = {
    "recalibrate": r"<RecalibrationReport train mode: 7 BN layers from 4000 samples, 1 pass>",
    "check": r"<CheckReport FAILED: 7 of 7 BN layers off their data, 1 of 1 output off train mode \(1000 samples\)>",
    "fold": r"<FoldResult Sequential: folded 7 of 7 BN layers>",
    "fold-export": r"<FoldExportReport PASSED: folded 7 of 7 BN layers, 0 BatchNormalization left>",
    "comparison": r"<ComparisonReport PASSED: 1 output within scale_tol=0.0001>",
    "inspect": r"<InspectReport onnx model, 7 BN layers: 1 error \(BN001\)>",
    "demo": r"<DemoResult PASSED: held-out accuracy 10.1% stale -> 97.7% recalibrated>",
}


@pytest.mark.parametrize("kind", list(EXPECTED_REPR))
def test_repr_is_one_short_line_and_str_is_the_table(reports, kind):
    report = reports[kind]
    text = repr(report)
    assert re.fullmatch(EXPECTED_REPR[kind], text), text
    assert len(text) < 160 and "\n" not in text
    assert str(report) == report.table()


@pytest.mark.parametrize("kind", list(EXPECTED_REPR))
def test_html_holds_the_same_tables_and_lines(reports, kind):
    report = reports[kind]
    parsed = _parsed(report)
    lines = report.table().splitlines()
    # Every table row of the text is a row of cells in the HTML, in order, with the same words.
    html_rows = [" ".join(cells).split() for table in parsed.tables for cells in table]
    text_rows = [line.split() for line in lines if line.strip() and not set(line) <= {"-", " "}]
    assert html_rows == [row for row in text_rows if row in html_rows]
    assert len(html_rows) + len(parsed.pre) == len(text_rows)  # nothing lost, nothing added
    assert parsed.tables, "at least one HTML table"


def test_recalibration_repr_no_longer_dumps_arrays(reports):
    report = reports["recalibrate"]
    assert len(repr(report)) < 100  # was 9.3 KB of numpy arrays
    layer = repr(report.layers[0])
    assert "array(" not in layer and "LayerStats(8 channels, mean 0..0, var 1..1)" in layer
    assert "Conv2d" not in repr(reports["fold"])  # the module is not dumped


def test_html_escapes_and_marks_verdicts():
    class Weird(bncal.report.ReportDisplay):
        def summary(self):
            return "<b>&"

        def table(self):
            return format_table([("<script>", "FAIL"), ("a&b", "pass")], ["name", "result"]) + "\nFAILED: <x>"

    text = Weird()._repr_html_()
    assert "<script>" not in text and "&lt;script&gt;" in text and "a&amp;b" in text
    assert "<b>Weird: &lt;b&gt;&amp;</b>" in text
    assert '<td class="fail">FAIL</td>' in text and '<td class="pass">pass</td>' in text
    assert '<pre class="fail">FAILED: &lt;x&gt;</pre>' in text


def test_text_to_html_keeps_a_table_it_cannot_find_as_text():
    def indented():
        return "\n".join("   " + line for line in format_table([(1, 2)], ["a", "b"]).splitlines())

    parsed = _Tables()
    parsed.feed(text_to_html(indented))
    assert parsed.tables == [] and [p.split() for p in parsed.pre] == [["a", "b"], ["-", "-"], ["1", "2"]]


def test_summaries_of_passing_failing_and_eval_results():
    thresholds = CheckThresholds()
    layer = LayerCheck("bn", 4, 100, 0.01, 1.0, 0.4, 0.6, True)
    output = OutputCheck("y", 0.1, 0.1, 1.0, True)
    passed = CheckReport.from_checks([layer], [output], [SkippedLayer("x", "why")], thresholds, 2, 64)
    assert repr(passed) == "<CheckReport PASSED: 1 BN layer and 1 output within limits (64 samples)>"
    failed = ComparisonReport([OutputComparison("y", False, 1.0, 1.0, 1.0, 1.0, 1.0)], 1e-5, 1e-4)
    assert repr(failed) == "<ComparisonReport FAILED: 1 of 1 output beyond atol=1e-05, rtol=0.0001 (y)>"
    bn = torch.nn.BatchNorm1d(3)
    data = [torch.randn(16, 3) for _ in range(3)]
    report = bncal.recalibrate(bn, data, mode="eval")
    assert re.fullmatch(r"<RecalibrationReport eval mode: 1 BN layer from 48 samples, \d+ passes?, converged>",
                        repr(report)), repr(report)


def test_every_report_table_exports_as_records_with_unformatted_values():
    thresholds = CheckThresholds()
    layers = [LayerCheck("bn1", 4, 3136, 0.0123456789, 1.5, 0.4, 0.6, False),
              LayerCheck("bn2", 8, 784, 0.01, 1.0, 0.4, 0.6, True)]
    output = OutputCheck("logits", 0.1, 0.2, 0.9, False, 0.05, 4.0, 0.99, "batch spread", 0.975)
    report = CheckReport.from_checks(layers, [output], [], thresholds, 2, 64)
    records = report.to_records()
    assert list(records) == ["layers", "outputs"]
    first = records["layers"][0]
    assert first["layer"] == "bn1" and first["values/channel"] == 3136 and first["result"] == "FAIL"
    assert first["max |shift| (sd)"] == 0.0123456789  # the value itself, not the table's 4 digits
    assert [r["layer"] for r in records["layers"]] == ["bn1", "bn2"]
    assert records["outputs"] == [{"output": "logits", "max abs err": 0.1, "rel err (rms)": 0.2,
                                   "rel err train/train'": 0.05, "spread ratio": 4.0, "top-1 agree": 0.9,
                                   "top-1 train/train'": 0.99, "criterion": "batch spread", "result": "FAIL"}]
    comparison = ComparisonReport([OutputComparison("y", True, 1e-7, 1e-6, 5e-8, 1e-7, 1.0)], 0.0, 0.0, 1e-4)
    assert list(comparison.to_records()) == ["outputs"] and comparison.to_records()["outputs"][0]["scale"] == 1.0
    bn = torch.nn.BatchNorm1d(3)
    recalibration = bncal.recalibrate(bn, [torch.randn(16, 3)])
    [row] = recalibration.to_records()["layers"]
    assert row["values/channel"] == 16 and row["var ratio"] == recalibration.layers[0].var_ratio
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"to_pandas\(\) needs pandas: pip install pandas"):
            report.to_pandas()
    else:
        frames = report.to_pandas()
        assert list(frames["layers"]["layer"]) == ["bn1", "bn2"] and frames["outputs"].shape == (1, 9)
