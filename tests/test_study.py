"""The controller study (README: "Does the agent steer?"): its plan at both sizes, and a smoke-sized run of the real
study, pre-training included, through launch.py's local executor and aggregate.py's study tables.

The smoke run uses the study's own configs and data (../shared/data: CBSD68, CSet5, CSet14) with 2 stages of 3
iterations and two controllers; it takes about a minute on 2 cores and is skipped where the data is not there.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "slurm"))

import aggregate  # noqa: E402
import launch  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def test_the_study_plan_gives_every_controller_the_same_budget():
    jobs = launch.plan("controllers", "runs")
    train = [j for j in jobs if j["kind"] == "train"]
    names = {j["name"] for j in train}
    adaptive = [c for c in launch.CONTROLLERS if c not in launch.STATIC]
    assert names == {"pretrain", *(f"{o}_{c}_seed{s}" for o in ("niqe", "psnr", "fused") for c in adaptive
                                   for s in range(3)),
                     *(f"static_{c}_seed{s}" for c in launch.STATIC for s in range(3))}
    assert {j["name"] for j in jobs if j["kind"] == "eval"} == {f"{n}_eval" for n in names - {"pretrain"}}
    budgets = set()
    for j in train:
        if j["name"] == "pretrain":
            continue
        argv = j["argv"]
        cfg = launch.lossagent.load_config(ROOT / argv[1], argv[3::2])
        assert cfg.model.pretrained == "runs/controllers/pretrain/ckpt/last.pt" and j["needs"] == "pretrain"
        budgets.add((cfg.train.stages, cfg.train.iters_per_stage, cfg.train.batch_size, cfg.feedback.count,
                     cfg.losses.min_weight if cfg.agent.backend != "fixed" else None))
    assert budgets == {(8, 30, 4, 5, 0.001), (8, 30, 4, 5, None)}  # the static ones: their own weights, same budget


def test_a_cell_planned_without_the_pretraining_does_not_wait_for_it():
    jobs = launch.plan("controllers", "runs", only={"fused_optuna-tpe"}, seeds=1)
    assert [(j["name"], j["needs"]) for j in jobs if j["kind"] == "train"] == [("fused_optuna-tpe", None)]
    assert launch.plan("controllers", "runs", only={"pretrain", "fused_optuna-tpe"}, seeds=1)[1]["needs"] == "pretrain"


def test_the_paper_size_study_plans_on_8_gpus(capsys):
    launch.main(["--study", "controllers-paper", "--dry-run"])
    out = capsys.readouterr().out
    for name in ("niqe_llm_seed0", "maniqa_optuna-tpe_seed2", "static_fixed_seed1", "niqe_hillclimb_seed1"):
        assert name in out
    jobs = launch.plan("controllers-paper", "runs")
    assert {j["gpus"] for j in jobs if j["kind"] == "train"} == {8}
    llm = next(j for j in jobs if j["name"] == "niqe_llm_seed0")
    cfg = launch.lossagent.load_config(ROOT / llm["argv"][1], llm["argv"][3::2])
    assert cfg.agent.backend != "fixed" and "Llama-3" in cfg.agent.model


@pytest.mark.skipif(not all((DATA / d).is_dir() for d in ("CBSD68", "CSet5", "CSet14")),
                    reason=f"the study's data ({DATA}: CBSD68, CSet5, CSet14) is not there")
def test_a_smoke_sized_study_runs_and_aggregates(tmp_path, niqe_torch_home):
    env = {**os.environ, "TORCH_HOME": str(niqe_torch_home)}
    runs = tmp_path / "runs"
    small = ["train.stages=2", "train.iters_per_stage=3", "feedback.count=2", "feedback.max_side=96"]
    result = subprocess.run([sys.executable, str(ROOT / "slurm" / "launch.py"), "--study", "controllers",
                             "--cluster", "local", "--parallel", "2", "--seeds", "1", "--root", str(runs),
                             "--only", "pretrain,fused_optuna-tpe,static_fixed",
                             *[a for s in small for a in ("--set", s)]],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    study = runs / "controllers"
    for name in ("fused_optuna-tpe", "static_fixed"):
        history = json.loads((study / name / "history.json").read_text())
        assert [s["stage"] for s in history["stages"]] == [0, 1, 2]
        assert {"NIQE", "PSNR"} <= set(history["stages"][0]["scores"])  # the fused objective's two experts
        assert set(json.loads((study / name / "eval.json").read_text())["datasets"]) == {"CSet14"}
    before = [json.loads((study / n / "history.json").read_text())["stages"][0]["scores"]
              for n in ("fused_optuna-tpe", "static_fixed")]
    assert before[0] == before[1]  # both start from the one pre-trained network
    assert not (study / "pretrain" / "eval.json").exists()  # the pre-training is not a contestant

    texts, numbers = aggregate.study(study, tmp_path / "tables")
    assert set(texts) == {"niqe", "psnr", "fused"}
    for objective in texts:  # the static run serves every objective
        assert [r["run"] for r in numbers[objective]["fixed"]] == ["static_fixed"]
    assert [r["run"] for r in numbers["fused"]["optuna-tpe"]] == ["fused_optuna-tpe"]
    assert numbers["niqe"]["optuna-tpe"] == []
    rows = {line.split("|")[1].strip(): line for line in texts["fused"].splitlines()[4:]}
    # The row's shape only: with one seed of a few iterations, whether TPE beats fixed is not what this test is about.
    assert set(rows) == {"fixed", "optuna-tpe"} and re.search(r"\| [01]/1 \| 1 \|$", rows["optuna-tpe"])
    assert (tmp_path / "tables" / "controllers_curves.png").stat().st_size > 10_000
