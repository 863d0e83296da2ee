"""Experts beyond pyiqa: external programs (scores and text), a person, and the offline `doctor` check."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from test_run import ROOT, lossagent, read_jsonl, tiny_config

PROGRAM = [sys.executable, str(ROOT / "tests" / "expert_program.py")]
NIQE_FILE = ROOT.parent / "shared" / "data" / "niqe_modelparameters.mat"


def with_experts(tmp_path, experts, **tiny):
    """The tiny config with its [[experts]] replaced (an included list is replaced, not merged)."""
    base = tiny_config(tmp_path, **tiny)
    path = tmp_path / "experts.toml"
    path.write_text(f"include = '{base.name}'\n" + "".join(f"\n[[experts]]\n{e}\n" for e in experts))
    return path


def command_expert(mode, output="score", timeout=60):
    return (f'kind = "command"\nname = "Brightness"\ncommand = {json.dumps(PROGRAM + [mode])}\noutput = "{output}"\n'
            f'direction = "higher"\nmeaning = "the mean brightness of the image"\ntimeout = {timeout}')


def test_command_experts_give_scores_and_text_that_steer_the_run(tmp_path, server):
    text = command_expert("text", output="text").replace('name = "Brightness"', 'name = "Describer"')
    result = lossagent(with_experts(tmp_path, [command_expert("score"), text, 'metric = "psnr"'], url=server.url), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "runs" / "experts"
    history = json.loads((run / "history.json").read_text())
    for entry in history["stages"]:
        assert len(entry["scores"]["Brightness"]["per_image"]) == 2 and 0 < entry["scores"]["Brightness"]["mean"] < 1
        assert all(t.startswith("The image is") for t in entry["scores"]["Describer"]["per_image"])
        assert "expert_errors" not in entry
    assert history["stages"][1]["parse_ok"] == 2 and history["stages"][1]["fallback"] is None
    system, user = (m["content"] for m in read_jsonl(run / "agent.jsonl")[0]["messages"])
    assert system.count("A higher Brightness score is better.") == 1 and system.count("Describer:") == 1
    assert user.count("Brightness = ") == 2 and user.count('Describer says: "The image is') == 2
    assert "make Brightness higher and the Describer description better and PSNR higher" in user
    assert len(list((run / "feedback" / "stage_2" / "images").glob("*.png"))) == 2
    assert "Describer" not in (run / "report.md").read_text().split("| stage |")[1].split("\n")[0]


@pytest.mark.parametrize("mode,message", [
    ("sleep", "took longer than 3 s"),
    ("fail", "exited with status 3; stderr: ...the model file is missing"),
    ("garbage", "is not JSON of the form {\"scores\""),
])
def test_a_failing_program_falls_back_and_the_run_finishes(tmp_path, server, mode, message):
    result = lossagent(with_experts(tmp_path, [command_expert(mode, timeout=3), 'metric = "psnr"'], url=server.url),
                       tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert message in result.stderr
    history = json.loads((tmp_path / "runs" / "experts" / "history.json").read_text())
    stage1 = history["stages"][1]
    assert message in stage1["expert_errors"]["Brightness"] and "PSNR" in stage1["scores"]
    assert stage1["fallback"] == "keep" and stage1.get("parse_total", 0) == 0 and "experts failed" in stage1["error"]
    assert not (tmp_path / "runs" / "experts" / "agent.jsonl").exists()  # the LLM was not asked
    assert [s["stage"] for s in history["stages"]] == [0, 1, 2]


def test_a_person_answers_through_files_and_a_silent_stage_falls_back(tmp_path, server):
    human = 'kind = "human"\nname = "Rater"\ndirection = "higher"\nmeaning = "a 1-10 rating by a person"\ntimeout = 4'
    run = tmp_path / "runs" / "experts"

    def person():
        for stage in (0, 2):  # stage 1 gets no answer: the run must go on after the timeout
            folder = run / "human" / f"stage_{stage}"
            deadline = time.time() + 300
            while len(list(folder.glob("*.png"))) < 2 and time.time() < deadline:
                time.sleep(0.1)
            files = sorted(p.name for p in folder.glob("*.png"))
            (folder / "answer.tmp").write_text(json.dumps({"scores": {f: 5.0 + stage for f in files}}))
            (folder / "answer.tmp").rename(folder / "answer.json")

    thread = threading.Thread(target=person, daemon=True)
    thread.start()
    result = lossagent(with_experts(tmp_path, [human], url=server.url), tmp_path, stdin=subprocess.DEVNULL)
    thread.join(timeout=5)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"compare the images in {run / 'human' / 'stage_0'}" in result.stdout
    stages = json.loads((run / "history.json").read_text())["stages"]
    assert stages[0]["scores"]["Rater"]["per_image"] == [5.0, 5.0] and stages[2]["scores"]["Rater"]["mean"] == 7.0
    assert "no answer" in stages[1]["expert_errors"]["Rater"] and stages[1]["fallback"] == "keep"
    side_by_side = next((run / "human" / "stage_2").glob("*.png"))
    from PIL import Image
    width, height = Image.open(side_by_side).size
    assert width == 2 * height or width > height  # before | after


@pytest.mark.skipif(not NIQE_FILE.exists(), reason=f"{NIQE_FILE} is not there")
def test_doctor_reports_missing_niqe_offline_and_passes_once_it_is_placed(tmp_path):
    config = with_experts(tmp_path, ['metric = "niqe"'], backend="fixed")
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"))
    doctor = [sys.executable, str(ROOT / "lossagent.py"), "doctor", "--config", str(config)]
    result = subprocess.run(doctor, capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "MISSING  pyiqa niqe" in result.stdout and "niqe_modelparameters.mat" in result.stdout
    assert "0 present, 1 missing" in result.stdout
    (tmp_path / "torch" / "hub" / "pyiqa").mkdir(parents=True, exist_ok=True)  # pyiqa makes it when it looks
    shutil.copy(NIQE_FILE, tmp_path / "torch" / "hub" / "pyiqa")
    result = subprocess.run(doctor, capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "present  pyiqa niqe" in result.stdout and "1 present, 0 missing" in result.stdout


def test_training_fails_before_stage_0_when_a_backbone_is_missing(tmp_path):
    config = tiny_config(tmp_path, backend="fixed")
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "empty"))
    result = subprocess.run([sys.executable, str(ROOT / "lossagent.py"), "--config", str(config),
                             "--set", "losses.names=['L1', 'Perceptual']", "--set", "losses.weights=[1.0, 0.1]",
                             "--set", f"output.root={tmp_path / 'runs'}"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 2
    assert "missing files, so the run stops before training" in result.stderr and "vgg19-dcbb9e9d.pth" in result.stderr
    assert not (tmp_path / "runs" / "tiny" / "history.json").exists()


def test_offload_moves_expert_networks_and_the_llm():
    """train.offload: between stages the experts' networks and the LLM leave the training device. Here the
    'meta' device stands in for the other side, since this machine has no GPU to move off (the run's way back to
    the training device is test_run.py's test_speed_and_memory_switches_train_the_same_run, on the CPU)."""
    import torch

    from test_run import lossagent_module as lossagent
    from tools import llm
    experts = lossagent.make_experts([lossagent.ExpertConfig(metric="psnr")], torch.device("cpu"), download=False)
    llm = object.__new__(llm.TransformersLLM)
    llm.model, llm.device = torch.nn.Linear(2, 2), torch.device("cpu")
    agent = lossagent.LLMAgent(lossagent.Config(), experts, llm, [])
    lossagent.move_experts_and_llm(experts, agent, torch.device("meta"))
    assert experts[0].metric.iqa.dummy_param.device.type == experts[0].metric.iqa.device.type == "meta"
    assert llm.model.weight.device.type == llm.device.type == "meta"
