"""Unit tests of the agent side of lossagent.py: parser, proposal averaging, prompt, config, OpenAI client."""
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lossagent
from conftest import ChatServer
from lossagent import AgentConfig, AgentError, Config, ConfigError, average_proposals, build_messages, load_config, parse_weights
from tools.llm import OpenAILLM
from tools.configurator import to_toml

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["L1", "Perceptual", "GAN"]

# Replies of the shapes real LLMs write, with the weights the parser must read (None: no valid proposal).
REPLIES = [
    ("Weights: L1:Perceptual:GAN=0.7:0.3:0.05\nThoughts: the GAN term helps NIQE.", [0.7, 0.3, 0.05]),
    ("Weights: L1:Perceptual:GAN = 0.7 : 0.3 : 0.05", [0.7, 0.3, 0.05]),
    ("**Weights:** L1:Perceptual:GAN=0.8:0.2:0.1\n**Thoughts:** more L1.", [0.8, 0.2, 0.1]),
    ("weights: l1:perceptual:gan=1e-1:2E-2:3.5e-3", [0.1, 0.02, 0.0035]),
    ("WEIGHTS: L1:PERCEPTUAL:GAN=1:0.1:0.01", [1.0, 0.1, 0.01]),
    ("Sure! Based on the history I suggest:\n\nWeights: L1:Perceptual:GAN=0.6:0.25:0.02\nThoughts: NIQE fell.",
     [0.6, 0.25, 0.02]),
    ("Weights: Perceptual:L1:GAN=0.3:0.7:0.05", [0.7, 0.3, 0.05]),
    ("Weights: 0.5:0.4:0.1", [0.5, 0.4, 0.1]),
    ("L1=0.9, Perceptual=0.2, GAN=0.03", [0.9, 0.2, 0.03]),
    ("Weights: L1: 0.7, Perceptual: 0.3, GAN: 0.05", [0.7, 0.3, 0.05]),
    ("`Weights: L1:Perceptual:GAN=0.7:0.3:0.05`", [0.7, 0.3, 0.05]),
    ("```\nWeights: L1:Perceptual:GAN=0.4:0.4:0.2\nThoughts: balance\n```", [0.4, 0.4, 0.2]),
    ("Weights: L1:Perceptual:GAN=.7:.3:.05", [0.7, 0.3, 0.05]),
    ("Weights: L1:Perceptual:GAN=0.7:0.3:0.05.", [0.7, 0.3, 0.05]),
    ("Weights: L1:Perceptual:GAN=+0.7:+0.3:+0.05", [0.7, 0.3, 0.05]),
    ("Weights: L1:Perceptual:GAN=1:0:0.05", [1.0, 0.0, 0.05]),
    ("Previously L1:Perceptual:GAN=1:0.1:0.01 was used.\nWeights: L1:Perceptual:GAN=0.6:0.2:0.02", [0.6, 0.2, 0.02]),
    ("Weights: L1:Perceptual:GAN=0.7:0.3:0.05 or maybe L1:Perceptual:GAN=0.1:0.1:0.1", [0.7, 0.3, 0.05]),
    ("Thoughts: keep L1 high.\nWeights: L1:Perceptual:GAN=0.9:0.1:0.01", [0.9, 0.1, 0.01]),
    ("> Weights: L1:Perceptual:GAN=0.7:0.3:0.05", [0.7, 0.3, 0.05]),
    ("### Weights\nL1:Perceptual:GAN=0.55:0.35:0.04", [0.55, 0.35, 0.04]),
    ("Weights:L1:Perceptual:GAN=0.7:0.3:0.05Thoughts:x", [0.7, 0.3, 0.05]),
    ("Weights: L1:Perceptual:GAN=7e-1:3e-1:5e-2", [0.7, 0.3, 0.05]),
    # No valid proposal.
    ("Weights: L1:Perceptual:GAN=0.7:0.3", None),
    ("Weights: L1:Perceptual:GAN=0.7:0.3:0.05:0.2", None),
    ("Weights: L1:Perceptual:GAN=0.7:-0.3:0.05", None),
    ("Weights: L1:Perceptual:GAN=nan:0.3:0.05", None),
    ("Weights: L1:Perceptual:GAN=inf:0.3:0.05", None),
    ("Weights: L1:Perceptual:GAN=1000:0.3:0.05", None),
    ("Weights: L1:Perceptual:GAN=0:0:0", None),
    ("I think we should increase the L1 weight and lower the GAN weight.", None),
    ("", None),
    ("Weights: L1:SSIM:GAN=0.7:0.3:0.05", None),
    ("Weights: L1:Perceptual:GAN=a:b:c", None),
    ("Weights: L1:L1:GAN=0.7:0.3:0.05", None),
    ("L1=0.9, GAN=0.03", None),
    ("This is a case of the \"L1-Perceptual:GAN:L1-Perceptual:GAN:L1-Perceptual:GAN:L", None),
    ("Stage 2: L1:Perceptual:GAN=1.1:0.01, PSNR=24.5", None),
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0, 10).map(lambda w: round(w, 4)), min_size=3, max_size=3).filter(any),
       st.permutations(range(3)), st.sampled_from(["", "**", "`"]), st.sampled_from(["=", " = ", ":"]),
       st.sampled_from([":", " : "]), st.sampled_from(["{:g}", "{:.4f}", "{:e}"]), st.booleans(),
       st.sampled_from(["", "Sure! Based on the history:\n\n", "Thoughts: first.\n"]))
