"""What a BasicSR user expects around the loop: TensorBoard and W&B, a help that lists the commands and every setting,
and a sheet of the feedback images per stage."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest

import lossagent
from test_run import ROOT, cli, kill_when, read_jsonl, tiny_config
from tools import configurator

needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="wandb is not installed (requirements-test.txt has it)")


def scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


@needs_wandb
def test_tensorboard_and_wandb_get_the_numbers_of_the_run(tmp_path, server):
    config = tiny_config(tmp_path, stages=2, iters=4, log_every=2, url=server.url)
    result = cli("--config", str(config), "--set", f"output.root={tmp_path / 'runs'}", "--set", "output.tensorboard=true",
                 "--set", 'output.wandb="lossagent-test"', env=dict(os.environ, WANDB_SILENT="true"))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    events = scalars(run / "tb")
    tags = set(events.Tags()["scalars"])
    assert {"loss/total", "loss/L1", "loss_weighted/GAN", "discriminator/D_real", "speed/it_per_s", "experts/PSNR",
            "weights/L1", "next_weights/SSIM", "agent/parse_rate"} <= tags
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [e.value for e in events.Scalars("loss/total")] == pytest.approx([m["loss"] for m in metrics])
    assert [e.step for e in events.Scalars("loss/total")] == [m["step"] for m in metrics] == [2, 4, 6, 8]
    assert [m["weighted"]["SSIM"] for m in metrics] == pytest.approx([m["SSIM"] * 0.1 for m in metrics[:2]]
                                                                      + [m["SSIM"] * 0.15 for m in metrics[2:]])
    history = json.loads((run / "history.json").read_text())["stages"]
    assert [e.value for e in events.Scalars("experts/PSNR")] == pytest.approx([h["scores"]["PSNR"]["mean"] for h in history[1:]])
    assert [e.step for e in events.Scalars("experts/PSNR")] == [4, 8]
    assert sorted(events.Tags()["images"]) == ["feedback/stage_1", "feedback/stage_2"]
    offline = list((run / "wandb").glob("offline-run-*"))
    run_id = (run / "wandb_id").read_text().strip()
    assert len(offline) == 1 and offline[0].name.endswith(run_id) and list(offline[0].glob("*.wandb"))


@needs_wandb
def test_a_resumed_run_goes_on_in_the_same_tensorboard_folder_and_wandb_run(tmp_path, server):
    config = tiny_config(tmp_path, stages=3, iters=12, log_every=1, url=server.url)
    command = [sys.executable, str(ROOT / "lossagent.py"), "--config", str(config), "--set", f"output.root={tmp_path / 'runs'}",
               "--set", "output.tensorboard=true", "--set", 'output.wandb="lossagent-test"']
    run, env = tmp_path / "runs" / "tiny", dict(os.environ, WANDB_SILENT="true")
    kill_when(command, run, lambda records: any(r["stage"] == 2 for r in records), env=env)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0 and "resuming" in result.stdout, result.stderr[-3000:]
    steps = [e.step for e in scalars(run / "tb").Scalars("loss/total")]
    assert steps == list(range(1, 37))  # each step once: what the killed run logged after its checkpoint is dropped
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {r.name.rsplit("-", 1)[1] for r in runs} == {(run / "wandb_id").read_text().strip()}


def test_with_both_off_neither_package_is_imported(tmp_path):
    config = tiny_config(tmp_path, stages=1, iters=1, backend="fixed")
    code = ("import sys, lossagent; lossagent.run(lossagent.load_config(sys.argv[1], [f'output.root={sys.argv[2]}'])); "
            "print('imported:', sorted(m for m in ('wandb', 'torch.utils.tensorboard', 'tensorboard') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, str(config), str(tmp_path / "runs")], capture_output=True,
                            text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported: []" in result.stdout


def test_help_lists_the_commands_and_config_lists_every_setting(tmp_path):
    result = cli("--help")
    assert result.returncode == 0
    for command in ("eval", "doctor", "prefetch", "config"):
        assert f"\n  {command} " in result.stdout
    result = cli("config", str(ROOT / "configs" / "demo.toml"))
    assert result.returncode == 0, result.stderr
    listing = result.stdout
    assert 'backend = "transformers"  # the controller; one of "transformers", "openai", "fixed"' in listing
    assert "stages = 4  # N, stages of training (the agent is asked after every stage but the last); default 3" in listing
    (tmp_path / "listed.toml").write_text(listing)  # the listing is TOML that gives back the same config
    again = lossagent.load_config(tmp_path / "listed.toml")
    assert dataclasses.asdict(again) == dataclasses.asdict(lossagent.load_config(ROOT / "configs" / "demo.toml"))
    for section in dataclasses.fields(lossagent.Config):  # every setting is there, with its comment
        cls = configurator.table_type(section)
        for f in dataclasses.fields(cls):
            assert f"\n{f.name} = " in listing or f"\n# {f.name} = " in listing, f"{section.name}.{f.name}"
            assert configurator.comments(cls)[f.name] in listing, f"{section.name}.{f.name} has no comment"


def test_every_stage_draws_its_feedback_sheet_and_the_report_links_it(tmp_path, server):
    from PIL import Image
    config = tiny_config(tmp_path, stages=2, iters=1, url=server.url)
    assert cli("--config", str(config), "--set", f"output.root={tmp_path / 'runs'}").returncode == 0
    run = tmp_path / "runs" / "tiny"
    for stage in (0, 1, 2):
        sheet = Image.open(run / "feedback" / f"stage_{stage}" / "sheet.png")
        assert sheet.width > 3 * 48 and sheet.height > 2 * 48  # two rows of input | restored | ground truth
        assert f"[sheet](feedback/stage_{stage}/sheet.png)" in (run / "report.md").read_text()
