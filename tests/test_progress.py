"""Progress on stderr: every pass shows its total (and so an estimate), the eval-mode sweep included; the
CLI shows bars and the elapsed time only when interactive, and never on stdout."""

import re

import torch
from click.testing import CliRunner
from torch import nn

import bncal
from bncal.progress import DataPass
from bncal.cli import main
from bncal.torch.eval_sweep import solve_eval_statistics
from bncal.torch.recalibration import batchnorm_layers
from models import zoo


def _cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def _counts(stream: str, description: str) -> list[tuple[int, str | None]]:
    """``(done, total)`` of every rendering of the bar called ``description`` (total None: none shown)."""
    found = re.findall(re.escape(description) + r": +(?:\d+%\|[^|]*\| *)?(\d+)(?:/(\d+))?", stream)
    return [(int(done), total or None) for done, total in found]


def test_the_depth_sweep_shows_depths_times_batches_from_its_first_step(capsys):
    net = _cnn()
    batches = list((torch.randn(30, 3, 8, 8) * 2).split(10))
    result = solve_eval_statistics(net, batchnorm_layers(net), batches, device="cpu", progress=True)
    stream = capsys.readouterr().err
    assert result.refusal is None and result.depths == 3 and result.batches == 3
    shown = _counts(stream, "pass 1: depth-by-depth sweep")
    assert shown and all(total == "9" for _, total in shown), stream  # 3 depths x 3 batches, in every rendering
    assert "step" in stream and "batch" not in stream  # counted in batch steps, named so
    # A sample limit: the total is what the limit allows judging by the first batch (2 batches of 10 for 15).
    solve_eval_statistics(net, batchnorm_layers(net), batches, device="cpu", max_samples=15, progress=True)
    shown = _counts(capsys.readouterr().err, "pass 1: depth-by-depth sweep")
    assert shown and all(total == "6" for _, total in shown)


def test_passes_know_their_totals_under_a_sample_limit_and_from_the_previous_pass(capsys):
    batches = [torch.randn(8, 3) for _ in range(10)]
    for _ in DataPass(batches, lambda b, i, r: (b, min(len(b), r)), max_samples=20, progress=True,
                      description="limited"):
        pass
    assert {total for _, total in _counts(capsys.readouterr().err, "limited")} == {"3"}  # ceil(20 / 8)
    # Data that does not know its length (a function giving a generator): pass 1 counts, later passes know.
    bn = nn.BatchNorm1d(3)
    report = bncal.recalibrate(bn, lambda: (b for b in batches), mode="eval", forward_fn=lambda m, b: m(b),
                               tol=0.0, max_passes=3, progress=True)
    stream = capsys.readouterr().err
    assert report.passes == 3
    assert all(total is None for _, total in _counts(stream, "pass 1 of at most 3"))
    assert _counts(stream, "pass 2 of at most 3") and all(t == "10" for _, t in _counts(stream, "pass 2 of at most 3"))
    # From pass 3 on, the overall estimate: the last pass's time times the passes left.
    assert re.search(r"pass 3 of at most 3, ~[0-9.e-]+ s each, at most ~\d+ s left: +\d+%\|[^|]*\| *\d+/10", stream), stream


def test_cli_progress_goes_to_stderr_only_when_interactive_and_ends_with_the_elapsed_time(tmp_path, monkeypatch):
    import numpy as np

    from bncal.cli.options import Console

    x, _ = zoo.mnist_arrays("calib")
    np.save(tmp_path / "x.npy", x.numpy()[:64])
    argv = ["recalibrate", str(zoo.HERE / "zoo.py") + ":mnist_cnn", "--weights", str(zoo.MNIST_STALE_CKPT),
            "--data", str(tmp_path / "x.npy"), "--batch-size", "32", "--mode", "eval", "--force"]
    quiet = CliRunner().invoke(main, [*argv, "-o", str(tmp_path / "a.safetensors")])
    assert quiet.exit_code == 0 and quiet.stderr == "" and "\r" not in quiet.stdout  # not a terminal: no bars
    monkeypatch.setattr(Console, "interactive", property(lambda self: not self.quiet))
    shown = CliRunner().invoke(main, [*argv, "-o", str(tmp_path / "b.safetensors")])
    assert shown.exit_code == 0 and "\r" not in shown.stdout and "pass 1: depth-by-depth sweep" not in shown.stdout
    sweep = _counts(shown.stderr, "pass 1: depth-by-depth sweep")
    assert sweep and all(total == str(7 * 2) for _, total in sweep)  # 7 BN depths x 2 batches
    assert re.search(r"finished in \d+\.\d s\n$", shown.stderr)