def test_parser_reads_every_shape_of_a_weights_line(weights, order, wrap, equals, colon, number, upper, before):
    """A Weights line in the names' order or any other, with markdown, spacing, casing, number formats and text
    around it, reads back as the weights in the loss repository's order."""
    names = [NAMES[i] for i in order]
    line = (f"{wrap}Weights:{wrap} {colon.join(names)}{equals}"
            + colon.join(number.format(weights[i]) for i in order))
    reply = before + (line.upper() if upper else line) + "\nThoughts: the GAN term helps."
    assert parse_weights(reply, NAMES) == pytest.approx(weights, rel=1e-5)


@pytest.mark.parametrize("reply,expected", REPLIES)
def test_parse_weights(reply, expected):
    got = parse_weights(reply, NAMES)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


@pytest.mark.parametrize("reply", [
    "L1=" + "1" * 20000 + ":",  # a 20,000-digit number (took 45 s with backtracking patterns)
    "Weights: L1:Perceptual:GAN=0.7:0.3\n" * 30000,  # 1 MB of weight lines, none valid
    "L1:" * 330000,  # 1 MB of a chain of names that never ends in numbers
    "L1 : " * 200000,
    "1:" * 500000,
    " " * 500000 + "Weights:" + " " * 500000,
    "".join(__import__("random").Random(0).choice("L1PerceptualGANWeights:=.-+e0123456789 \n*_nafi,") for _ in range(10**6)),
])
def test_parse_weights_reads_a_megabyte_of_anything_in_well_under_a_second(reply):
    import time
    start = time.perf_counter()
    assert parse_weights(reply, NAMES) is None
    assert time.perf_counter() - start < 0.8
    valid = reply + "\nWeights: L1:Perceptual:GAN=0.7:0.3:0.05"  # one valid proposal at the very end is still found
    start = time.perf_counter()
    assert parse_weights(valid, NAMES) == pytest.approx([0.7, 0.3, 0.05])
    assert time.perf_counter() - start < 0.8


