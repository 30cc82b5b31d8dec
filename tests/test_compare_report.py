"""`normfree compare` and its report: the grid, resuming, the table's statistics and the HTML page."""
import base64
import csv
import dataclasses
import json
import re
import statistics
from pathlib import Path

import pytest

import normfree
from normfree.app.cli import build_parser, main
from normfree.app.compare import CompareConfig
from normfree.app.report import RunRecord, markdown_table, summarise, write_report

PNG = b"\x89PNG\r\n\x1a\n"
# 2 methods x (bs 8, bs 16, bs 8 x 2 accumulated) x 2 seeds = 12 one-epoch runs on 48 + 48 tiny digits.
GRID = ["--methods", "bn", "nf-agc", "--batch-sizes", "8", "16", "--seeds", "0", "1", "--epochs", "1", "--size", "8",
        "--limit", "48", "--lrs", "0.01"]


def record(method, bs, seed, final, best, accum=1, seconds=1.0, images=100.0, memory=500.0, lr=0.01):
    return RunRecord(method, bs, accum, seed, lr, final, best, seconds, images, memory, (best, final), (1.0, 0.9))


HAND_RUNS = [
    record("A", 8, 0, 0.90, 0.95, seconds=2.0, images=100.0, memory=500.0),
    record("A", 8, 1, 0.80, 0.85, seconds=4.0, images=300.0, memory=700.0),
    record("A", 8, 2, 0.70, 0.80, seconds=3.0, images=200.0, memory=600.0),
    record("B", 8, 0, 0.50, 0.60, lr=0.003),
    record("A", 4, 0, 0.25, 0.50, accum=2),
]


def test_table_rows_are_mean_and_sample_std_over_seeds():
    table = markdown_table(summarise(HAND_RUNS, ["A", "B"]))
    lines = table.splitlines()
    assert lines[0] == ("| method | batch | lr | final accuracy (%) | best accuracy (%) | seeds | s/epoch | images/s "
                        "| peak memory (MiB) |")
    # A at bs 8: final 0.9, 0.8, 0.7 -> mean 0.8, sample std 0.1; best 0.95, 0.85, 0.80 -> mean 0.8667,
    # sample std sqrt((0.0833^2 + 0.0167^2 + 0.0667^2) / 2) = 0.0764; time and images/s means, memory the max.
    assert lines[2] == "| A | bs 8 | 0.01 | 80.0 ± 10.0 | 86.7 ± 7.6 | 3 | 3.00 | 200 | 700 |"
    assert lines[3] == "| A | bs 4 x 2 = 8 | 0.01 | 25.0 | 50.0 | 1 | 1.00 | 100 | 500 |"  # one seed: no ±
    assert lines[4] == "| B | bs 8 | 0.003 | 50.0 | 60.0 | 1 | 1.00 | 100 | 500 |"
    assert len(lines) == 5


def test_html_report_is_self_contained_with_embedded_plots(tmp_path):
    files = write_report(tmp_path, HAND_RUNS, ["A", "B"], title="hand", settings={"data": "digits"})
    page = files["html"].read_text()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2
    assert all(base64.b64decode(image)[:8] == PNG for image in images)
    assert "<td>80.0 ± 10.0</td>" in page and "<td>86.7 ± 7.6</td>" in page
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing loaded from elsewhere
    markdown = files["markdown"].read_text()
    assert "| A | bs 8 | 0.01 | 80.0 ± 10.0 | 86.7 ± 7.6 | 3 | 3.00 | 200 | 700 |" in markdown
    for key in ("accuracy_plot", "curves_plot"):
        assert files[key].read_bytes()[:8] == PNG and f"]({files[key].name})" in markdown


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    status = main(["compare", *GRID, "--out", str(out)])
    return out, status


def run_results(out):
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))}


@pytest.mark.slow
def test_compare_cli_trains_the_grid_and_prints_the_table(grid, capsys):
    out, status = grid
    assert status == 0
    runs = run_results(out)
    assert sorted(runs) == sorted(f"{m}-bs{bs}-x{k}-seed{s}" for m in ("bn", "nf-agc") for bs, k in
                                  ((8, 1), (16, 1), (8, 2)) for s in (0, 1))
    configs = {name: r["config"] for name, r in runs.items()}
    assert configs["bn-bs8-x2-seed1"]["arch"] == "bn_resnet_tiny" and configs["bn-bs8-x2-seed1"]["agc"] is None
    assert configs["nf-agc-bs8-x2-seed1"]["arch"] == "nf_resnet_tiny"
    assert configs["nf-agc-bs8-x2-seed1"]["agc"] == normfree.app.config.DEFAULT_AGC
    assert configs["nf-agc-bs8-x2-seed1"]["accum"] == 2 and configs["nf-agc-bs16-x1-seed0"]["accum"] == 1
    assert {c["epochs"] for c in configs.values()} == {1} and {c["lr"] for c in configs.values()} == {1e-2}
    assert not (out / "sweep").exists()  # one lr: nothing to choose, no sweep
    assert {p.name for p in out.iterdir()} == {"runs", "compare.json", "report.md", "report.html", "runs.csv",
                                               "summary.csv", "accuracy_vs_batch_size.png", "validation_curves.png"}


