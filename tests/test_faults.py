"""Faults a user hits, and the README's promises about them: no finished stage is lost, and every error a user can
cause is one clear line (exit status 2, before any work where it can be found early)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image

import lossagent
from data.images import ImageError, damaged_images, load_image
from test_run import ROOT, cli, read_jsonl, tiny_config
from tools.external import ExpertError, ask_person
from tools.llm import AgentError, OpenAILLM
from tools.rundir import truncate_logs

NAMES = ["L1", "SSIM", "GAN"]
OK_BODY = json.dumps({"choices": [{"message": {"content": "Weights: L1:SSIM:GAN=0.5:0.2:0.02"}}]}).encode()


class BrokenServer:
    """An HTTP server on 127.0.0.1 that misbehaves in one way (`mode`), for at most `lifetime` seconds."""

    def __init__(self, mode, lifetime=60):
        self.mode, self.stop = mode, time.monotonic() + lifetime
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while time.monotonic() < self.stop:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn):
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(65536)
                if self.mode == "status line":
                    conn.sendall(b"HTTP/1.1 2x0 WHAT\r\nContent-Length: 2\r\n\r\n{}")
                elif self.mode == "short body":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + OK_BODY)
                elif self.mode == "nested JSON":
                    body = b"[" * 200000 + b"]" * 200000
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                elif self.mode == "other JSON":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{\"choices\":7}")
                elif self.mode == "not UTF-8":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n\xff\xfe\xfa\x00")
                elif self.mode == "trickle":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(OK_BODY))
                    for byte in OK_BODY:  # one byte every 0.3 s: each read is quick, the whole is not
                        if time.monotonic() > self.stop:
                            break
                        conn.sendall(bytes([byte]))
                        time.sleep(0.3)
            except OSError:
                pass

    def close(self):
        self.stop = 0
        self.sock.close()


@pytest.mark.parametrize("mode", ["status line", "short body", "nested JSON", "other JSON", "not UTF-8", "trickle"])
def test_any_failure_of_an_llm_request_is_an_agent_error_within_the_timeout(mode):
    server = BrokenServer(mode)
    try:
        llm = OpenAILLM(lossagent.AgentConfig(backend="openai", model="m", base_url=server.url, timeout=2, retries=1),
                        NAMES)
        start = time.monotonic()
        with pytest.raises(AgentError, match="failed after 2 tries"):
            llm.generate([[{"role": "user", "content": "x"}]], seed=0)
        assert time.monotonic() - start < 2 * 2 + 1 + 2  # two tries of at most 2 s, 1 s backoff, some slack
    finally:
        server.close()


def test_a_trickling_server_falls_back_and_the_run_finishes(tmp_path):
    server = BrokenServer("trickle", lifetime=120)
    try:
        config = tiny_config(tmp_path, stages=2, iters=1, url=server.url)
        result = subprocess.run([sys.executable, str(ROOT / "lossagent.py"), "--config", str(config),
                                 "--set", f"output.root={tmp_path / 'runs'}", "--set", "agent.timeout=1.5"],
                                capture_output=True, text=True, cwd=ROOT, timeout=300)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr[-2000:]
    stage1 = json.loads((tmp_path / "runs" / "tiny" / "history.json").read_text())["stages"][1]
    assert stage1["fallback"] == "keep" and "TimeoutError" in stage1["error"]


# -----------------------------------------------------------------------------
# 10. A bad config: one line, exit 2, before stage 0.

BAD_CONFIGS = [
    ("[train\nstages = 2\n", [], "TOML syntax error"),
    ("", ['losses.names=["L1", "Foo"]', "losses.weights=[1.0, 1.0]"], "unknown loss 'Foo'"),
    ("", ["losses.options.GAN.gan_typ=1"], "bad option(s) gan_typ for loss 'GAN'"),
    ("", ['losses.names=["L1", "L1", "GAN"]'], "losses: the loss repository lists a loss twice"),
    ("", ['losses.weights=["a", 0.1, 0.01]'], "losses.weights[0] must be float"),
    ("", ["data.train=[1, 2]"], "data.train[0] must be str"),
    ("", ["train.log_every=0"], "train.log_every = 0 must be at least 1"),
    ("", ["train.batch_size=0"], "train.batch_size = 0 must be at least 1"),
    ("", ["agent.retries=-1"], "agent.retries = -1 must be at least 0"),
    ("", ['output.name="../escape"'], "must be a plain folder name"),
    ("", ['output.name="a/b"'], "must be a plain folder name"),
    ("", ["experts.metric=niqe"], "experts is an array of tables (1 here): set experts.<i>.metric"),
]


@pytest.mark.parametrize("text,sets,message", BAD_CONFIGS)
def test_a_bad_setting_is_one_line_and_exit_2_before_any_work(tmp_path, text, sets, message):
    config = tiny_config(tmp_path, backend="fixed")
    if text:
        config.write_text(text)
    result = cli("--config", str(config), "--set", f"output.root={tmp_path / 'runs'}",
                     *[a for s in sets for a in ("--set", s)])
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escape").exists()


def test_a_syntax_error_names_the_file_line_and_column(tmp_path):
    (tmp_path / "bad.toml").write_text('[train]\nstages = 2\nlr = = 1\n')
    result = cli("--config", str(tmp_path / "bad.toml"))
    assert result.returncode == 2 and f"{tmp_path / 'bad.toml'}: TOML syntax error" in result.stderr
    assert "line 3, column" in result.stderr


def test_an_include_of_itself_and_a_file_that_is_not_utf8(tmp_path):
    (tmp_path / "loop.toml").write_text('include = "loop.toml"\n')
    result = cli("--config", str(tmp_path / "loop.toml"))
    assert result.returncode == 2 and "includes itself" in result.stderr and result.stderr.count("\n") == 1
    (tmp_path / "latin1.toml").write_bytes('# réglages\n[train]\nstages = 2\n'.encode("latin-1"))
    result = cli("--config", str(tmp_path / "latin1.toml"))
    assert result.returncode == 2 and "is not UTF-8 text" in result.stderr and result.stderr.count("\n") == 1


# -----------------------------------------------------------------------------
# 7. A command expert that answers badly, or must be stopped.

@pytest.mark.parametrize("mode", ["huge", "nan", "bytes", "wrongfiles"])
def test_a_malformed_answer_falls_back_and_quotes_the_programs_stderr(tmp_path, mode):
    from test_experts import command_expert, with_experts
    config = with_experts(tmp_path, [command_expert(mode), 'metric = "psnr"'], backend="fixed", stages=1, iters=1)
    result = cli("--config", str(config), "--set", f"output.root={tmp_path / 'runs'}")
    assert result.returncode == 0, result.stderr[-2000:]
    error = json.loads((tmp_path / "runs" / "experts" / "history.json").read_text())["stages"][1]["expert_errors"]["Brightness"]
    assert "is not JSON of the form" in error and f"stderr: ...answering {mode}" in error


def test_a_timeout_stops_the_programs_whole_process_group(tmp_path):
    from test_experts import PROGRAM, with_experts
    pidfile = tmp_path / "child.pid"
    expert = (f'kind = "command"\nname = "Slow"\ncommand = {json.dumps(PROGRAM + ["spawn", str(pidfile)])}\n'
              'direction = "higher"\ntimeout = 3')
    config = with_experts(tmp_path, [expert, 'metric = "psnr"'], backend="fixed", stages=1, iters=1)
    result = cli("--config", str(config), "--set", f"output.root={tmp_path / 'runs'}")
    assert result.returncode == 0 and "took longer than 3 s" in result.stderr, result.stderr[-2000:]
    child = int(pidfile.read_text())
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # the wrapper's child is gone with it
        os.kill(child, 0)


def test_an_answer_file_that_is_not_utf8_falls_back(tmp_path):
    answer = tmp_path / "human" / "stage_1" / "answer.json"
    answer.parent.mkdir(parents=True)
    answer.write_bytes(b'{"scores": {"a.png": 1.0}}\xff\xfe')
    feedback = [{"name": "a", "lq": torch.zeros(1, 3, 4, 4), "gt": None}]
    with pytest.raises(ExpertError, match="answer.json is not JSON"):
        ask_person("Person", 5, [torch.zeros(1, 3, 8, 8)], feedback, False, 1, tmp_path)


# -----------------------------------------------------------------------------
# 2-6. The run folder: a crash between its files, a damaged checkpoint, two runs at once, a changed rerun, an extension.

def tiny_run(tmp_path, name, *extra, stages=2, backend="random", check=True):
    config = tiny_config(tmp_path, stages=stages, iters=2, backend=backend)
    result = cli("--config", str(config), "--set", f"output.root={tmp_path / 'runs'}", "--set", f"output.name={name}",
                     *extra)
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


def stages_of(run):
    return [{k: v for k, v in s.items() if k != "memory_mib"} for s in json.loads((run / "history.json").read_text())["stages"]]


def test_a_rerun_after_a_crash_between_the_checkpoint_and_the_files_rewrites_them(tmp_path):
    tiny_run(tmp_path, "whole")
    tiny_run(tmp_path, "one", stages=1)
    whole, one = tmp_path / "runs" / "whole", tmp_path / "runs" / "one"
    written = {f: (whole / f).read_bytes() for f in ("history.json", "report.md", "experience.json")}
    # What a kill right after ckpt/last.pt of stage 2 leaves: the files of stage 1, no ckpt/stage_2.pt.
    for f in ("history.json", "report.md", "experience.json", "curves.png"):
        shutil.copy(one / f, whole / f)
    (whole / "ckpt" / "stage_2.pt").unlink()
    result = tiny_run(tmp_path, "whole")
    assert "resuming" in result.stdout and "after stage 2" in result.stdout
    history = json.loads((whole / "history.json").read_text())
    assert [s["stage"] for s in history["stages"]] == [0, 1, 2]
    assert {f: (whole / f).read_bytes() for f in written} == written
    assert (whole / "ckpt" / "stage_2.pt").exists() and (whole / "curves.png").read_bytes() != (one / "curves.png").read_bytes()


def test_a_log_line_torn_by_the_kill_is_dropped_on_resume(tmp_path):
    kept = json.dumps({"stage": 1, "attempt": 0, "loss": 0.5}) + "\n"
    log = tmp_path / "agent.jsonl"
    log.write_bytes(kept.encode() + json.dumps({"stage": 2, "attempt": 0, "reply": "Weights: ..."}).encode()[:30])
    truncate_logs([log], 1, 0)
    assert log.read_text() == kept


def test_a_damaged_last_checkpoint_resumes_from_the_newest_intact_stage(tmp_path):
    tiny_run(tmp_path, "whole")
    tiny_run(tmp_path, "damaged")
    ckpt = tmp_path / "runs" / "damaged" / "ckpt"
    data = (ckpt / "last.pt").read_bytes()
    (ckpt / "last.pt").write_bytes(data[:len(data) // 2])  # a killed copy, a full disk
    (ckpt / "stage_2.pt").unlink()
    result = tiny_run(tmp_path, "damaged")
    assert "last.pt cannot be read" in result.stderr and "resuming from" in result.stderr and "stage_1.pt" in result.stderr
    assert "after stage 1" in result.stdout and (ckpt / "last.pt.corrupt").exists()
    assert stages_of(tmp_path / "runs" / "damaged") == stages_of(tmp_path / "runs" / "whole")
    for path in ckpt.glob("stage_*.pt"):
        path.unlink()
    (ckpt / "last.pt").write_bytes(b"not a checkpoint")
    result = tiny_run(tmp_path, "damaged", check=False)
    assert result.returncode == 2 and "no intact" in result.stderr and result.stderr.count("\n") == 1


def test_one_run_folder_holds_one_run(tmp_path):
    config = tiny_config(tmp_path, stages=3, iters=12, backend="random")
    command = [sys.executable, str(ROOT / "lossagent.py"), "--config", str(config), "--set", f"output.root={tmp_path / 'runs'}"]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "tiny"
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and first.poll() is None):
        time.sleep(0.05)
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2 and f"is in use by pid {first.pid}" in second.stderr, second.stderr[-2000:]
    assert [r["iteration"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 37))  # not cut by the second
    (run / "lock").write_text("pid 999999 on a-dead-host since long ago\n")  # left by a killed run: taken over
    assert subprocess.run(command + ["--set", "train.stages=4"], cwd=ROOT, capture_output=True, timeout=300).returncode == 0


def test_a_rerun_may_change_only_what_does_not_change_results(tmp_path):
    tiny_run(tmp_path, "run")
    for change, named in [("fusion.enabled=true", "fusion.enabled"), ("reflection.enabled=true", "reflection.enabled"),
                          ("agent.perturb_scale=0.5", "agent.perturb_scale"), ("train.lr=0.5", "train.lr")]:
        result = tiny_run(tmp_path, "run", "--set", change, check=False)
        assert result.returncode == 2 and f"other settings ({named})" in result.stderr, result.stderr[-2000:]
    tiny_run(tmp_path, "run", "--set", "train.log_every=2", "--set", "agent.timeout=30", "--set", "eval.tile=64")


def test_extending_a_run_asks_the_controller_for_the_new_stage(tmp_path):
    tiny_run(tmp_path, "whole", stages=3, backend="hillclimb")
    tiny_run(tmp_path, "extended", stages=2, backend="hillclimb")
    extended = tmp_path / "runs" / "extended"
    assert "next_weights" not in stages_of(extended)[2]  # a finished run: its last stage asked nothing
    tiny_run(tmp_path, "extended", stages=3, backend="hillclimb")
    stages = stages_of(extended)
    assert stages[2]["next_weights"] == stages[3]["weights"] and stages[2]["controller"]["index"] == 0
    assert stages == stages_of(tmp_path / "runs" / "whole")  # as if it had been asked for 3 stages at once
    assert [r["stage"] for r in read_jsonl(extended / "agent.jsonl")] == [1, 2]


# -----------------------------------------------------------------------------
# 11. Images: damaged, too small, missing ground truth; eval.json stays JSON.



def photo(tmp_path, name, size=None, truncate=False):
    from PIL import Image

    from data.images import load_image
    img = load_image("skimage:coffee")
    path = tmp_path / "images" / name
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(img[:size, :size] if size else img).save(path)
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    return path


def test_an_image_too_large_to_trust_is_named_as_damaged(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 is then a decompression bomb, as PIL sees it
    found = damaged_images([str(path)])
    assert len(found) == 1 and found[0].startswith(f"{path} (") and "decompression bomb" in found[0]
    with pytest.raises(ImageError, match="cannot read the image"):
        load_image(str(path))


def test_a_damaged_training_image_is_named_before_stage_0(tmp_path):
    photo(tmp_path, "whole.png")
    damaged = photo(tmp_path, "half.png", truncate=True)
    result = tiny_run(tmp_path, "run", "--set", f"data.train=['{tmp_path / 'images'}']", backend="fixed", check=False)
    assert result.returncode == 2 and str(damaged) in result.stderr and "truncated" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "runs" / "run" / "history.json").exists()


def test_a_damaged_feedback_image_is_named_before_stage_0(tmp_path):
    damaged = photo(tmp_path, "half.png", truncate=True)
    result = tiny_run(tmp_path, "run", "--set", f"feedback.sources=['{damaged}']", "--set", "feedback.count=1",
                      backend="fixed", check=False)
    assert result.returncode == 2 and f"cannot read the image {damaged}" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "runs" / "run" / "history.json").exists()


def test_a_feedback_image_too_small_for_a_metric_is_named_with_its_size(tmp_path, niqe_torch_home):
    env = dict(os.environ, TORCH_HOME=str(niqe_torch_home))
    small = photo(tmp_path, "small.png", size=40)  # restored x4 to 40x40 (a multiple of 4): too small for NIQE's 96 blocks
    config = tiny_config(tmp_path, stages=1, iters=1, backend="fixed")
    result = cli("--config", str(config), "--set", f"output.root={tmp_path / 'runs'}", "--set", "experts.0.metric=niqe",
                     "--set", f"feedback.sources=['{small}']", "--set", "feedback.count=1", env=env)
    assert result.returncode == 2 and "niqe cannot score the image small (40x40 pixels)" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "runs" / "tiny" / "history.json").exists()


def test_eval_mistakes_are_one_line_and_eval_json_stays_json(tmp_path):
    photo(tmp_path, "a.png", size=64)
    folder = str(tmp_path / "images")
    result = cli("eval", "--images", folder, "--metrics", "psnr")
    assert result.returncode == 2 and "give its folder with --gt" in result.stderr and result.stderr.count("\n") == 1
    (tmp_path / "gt").mkdir()
    result = cli("eval", "--images", folder, "--gt", str(tmp_path / "gt"), "--metrics", "psnr")
    assert result.returncode == 2 and result.stderr.count("\n") == 1  # a folder without images
    shutil.copy(tmp_path / "images" / "a.png", tmp_path / "gt" / "b.png")
    result = cli("eval", "--images", folder, "--gt", str(tmp_path / "gt"), "--metrics", "psnr")
    assert result.returncode == 2 and "has no image named a" in result.stderr and result.stderr.count("\n") == 1
    result = cli("eval", "--images", folder, "--metrics", "no_such_metric")
    assert result.returncode == 2 and "unknown metric 'no_such_metric'" in result.stderr and result.stderr.count("\n") == 1
    shutil.copy(tmp_path / "images" / "a.png", tmp_path / "gt" / "a.png")  # identical: an infinite PSNR
    out = tmp_path / "eval.json"
    result = cli("eval", "--images", folder, "--gt", str(tmp_path / "gt"), "--metrics", "psnr,ssim", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    document = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert document["metrics"]["psnr"]["mean"] is None and document["metrics"]["ssim"]["mean"] == pytest.approx(1.0)


def test_a_rerun_compares_a_setting_new_to_the_run_with_its_default_and_keeps_the_ranks(tmp_path):
    import torch
    tiny_run(tmp_path, "old")
    last = tmp_path / "runs" / "old" / "ckpt" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    del ckpt["config"]["data"]["pool_size"]  # a run begun before the setting existed
    torch.save(ckpt, last)
    result = tiny_run(tmp_path, "old", "--set", "data.pool_size=2", check=False)
    assert result.returncode == 2 and "other settings (data.pool_size)" in result.stderr
    assert tiny_run(tmp_path, "old").returncode == 0  # at its default: the same run
    ckpt = torch.load(last, weights_only=True)
    ckpt["rng"], ckpt["pairs"] = ckpt["rng"] * 2, ckpt["pairs"] * 2  # as if trained by two ranks
    torch.save(ckpt, last)
    result = tiny_run(tmp_path, "old", check=False)
    assert result.returncode == 2 and "was trained with 2 ranks" in result.stderr and result.stderr.count("\n") == 1
