"""Tiny seeded runs whose numbers must not change: one per task and one with reflection.

    python tests/golden_runs.py            # (re)writes tests/golden/<name>.json from the current code

test_golden.py reruns them and compares with the files exactly: a refactor that changes a number is a bug,
unless the change is meant (then the file is rewritten and the commit says why). The runs are subprocesses with
one thread each, on the CPU, so that float reductions happen in the same order every time.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
sys.path.insert(0, str(ROOT / "tests"))

SWINIR = ('{ upscale = 4, img_size = 16, window_size = 4, depths = [2], embed_dim = 12, num_heads = [2], '
          'mlp_ratio = 2.0, upsampler = "%s", resi_connection = "1conv" }')
COMMON = """
[train]
stages = {stages}
iters_per_stage = 3
batch_size = 2
log_every = 1
num_workers = 0
seed = 3
[feedback]
count = 2
max_side = 48
{feedback}
[agent]
backend = "{backend}"
model = "scripted"
base_url = "{url}"
retries = 0
fallback = "perturb"
[output]
stage_checkpoints = false
"""
PHOTOS = '["skimage:astronaut", "skimage:coffee", "skimage:chelsea"]'
FEEDBACK = 'sources = ["skimage:rocket", "skimage:camera", "skimage:cat"]'
RUNS = {
    # Classical SR with a GAN term and an LLM (scripted server) steering three losses.
    "cisr": f"""[task]
name = "cisr"
[model]
args = {SWINIR % "pixelshuffle"}
[losses]
names = ["L1", "SSIM", "GAN"]
weights = [1.0, 0.1, 0.01]
options = {{ GAN = {{ num_feat = 8 }} }}
[data]
train = {PHOTOS}
patch_size = 16
[[experts]]
metric = "psnr"
[[experts]]
metric = "ssim"
""" + COMMON.format(stages=3, backend="openai", url="{url}", feedback=f'{FEEDBACK}\ndegradation = "bicubic"'),
    # Real-world SR: the degradation of a larger crop on the device, the pair pool, the sharpened target, EMA, and
    # the hillclimb controller.
    "risr": f"""[task]
name = "risr"
[model]
args = {SWINIR % "nearest+conv"}
[losses]
names = ["L1", "SSIM", "GAN"]
weights = [1.0, 1.0, 0.1]
options = {{ GAN = {{ num_feat = 8 }} }}
sharpen_gt = true
[data]
train = {PHOTOS}
patch_size = 64
degrade_size = 96
pool_size = 4
[[experts]]
metric = "psnr"
""" + COMMON.format(stages=3, backend="hillclimb", url="", feedback=f'{FEEDBACK}\ndegradation = "realesrgan"')
    .replace("seed = 3\n", "seed = 3\nema_decay = 0.9\n"),
    # All-in-one restoration: PromptIR on denoising, an LLM steering L1 and a random-backbone LPIPS.
    "air": f"""[task]
name = "air"
scale = 1
[model]
arch = "PromptIR"
args = {{ dim = 8, num_blocks = [1, 1, 1, 1], num_refinement_blocks = 1, heads = [1, 2, 4, 8], decoder = true }}
[losses]
names = ["L1", "LPIPS"]
weights = [1.0, 0.5]
options = {{ LPIPS = {{ pretrained = false }} }}
[data]
train = {PHOTOS}
patch_size = 32
[[experts]]
metric = "psnr"
""" + COMMON.format(stages=2, backend="openai", url="{url}", feedback=f'{FEEDBACK}\ndegradation = "noise"'),
}
# Reflection: a scripted expert makes stage 1 worse once, so it is undone and asked again.
RUNS["reflection"] = RUNS["cisr"].replace('[[experts]]\nmetric = "ssim"\n', """[[experts]]
kind = "command"
name = "Quality"
command = {quality}
direction = "higher"
[reflection]
enabled = true
retries = 2
""")


def scripted(body):
    """A deterministic 'LLM' for any loss names: its proposal depends on how many stages the prompt shows."""
    user = body["messages"][1]["content"]
    names = re.search(r"a line 'Weights: ([^=]+)='", user).group(1).split(":")
    stages = len(re.findall(r"^Stage \d+", user, re.M))
    weights = [round(0.9 ** stages * (k + 1) / len(names), 4) for k in range(len(names))]
    return f"Weights: {':'.join(names)}={':'.join(map(str, weights))}\nThoughts: scripted."


def run(name, folder, url):
    """Runs one golden config in `folder` and returns its numbers: history entries without the measured memory,
    and metrics.jsonl records without the measured speed."""
    folder = Path(folder)
    quality = [sys.executable, str(ROOT / "tests" / "expert_program.py"), "sequence", str(folder / "calls"),
               "10,5,12,13,14"]
    config = folder / f"{name}.toml"
    config.write_text(RUNS[name].replace("{url}", url).replace("{quality}", json.dumps(quality)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(ROOT / "lossagent.py"), "--config", str(config),
                             "--set", f"output.root={folder / 'runs'}"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    if result.returncode:
        raise RuntimeError(f"golden run {name} failed:\n{result.stderr[-3000:]}")
    run_dir = folder / "runs" / name
    history = json.loads((run_dir / "history.json").read_text())
    stages = [{k: v for k, v in s.items() if k != "memory_mib"} for s in history["stages"]]
    metrics = [{k: v for k, v in json.loads(line).items() if k != "it_per_s"}
               for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"stages": stages, "metrics": metrics, "parse_ok": history["parse_ok"],
            "parse_total": history["parse_total"]}


if __name__ == "__main__":
    import tempfile

    from conftest import ChatServer

    GOLDEN.mkdir(exist_ok=True)
    server = ChatServer(scripted)
    try:
        for name in sys.argv[1:] or RUNS:
            with tempfile.TemporaryDirectory() as tmp:
                numbers = run(name, tmp, server.url)
            (GOLDEN / f"{name}.json").write_text(json.dumps(numbers, indent=1) + "\n")
            print(f"wrote {GOLDEN / name}.json: {len(numbers['stages'])} history entries, "
                  f"{len(numbers['metrics'])} metrics records")
    finally:
        server.close()