@pytest.mark.slow
def test_report_rows_match_the_runs_on_disk(grid):
    out, _ = grid
    runs = run_results(out)
    table = (out / "report.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| BatchNorm") or line.startswith("| NF + AGC")]
    assert len(rows) == 6
    for method, label in (("bn", "BatchNorm"), ("nf-agc", "NF + AGC")):
        for bs, k, setting in ((8, 1, "bs 8"), (16, 1, "bs 16"), (8, 2, "bs 8 x 2 = 16")):
            finals = [runs[f"{method}-bs{bs}-x{k}-seed{s}"]["epochs"][-1]["accuracy"] for s in (0, 1)]
            mean, std = 100 * statistics.mean(finals), 100 * statistics.stdev(finals)
            expected = f"| {label} | {setting} | 0.01 | {mean:.1f} ± {std:.1f} |"
            assert any(row.startswith(expected) for row in rows), (expected, rows)


@pytest.mark.slow
def test_compare_resumes_from_the_runs_already_in_out(grid, capsys):
    out, _ = grid
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}
    redo = out / "runs" / "bn-bs16-x1-seed1" / "result.json"
    redo.unlink()  # as if Ctrl-C had stopped the grid there
    result = normfree.compare(**dict(methods=("bn", "nf-agc"), batch_sizes=(8, 16), seeds=(0, 1), epochs=1, size=8,
                                     limit=48, lrs=(0.01,)), out=str(out))
    assert result.complete and len(result.runs) == 12
    after = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}
    assert {p for p in after if after[p] != before.get(p)} == {redo}
    assert capsys.readouterr().out.count("(done before)") == 11


@pytest.mark.slow
def test_compare_summarises_the_runs_once_and_reports_those_rows(grid, monkeypatch):
    out, _ = grid
    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return summarise(*args, **kwargs)

    monkeypatch.setattr(normfree.app.report, "summarise", counted)
    monkeypatch.setattr(normfree.app.compare, "summarise", counted)
    result = normfree.compare(methods=("bn", "nf-agc"), batch_sizes=(8, 16), seeds=(0, 1), epochs=1, size=8, limit=48,
                              lrs=(0.01,), out=str(out), quiet=True)  # every run reused: nothing trains
    assert len(calls) == 1 and result.rows == summarise(result.runs, ["BatchNorm", "NF + AGC"])
    with open(out / "summary.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert written == [{key: "" if value is None else str(value) for key, value in dataclasses.asdict(row).items()}
                       for row in result.rows]


@pytest.mark.slow
def test_compare_refuses_to_mix_runs_of_other_settings(grid):
    out, _ = grid
    with pytest.raises(normfree.ConfigError, match="other settings.*epochs"):
        normfree.compare(methods=("bn",), batch_sizes=(8, 16), seeds=(0,), epochs=2, size=8, limit=48, lrs=(0.01,),
                         out=str(out), quiet=True)


def test_default_grid_is_the_quick_digits_grid():
    config = CompareConfig()
    methods = ["bn", "nf-agc"]
    assert config.data == "digits" and config.method_keys() == methods and config.sweeps
    settings = [(c.bs, c.accum) for c in config.cells() if c.seed == config.seeds[0] and c.method == "bn"]
    assert settings == [(16, 1), (128, 1), (16, 8)]
    assert len(config.cells()) == len(methods) * 3 * len(config.seeds)


def test_compare_command_line_round_trips():
    config = CompareConfig(data="digits", methods=("nf", "bn"), batch_sizes=(4, 16), accumulate=False,
                                    seeds=(3,), epochs=2, lrs=(1e-3, 1e-2), opt="sgd", budget="steps",
                                    steps=7, agc=0.02, size=12, limit=30, precision="bf16", out="elsewhere")
    parser, _ = build_parser()
    args = vars(parser.parse_args(config.command().split()[1:]))
    not_config = ("command", "quiet", "overwrite", "jobs", "devices", "plan", "report")
    args = {k: v for k, v in args.items() if k not in not_config}
    assert CompareConfig(**args) == config


@pytest.mark.parametrize("argv, flag", [
    (["--batch-sizes", "8", "30"], "--batch-sizes"),
    (["--arch", "resnet18", "--methods", "bn", "nf-agc"], "--arch"),  # resnet18 alone: bn vs its conversion
    (["--seeds", "1", "1"], "--seeds"),
    (["--methods", "nf", "nf"], "--methods"),
    (["--methods", "groupnorm"], "--methods"),
    (["--epochs", "0"], "--epochs"),
    (["--lrs", "0.01", "0.01"], "--lrs"),
    (["--lrs", "0.01", "-1"], "--lrs"),
    (["--opt", "lamb"], "--opt"),
    (["--budget", "hours"], "--budget"),
    (["--steps", "10"], "--steps"),
    (["--budget", "steps", "--steps", "0"], "--steps"),
    (["--size", "100000"], "--size"),
    (["--epochs", "1000000000000000000000"], "--epochs"),
])
def test_compare_bad_input(tmp_path, monkeypatch, capsys, argv, flag):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(["compare", *argv])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"error: {flag}" in error or f"argument {flag}" in error
    assert "Traceback" not in error and list(Path(tmp_path).iterdir()) == []


def test_reading_states_each_gap_to_the_baseline_with_its_seed_spread():
    paragraph = normfree.app.report.reading(summarise(HAND_RUNS, ["A", "B"]), ["A", "B"])
    # B at bs 8: 50.0 against A's 80.0 +- 10.0; A's accumulated setting has no B run to compare with
    assert paragraph == ("B against A, in points of final accuracy: bs 8: -30.0 (seed spread up to 10.0). "
                         "Within 2 points at 0 of 1 batch settings, ahead at 0, behind at 1.")