@pytest.mark.parametrize("reply,expected", [
    ("Weights: L1=0.7, Perceptual=0.2, GAN=0.01\nThoughts: before, L1:Perceptual:GAN=1:0.1:0.01", [0.7, 0.2, 0.01]),
    ("L1=0.7, Perceptual=0.2, GAN=0.01.", [0.7, 0.2, 0.01]),
    ("L1=0.7, Perceptual=0.2, GAN=0.01\nThoughts: raising L1=0.9 helped before", [0.7, 0.2, 0.01]),
    ("Before: L1:Perceptual:GAN=1:0.1:0.01\n- Weights: L1:Perceptual:GAN=0.6:0.2:0.05", [0.6, 0.2, 0.05]),
    ("Before: L1:Perceptual:GAN=1:0.1:0.01\n1. New weights: L1:Perceptual:GAN=0.6:0.2:0.05", [0.6, 0.2, 0.05]),
    ("Before: L1:Perceptual:GAN=1:0.1:0.01\n| Weights | L1:Perceptual:GAN=0.6:0.2:0.05 |", [0.6, 0.2, 0.05]),
    ("Stage 1 had L1:Perceptual:GAN=1:0.1:0.01\n## Weights\nL1:Perceptual:GAN=0.6:0.2:0.05", [0.6, 0.2, 0.05]),
    ("Given L1:Perceptual:GAN=1:0.1:0.01, I propose Weights: L1:Perceptual:GAN=0.7:0.2:0.01", [0.7, 0.2, 0.01]),
    ("The previous weights were L1:Perceptual:GAN=1:0.1:0.01.\nWeights: L1:Perceptual:GAN=0.7:0.2:0.01", [0.7, 0.2, 0.01]),
    ("L1=0.7\nPerceptual=0.2\nGAN=0.01", [0.7, 0.2, 0.01]),
    ("GAN=0.01:0.5, L1=1, Perceptual=2", None),
])
def test_a_labelled_proposal_wins_over_an_echo_of_the_history(reply, expected):
    got = parse_weights(reply, NAMES)
    assert got == (None if expected is None else pytest.approx(expected))


def test_parse_weights_respects_configured_bounds():
    assert parse_weights("Weights: L1:Perceptual:GAN=5:1:1", NAMES, max_weight=4) is None
    assert parse_weights("Weights: L1:Perceptual:GAN=0.05:1:1", NAMES, min_weight=0.1) is None
    assert parse_weights("Weights: L1:Perceptual:GAN=5:1:1", NAMES, max_weight=5) == [5, 1, 1]


def test_parse_weights_never_evaluates_code():
    assert parse_weights("Weights: L1:Perceptual:GAN=__import__('os').getpid():1:1", NAMES) is None


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("L1PerceptualGANWeights:=.-+e0123456789 \n*_nafi,")), max_size=120)
       | st.text(max_size=200))
def test_parse_weights_never_raises_nor_returns_invalid(text):
    got = parse_weights(text, NAMES, 0.0, 10.0)
    if got is not None:
        assert len(got) == 3
        assert all(math.isfinite(w) and 0.0 <= w <= 10.0 for w in got)
        assert any(w > 0 for w in got)


def test_average_proposals():
    assert average_proposals([[1.0, 0.2, 0.0], [0.5, 0.4, 0.1]]) == pytest.approx([0.75, 0.3, 0.05])
    assert average_proposals([[0.3, 0.3]]) == [0.3, 0.3]


def history(stages):
    """A run's history: per-image PSNR for 2 images and mean, as run() records it."""
    return [{"stage": s, "iteration": 10 * s, "weights": {"L1": 1.0 - 0.1 * s, "Perceptual": 0.1, "GAN": 0.01},
             "scores": {"PSNR": {"per_image": [20.0 + s, 30.0 + s], "mean": 25.0 + s},
                        "NIQE": {"per_image": [6.0 - s, 5.0 - s], "mean": 5.5 - s}}}
            for s in range(stages + 1)]


def expert(name, lower_better, meaning, text=False, **kw):
    return lossagent.Expert(name, lower_better, meaning, text=text, score_range=tuple(kw.get("range", ())) or None,
                            cfg=lossagent.ExpertConfig(**kw))


