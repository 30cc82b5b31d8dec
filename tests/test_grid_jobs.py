"""`normfree compare --jobs N` (runs in parallel processes: the sequential results, the same reuse of finished runs),
`--plan FILE` (one `normfree train` command per run) and `--report` (the report from the folders they fill)."""
import json
import shlex
import shutil

import pytest

import normfree
from normfree.app.cli import main
from normfree.utils.outdir import INCOMPLETE

# 1 method x bs 8 x 2 seeds = 2 one-epoch runs on 48 + 48 tiny digits
GRID = dict(methods=("nf-agc",), batch_sizes=(8,), seeds=(0, 1), epochs=1, size=8, limit=48, lrs=(0.01,))
CLI_GRID = ["--methods", "nf-agc", "--batch-sizes", "8", "--seeds", "0", "1", "--epochs", "1", "--size", "8",
            "--limit", "48"]


def epochs_of(out):
    return {p.parent.name: json.loads(p.read_text())["epochs"] for p in sorted((out / "runs").glob("*/result.json"))}


@pytest.mark.slow
def test_jobs_2_gives_the_sequential_results_and_reuses_finished_runs(tmp_path, capsys):
    grid = {**GRID, "seeds": (0, 1, 2)}
    one = normfree.compare(**grid, out=str(tmp_path / "one"), quiet=True)
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    shutil.rmtree(tmp_path / "two" / "runs" / "nf-agc-bs8-x1-seed1")  # never trained
    (tmp_path / "two" / "runs" / "nf-agc-bs8-x1-seed2" / INCOMPLETE).write_text("killed")  # half-finished
    capsys.readouterr()
    assert main(["compare", *CLI_GRID, "--seeds", "0", "1", "2", "--lrs", "0.01", "--jobs", "2",
                 "--out", str(tmp_path / "two")]) == 0  # seeds 1 and 2 at once, in two processes
    printed = capsys.readouterr().out
    assert all(printed.count(f"[{i}/3]") == 1 for i in (1, 2, 3))  # one line per finished run
    assert printed.count("(done before)") == 1  # seed 0 reused
    assert not (tmp_path / "two" / "runs" / "nf-agc-bs8-x1-seed2" / INCOMPLETE).exists()
    sequential, parallel = epochs_of(tmp_path / "one"), epochs_of(tmp_path / "two")
    assert sorted(sequential) == sorted(parallel) == [f"nf-agc-bs8-x1-seed{s}" for s in (0, 1, 2)]
    for name, rows in sequential.items():
        for row, other in zip(rows, parallel[name]):
            for key in ("train_loss", "valid_loss", "accuracy"):
                assert other[key] == pytest.approx(row[key], rel=1e-5), (name, key)
    assert [run.seed for run in one.runs] == [0, 1, 2]
    assert (tmp_path / "two" / "report.md").read_text().count("NF + AGC") == (tmp_path / "one" / "report.md") \
        .read_text().count("NF + AGC")


def run_plan(plan):
    for command in plan.read_text().splitlines():
        argv = shlex.split(command)
        assert argv[:2] == ["normfree", "train"]
        assert main(argv[1:]) == 0


@pytest.mark.slow
def test_plan_then_report(tmp_path, capsys):
    out, plan = tmp_path / "grid", tmp_path / "plan.txt"
    grid = ["compare", *CLI_GRID, "--seeds", "0", "--lrs", "0.01", "0.03", "--out", str(out)]
    assert main([*grid, "--plan", str(plan)]) == 0  # the sweep first: its 2 runs
    assert len(plan.read_text().splitlines()) == 2 and "--holdout" in plan.read_text()
    with pytest.raises(SystemExit):
        main([*grid, "--report"])
    error = capsys.readouterr().err
    assert "--report: 2 of 2 runs are not finished" in error and "nf-agc-bs8-x1-lr0.01 (missing)" in error
    run_plan(plan)
    assert main([*grid, "--plan", str(plan)]) == 0  # then the grid's run, at the lr the sweep chose
    assert len(plan.read_text().splitlines()) == 1 and "seed" not in plan.read_text().split("--out")[0]
    run_plan(plan)
    assert main([*grid, "--plan", str(plan)]) == 0 and plan.read_text() == ""
    capsys.readouterr()
    assert main([*grid, "--report"]) == 0  # every run found finished, with exactly the grid's settings
    assert "(done before)" in capsys.readouterr().out
    assert (out / "report.md").exists() and len(epochs_of(out)) == 1


@pytest.mark.parametrize("settings", [
    dict(agc=None, skipinit=False, arch="nf_resnet_tiny"),  # switched off: --no-agc, --no-skipinit
    dict(skipinit=True, precision="bf16", classes=(3, 5), holdout=True),
    dict(arch="resnet18", to_normfree=True, out="runs/with space/and 'quote'"),
], ids=["switches off", "switches on, tuples", "a path to quote"])
def test_a_planned_train_command_parses_back_to_its_run(settings, tmp_path):
    """Each line of --plan is run by a shell: split as a shell would, the train parser gives back the same run."""
    from normfree.app.cli import _settings, build_parser
    from normfree.app.grid_jobs import train_command

    config = normfree.TrainConfig(**{"out": str(tmp_path / "run"), **settings})
    words = shlex.split(train_command(config))
    assert words[:2] == ["normfree", "train"] and words[-2:] == ["--overwrite", "--quiet"]
    parser, _ = build_parser()
    assert normfree.TrainConfig(**_settings(parser.parse_args(words[1:]))) == config