def prompt(image=None, experts=(expert("PSNR", False, "PSNR, fidelity"),), entries=None, fusion=False, **agent):
    cfg = Config()
    cfg.losses.names = NAMES
    cfg.feedback.count = 2
    cfg.fusion.enabled = fusion
    for k, v in agent.items():
        setattr(cfg.agent, k, v)
    system, user = build_messages(cfg, NAMES, list(experts), entries or history(3), image)
    assert system["role"] == "system" and user["role"] == "user"
    return system["content"], user["content"]


def test_prompt_direction_sentence_only_when_enabled():
    system, user = prompt()
    assert "A higher PSNR score is better." in system
    assert "make PSNR higher" in user
    system, user = prompt(direction_sentence=False)
    assert "better." not in system.replace("best possible", "")
    assert "higher" not in system + user and "lower" not in system + user


def test_prompt_full_and_last_two_history():
    _, full = prompt()
    assert "Before training (initial weights L1:Perceptual:GAN=1:0.1:0.01)" in full
    assert all(f"Stage {s} (trained with" in full for s in (1, 2, 3))
    _, last2 = prompt(history="last2")
    assert "Before training" not in last2 and "Stage 1 (" not in last2
    assert "Stage 2 (trained with weights L1:Perceptual:GAN=0.8:0.1:0.01)" in last2 and "Stage 3 (" in last2


def test_prompt_per_image_scores_versus_mean():
    _, image1 = prompt(image=1)
    assert "PSNR = 33" in image1 and "PSNR = 28" not in image1
    _, pooled = prompt()
    assert "PSNR = 28" in pooled and "PSNR = 33" not in pooled


def test_prompt_format_example_switch():
    _, user = prompt()
    assert "Example:\nWeights: L1:Perceptual:GAN=0.7:0.3:0.05" in user
    assert "'Weights: L1:Perceptual:GAN='" in user
    _, user = prompt(format_example=False)
    assert "Example" not in user and "'Weights: L1:Perceptual:GAN='" in user
    assert "small random change" in user


def test_prompt_each_expert_once_per_stage():
    experts = (expert("PSNR", False, "PSNR, fidelity"), expert("NIQE", True, "NIQE, naturalness"))
    system, user = prompt(experts=experts)
    assert system.count("A lower NIQE score is better.") == 1 and system.count("A higher PSNR score is better.") == 1
    assert user.count("NIQE = ") == 4 and user.count("PSNR = ") == 4
    assert "make PSNR higher and NIQE lower" in user


def test_example_reply_of_the_prompt_parses():
    _, user = prompt()
    example = user.split("Example:\n")[1]
    assert parse_weights(example, NAMES) == [0.7, 0.3, 0.05]


def write(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_config_include_and_overrides(tmp_path):
    base = write(tmp_path, "[train]\nstages = 5\nlr = 1e-4\n[agent]\nbackend = 'fixed'\n", "base.toml")
    child = write(tmp_path, f"include = '{base.name}'\n[train]\nstages = 2\n")
    cfg = load_config(child, ["train.lr=0.001", "agent.history=last2", "model.args.embed_dim=60", "train.iters_per_stage=3"])
    assert (cfg.train.stages, cfg.train.lr, cfg.agent.history, cfg.agent.backend) == (2, 0.001, "last2", "fixed")
    assert cfg.model.args == {"embed_dim": 60} and cfg.train.iters_per_stage == 3
    assert cfg.output.name == "c"
    cfg = load_config(child, ["experts.0.metric=niqe", "train.lr=1"])  # an int where a float is expected
    assert cfg.experts[0].metric == "niqe" and cfg.train.lr == 1.0


@pytest.mark.parametrize("override,message", [
    ("train.stagez=3", "unknown key 'train.stagez'; valid keys of [train]: stages, iters_per_stage"),
    ("train.stages=three", "train.stages must be int, got 'three'"),
    ("train.stages=2.5", "train.stages must be int"),
    ("agent.per_image=1", "agent.per_image must be bool"),
    ("agent.backend=gpt", "agent.backend = 'gpt' is not one of: transformers, openai, fixed, random, hillclimb, optuna-tpe"),
    ("trainer.stages=3", "expected section.key with section one of: task, model"),
    ("losses.weights=[1.0]", "must be non-empty lists of the same length"),
    ("losses.weights=[1.0, 0.1, 50.0]", "outside [losses.min_weight, losses.max_weight]"),
])
def test_config_errors(tmp_path, override, message):
    path = write(tmp_path, "[agent]\nbackend = 'fixed'\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path, [override])


def test_bad_config_exits_2_listing_valid_keys(tmp_path):
    path = write(tmp_path, "[train]\nstagez = 3\n")
    result = subprocess.run([sys.executable, str(ROOT / "lossagent.py"), "--config", str(path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown key 'train.stagez'; valid keys of [train]: stages, iters_per_stage, batch_size" in result.stderr
    result = subprocess.run([sys.executable, str(ROOT / "lossagent.py"), "--config", str(tmp_path / "nope.toml")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "config file not found" in result.stderr


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.toml", ["losses.options.GAN.gan_type=hinge"])
    text = to_toml(lossagent.asdict(cfg))
    again = load_config(write(tmp_path, text, "demo.toml"))
    assert lossagent.asdict(again) == lossagent.asdict(cfg)


def test_every_config_in_configs_loads():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        load_config(path)


def test_openai_agent_sends_chat_requests_concurrently():
    server = ChatServer(lambda body: f"Weights: L1:GAN=0.5:{len(body['messages'])}")
    try:
        agent = OpenAILLM(AgentConfig(backend="openai", model="llama3", base_url=server.url, api_key="k", concurrency=4), NAMES)
        replies = agent.generate([[{"role": "user", "content": str(i)}] for i in range(6)], seed=7)
    finally:
        server.close()
    assert replies == ["Weights: L1:GAN=0.5:1"] * 6
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer k"
    assert body["model"] == "llama3" and body["seed"] == 7 and body["max_tokens"] == 96


def test_openai_agent_retries_then_gives_a_clear_error():
    server = ChatServer(lambda body: "Weights: 1:1", fail=2)
    try:
        agent = OpenAILLM(AgentConfig(backend="openai", model="m", base_url=server.url, retries=2), NAMES)
        assert agent.generate([[{"role": "user", "content": "x"}]], seed=0) == ["Weights: 1:1"]
        server.fail = 10
        with pytest.raises(AgentError, match="failed after 3 tries.*HTTP 500.*check that it is running"):
            agent.generate([[{"role": "user", "content": "x"}]], seed=0)
    finally:
        server.close()
    down = OpenAILLM(AgentConfig(backend="openai", model="m", base_url="http://127.0.0.1:9/v1", retries=0, timeout=2), NAMES)
    with pytest.raises(AgentError, match="127.0.0.1:9/v1/chat/completions failed after 1 tries"):
        down.generate([[{"role": "user", "content": "x"}]], seed=0)


def test_the_agent_averages_proposals_and_falls_back_when_nothing_parses():
    cfg = Config()
    cfg.losses.names, cfg.feedback.count = NAMES, 2
    experts = [expert("PSNR", False, "PSNR")]

    class Replies:
        def __init__(self, replies):
            self.replies = replies

        def generate(self, conversations, seed):
            assert len(conversations) == 2
            return self.replies

    def propose(llm):
        return lossagent.LLMAgent(cfg, experts, llm, []).propose(history(1), weights, 1, 0)

    weights = [1.0, 0.1, 0.01]
    new, record, logs = propose(Replies(["Weights: 0.5:0.2:0.02", "Weights: 0.7:0.4:0.0"]))
    assert new == pytest.approx([0.6, 0.3, 0.01]) and record["fallback"] is None and record["parse_ok"] == 2
    new, record, logs = propose(Replies(["no idea", "none"]))
    assert new == weights and record["fallback"] == "keep" and record["parse_ok"] == 0 and not logs[0]["ok"]
    cfg.agent.fallback = "perturb"
    new, record, _ = propose(Replies(["?", "?"]))
    again, _, _ = propose(Replies(["?", "?"]))
    assert record["fallback"] == "perturb" and new == again and new != weights
    assert all(abs(n / w - 1) <= 0.1 + 1e-12 for n, w in zip(new, weights))

    class Down:
        def generate(self, conversations, seed):
            raise AgentError("the LLM server is down")

    new, record, logs = propose(Down())
    assert record["error"] == "the LLM server is down" and record["fallback"] == "perturb" and len(logs) == 2


def test_prompt_for_a_text_expert_quotes_each_stage():
    entries = history(2)
    for e in entries:
        e["scores"]["Co-Instruct"] = {"per_image": [f"stage {e['stage']} image one is blurry " + "x" * 50,
                                                    f"stage {e['stage']} image two is noisy"]}
    experts = (expert("Co-Instruct", None, "a quality description by an MLLM", text=True, max_chars=30),)
    system, user = prompt(image=1, experts=experts, entries=entries)
    assert "Its feedback is a description in words, not a number" in system
    assert [f'Co-Instruct says: "stage {s} image two is noisy"' in user for s in (0, 1, 2)] == [True] * 3
    assert "image one" not in user and "make the Co-Instruct description better" in user
    _, pooled = prompt(experts=experts, entries=entries)
    assert 'Co-Instruct on image 1: "stage 2 image one is blurry xx..."' in pooled  # cut at 30 chars
    assert pooled.count("Co-Instruct on image 2:") == 3


def test_prompt_marks_a_failed_expert_and_shows_the_fused_score():
    entries = history(2)
    del entries[1]["scores"]["NIQE"]
    experts = (expert("PSNR", False, "PSNR", range=[20, 40]), expert("NIQE", True, "NIQE", range=[0, 10]))
    system, user = prompt(experts=experts, entries=entries, fusion=True)
    assert "NIQE: unavailable (the expert failed)" in user
    assert user.count("Fused score = ") == 3 and "A higher fused score is better." in system
    # Stage 2, mean scores: PSNR 27 -> (27-20)/20 = 0.35; NIQE 3.5 (lower better) -> 1 - 0.35 = 0.65; mean 0.5.
    assert "Stage 2 (trained with weights L1:Perceptual:GAN=0.8:0.1:0.01):\n  PSNR = 27\n  NIQE = 3.5\n  Fused score = 0.5" in user


def test_fused_score_by_hand():
    psnr = lossagent.Expert("PSNR", False, "", full_reference=True, score_range=(20.0, 40.0))
    niqe = lossagent.Expert("NIQE", True, "", score_range=(0.0, 10.0))
    words = lossagent.Expert("Words", None, "", text=True)
    scores = {"PSNR": {"per_image": [25.0, 35.0], "mean": 30.0}, "NIQE": {"per_image": [8.0, 2.0], "mean": 5.0},
              "Words": {"per_image": ["ok", "ok"]}}
    fusion = lossagent.FusionConfig(enabled=True)
    assert lossagent.fused_score([psnr, niqe, words], scores, fusion) == pytest.approx((0.5 + 0.5) / 2)
    assert lossagent.fused_score([psnr, niqe], scores, fusion, image=0) == pytest.approx((0.25 + 0.2) / 2)
    fusion.profile = "fidelity"  # full-reference experts count 4x
    assert lossagent.fused_score([psnr, niqe], scores, fusion, image=1) == pytest.approx((4 * 0.75 + 0.8) / 5)
    fusion.profile, fusion.weights = "custom", {"NIQE": 1.0}
    assert lossagent.fused_score([psnr, niqe], scores, fusion, image=1) == pytest.approx(0.8)
    out_of_range = {"PSNR": {"per_image": [50.0], "mean": 50.0}}
    assert lossagent.fused_score([psnr], out_of_range, lossagent.FusionConfig()) == 1.0
