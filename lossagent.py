"""
LossAgent: an LLM agent steers the loss weights of an image-restoration network,
stage by stage, towards any objective an expert can score or describe.

Reference implementation of "LossAgent: Towards Any Optimization Objectives for
Image Processing with LLM Agents" (Li et al.). Training is split into N stages of
K iterations. The loss is a weighted sum over a loss repository (L1, Perceptual,
GAN, LPIPS, ...). After every stage the network restores T fixed feedback images,
experts score them, and an LLM reads the whole history of weights and scores and
proposes the weights of the next stage.

One process (CPU or one GPU):
    python lossagent.py --config configs/demo.toml
    python lossagent.py --config configs/cisr_niqe.toml --set train.batch_size=8
One node, 8 GPUs (DDP; rank 0 scores, queries the agent and saves):
    torchrun --nproc_per_node=8 lossagent.py --config configs/cisr_niqe.toml
SLURM (one 8-GPU job; requeue-safe, reruns resume from the last stage):
    sbatch slurm/cisr.sh
Evaluate a checkpoint on the configured benchmarks, or score a folder of images:
    python lossagent.py eval --config configs/cisr_niqe.toml --ckpt runs/cisr_niqe/ckpt/last.pt
    python lossagent.py eval --images path/to/folder --metrics niqe,psnr --out scores.json
Check offline that every weight file the config needs is in place, or download them (login node):
    python lossagent.py doctor --config configs/cisr_niqe.toml
    python lossagent.py prefetch --config configs/cisr_niqe.toml

Rerunning the same command continues a crashed or killed run from its last
finished stage. Settings are overridden with `--set section.key=value`.
The file reads in execution order: config, data, experts, prompt, agent and
parser, controllers, stage trainer, run(), main(). What is not the method
(TOML machinery, evaluation, doctor, reports, run-folder files) lives in tools/.
"""
import argparse
import copy
import importlib.util
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data.benchmark import MEANINGS, Metric, MetricError, score
from data.feedback import feedback_images
from data.images import ImageError
from data.pairs import TrainingPairs
from losses import build_loss_repository
from models import build_network as make_network, load_pretrained
from tools import configurator, doctor, evaluate, report
from tools.configurator import Above, AtLeast, Below, ConfigError
from tools.evaluate import BenchmarkConfig, EvalConfig
from tools.external import ExpertError, ask_person, ask_program, write_images
from tools.llm import AgentError, OpenAILLM, TransformersLLM
from tools.report import fmt, peak_memory_mib, weights_text
from tools.runlog import RunLog
from tools.rundir import (MAY_CHANGE, append_jsonl, changed_settings, keep_stage, lock, read_checkpoint, rng_state,
                          set_aside, set_rng_state, truncate_logs, write_atomic)
from tools.validate import expert_name, validate


# -----------------------------------------------------------------------------
# Config: one dataclass per TOML section. Unknown keys and wrong types fail loudly (tools/configurator.py).

@dataclass
class TaskConfig:
    name: Literal["cisr", "risr", "air"] = "cisr"  # the task: picks the data pipeline
    scale: int = 4  # upscaling factor of the network (1 for all-in-one restoration)
    description: str = ""  # how the prompt names the network; "" = derived from name and model


@dataclass
class ModelConfig:
    arch: Literal["SwinIR", "PromptIR"] = "SwinIR"  # the network (see models/)
    args: dict = field(default_factory=dict)  # constructor arguments, official names
    pretrained: str = ""  # checkpoint to fine-tune (official .pth/.ckpt or ours); "" = random init
    pretrained_key: str = ""  # params | params_ema; "" = params_ema if present, else params
    trusted: bool = False  # allow unpickling a checkpoint that is not a plain state dict (Lightning)


@dataclass
class LossConfig:
    names: list[str] = field(default_factory=lambda: ["L1", "SSIM", "GAN"])  # the loss repository, in prompt order
    weights: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.01])  # initial weights, same order
    min_weight: Annotated[float, AtLeast(0)] = 0.0  # proposals below this are rejected
    max_weight: float = 10.0  # proposals above this are rejected as absurd
    options: dict = field(default_factory=dict)  # per-loss tables, e.g. [losses.options.GAN] gan_type = "vanilla"
    sharpen_gt: bool = False  # Real-ESRGAN: USM-sharpened GT for every term but GAN


@dataclass
class TrainConfig:
    stages: Annotated[int, AtLeast(1)] = 3  # N, stages of training (the agent is asked after every stage but the last)
    iters_per_stage: Annotated[int, AtLeast(1)] = 20  # K, iterations per stage
    batch_size: Annotated[int, AtLeast(1)] = 4  # total batch over all ranks
    lr: Annotated[float, Above(0)] = 1e-4  # Adam, constant
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])  # Adam betas (BasicSR's SwinIR setting)
    seed: int = 0  # network init, data order, fallback perturbations
    device: Literal["auto", "cpu", "cuda"] = "auto"  # cuda = the GPU of LOCAL_RANK
    amp: Literal["off", "bf16", "fp16", "auto"] = "off"  # fp16 has a grad scaler; auto: bf16 or fp16 on a GPU, off on CPU
    channels_last: bool = False  # NHWC memory layout for the convolutions of the network and the loss networks (D, VGG, AlexNet)
    compile: bool = False  # torch.compile the network (opt-in: the first iterations pay for the compilation)
    offload: bool = False  # rank 0: the experts' networks and the LLM wait on the CPU while the network trains
    static_graph: bool = True  # DDP: every iteration uses the same parameters, so DDP maps the graph once (false for a dynamic network)
    ema_decay: Annotated[float, AtLeast(0), Below(1)] = 0.0  # 0 = no EMA; the SwinIR-GAN setting is 0.999. Feedback uses the EMA network
    log_every: Annotated[int, AtLeast(1)] = 10  # iterations between console lines and metrics.jsonl records
    num_workers: Annotated[int, AtLeast(0)] = 2  # DataLoader workers per rank


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # image sources: folders, .txt lists, skimage:NAME (AIR: clean images to denoise)
    patch_size: Annotated[int, AtLeast(1)] = 64  # cisr: LR patch; risr: GT patch (256); air: patch (128)
    degrade_size: int = 0  # risr: the GT crop that is degraded before the patch is cut from it (Real-ESRGAN: 400); 0 = patch_size
    pool_size: Annotated[int, AtLeast(0)] = 0  # risr: Real-ESRGAN's training-pair pool of degraded pairs per rank (its queue_size, 180); 0 = none
    jpeg: Literal["diffjpeg", "libjpeg"] = "diffjpeg"  # risr: Real-ESRGAN's DiffJPEG, or libjpeg's integer tables (data/jpeg.py)
    augment: bool = True  # random flips and 90-degree rotations
    derain: str = ""  # air: Rain100L training folder
    dehaze: str = ""  # air: RESIDE outdoor training folder
    sigmas: list[int] = field(default_factory=lambda: [15, 25, 50])  # air: denoising noise levels


@dataclass
class FeedbackConfig:
    sources: list[str] = field(default_factory=list)  # where the T feedback images come from
    count: Annotated[int, AtLeast(1)] = 10  # T, feedback images restored and scored after every stage
    seed: int = 0  # which T images are drawn (fixed for the whole run)
    degradation: Literal["bicubic", "none", "noise", "realesrgan"] = "bicubic"  # none: real LQ (or pairs with lq_sources)
    sigma: float = 25.0  # noise level for degradation = "noise"
    lq_sources: list[str] = field(default_factory=list)  # degraded inputs paired by name with sources
    max_side: Annotated[int, AtLeast(0)] = 0  # centre-crop larger feedback images to this side (0 = keep whole)


@dataclass
class ExpertConfig:
    kind: Literal["pyiqa", "command", "human"] = "pyiqa"  # any pyiqa metric, an external program, or a person
    metric: str = "psnr"  # pyiqa: metric name
    name: str = ""  # shown to the LLM; "" = the pyiqa metric upper-cased, or "Human"
    output: Literal["score", "text"] = "score"  # command and human: a number per image, or a description per image
    direction: Literal["", "lower", "higher"] = ""  # which is better; "" = pyiqa's (command and human scores must set it)
    meaning: str = ""  # one line for the LLM on what the score or text says; "" = built in for known metrics
    options: dict = field(default_factory=dict)  # pyiqa: keyword arguments of pyiqa.create_metric
    command: list[str] = field(default_factory=list)  # command: program and arguments; the image folder is appended
    timeout: float = 600.0  # command: seconds before the program is stopped; human: seconds to wait (0 = forever)
    max_chars: int = 400  # text: longer descriptions are cut in the prompt
    range: list[float] = field(default_factory=list)  # fusion: [low, high] of the score; [] = pyiqa's score_range


@dataclass
class FusionConfig:
    enabled: bool = False  # show the LLM one more line: every score expert normalised to [0, 1] and averaged
    profile: Literal["balanced", "fidelity", "perception", "custom"] = "balanced"  # fidelity / perception: FR / NR experts 4x
    weights: dict = field(default_factory=dict)  # custom: expert name -> weight


@dataclass
class AgentConfig:
    backend: Literal["transformers", "openai", "fixed", "random", "hillclimb", "optuna-tpe", "optuna-cmaes"] = "transformers"  # the controller
    model: str = ""  # HF id or local dir (package:NAME = a pip-installed model package); server model name for openai
    gguf_file: str = ""  # GGUF file inside `model` (transformers)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # transformers weights dtype
    base_url: str = ""  # openai: server URL ending in /v1; "" = $OPENAI_BASE_URL
    api_key: str = ""  # openai: "" = $OPENAI_API_KEY
    timeout: Annotated[float, Above(0)] = 120.0  # openai: seconds per request
    retries: Annotated[int, AtLeast(0)] = 3  # openai: extra tries per request, with exponential backoff
    concurrency: Annotated[int, AtLeast(1)] = 8  # openai: requests in flight at once
    max_new_tokens: Annotated[int, AtLeast(1)] = 96  # reply length limit
    temperature: float = 0.7  # sampling temperature
    top_p: float = 0.9  # nucleus sampling
    do_sample: bool = True  # false = greedy (deterministic)
    seed: int = 0  # sampling seed (combined with the stage, so a resumed run samples the same)
    per_image: bool = True  # the paper's: one query per feedback image, proposals averaged; false = one pooled query
    history: Literal["full", "last2"] = "full"  # last2: the ablation that shows only the last two stages
    direction_sentence: bool = True  # ablation switch: say whether lower or higher scores are better
    format_example: bool = True  # ablation switch: show an example reply
    fallback: Literal["keep", "perturb"] = "keep"  # when no reply parses: keep or perturb the previous weights
    perturb_scale: Annotated[float, AtLeast(0), Below(1)] = 0.1  # relative size of the fallback's (and the random controller's) random change
    constrained: bool = False  # guarantee a well-formed Weights line: constrained decoding, or vLLM's guided_regex
    share_prefix: bool = True  # transformers: the start all prompts of a stage share (system part) is read once, not T times
    step: Annotated[float, Above(0)] = 0.3  # hillclimb: first relative step of a weight (halved at every reversal)
    sampler: dict = field(default_factory=dict)  # optuna-*: keyword arguments of Optuna's TPESampler / CmaEsSampler
    experience: list[str] = field(default_factory=list)  # experience.json files of earlier runs, shown in the system part


@dataclass
class ReflectionConfig:
    enabled: bool = False  # undo a stage that made the objective worse, and ask the agent again
    tolerance: Annotated[float, AtLeast(0)] = 0.0  # relative worsening of any score expert (or drop of the fused score) that is tolerated
    retries: Annotated[int, AtLeast(0)] = 2  # R: at most this many retries of a stage; then its best attempt is kept


@dataclass
class OutputConfig:
    root: str = "runs"  # parent folder of run directories
    name: str = ""  # run directory name; "" = the config file's stem
    stage_checkpoints: bool = True  # keep ckpt/stage_<i>.pt besides ckpt/last.pt
    tensorboard: bool = False  # also log to TensorBoard, in runs/<name>/tb/
    wandb: str = ""  # also log to Weights & Biases, in this project ("" = off; needs pip install wandb)
    wandb_mode: Literal["offline", "online"] = "offline"  # offline works without internet: `wandb sync` uploads later


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    experts: list[ExpertConfig] = field(default_factory=lambda: [ExpertConfig()])
    fusion: FusionConfig = field(default_factory=FusionConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    reflection: ReflectionConfig = field(default_factory=ReflectionConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    benchmarks: list[BenchmarkConfig] = field(default_factory=list)  # [[benchmarks]] tables for `lossagent.py eval`
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_config(path, overrides=()):
    """The Config from a TOML file and `--set` overrides, checked (tools/configurator.py, tools/validate.py)."""
    cfg = configurator.load(Config, path, overrides)
    cfg.output.name = cfg.output.name or Path(path).stem
    validate(cfg)
    return cfg


# -----------------------------------------------------------------------------
# Data: the training pairs of each task (data/pairs.py: TrainingPairs, (lq, gt, sharpened gt) batches on the
# training device, stage by stage), and the T fixed feedback images (Eq. 4 of the paper).

# -----------------------------------------------------------------------------
# Experts: judge the restored feedback images. Each is created once and reused every stage.

@dataclass
class Expert:
    name: str  # as shown to the LLM
    lower_better: bool | None  # None for text experts
    meaning: str
    text: bool = False  # writes a description per image instead of a score
    full_reference: bool = False  # needs the ground truth
    score_range: tuple | None = None  # (low, high), to normalise the score for fusion
    metric: Metric | None = None  # the pyiqa metric
    cfg: ExpertConfig | None = None


def make_experts(cfgs, device, download=True):
    """Creates every expert once. pyiqa reads its weights from $TORCH_HOME/hub/pyiqa; a missing file raises
    FileNotFoundError naming it (without `download`, at once: nothing is fetched)."""
    experts = []
    for e in cfgs:
        name, text = expert_name(e), e.kind != "pyiqa" and e.output == "text"
        meaning = e.meaning or MEANINGS.get(e.metric.lower() if e.kind == "pyiqa" else "", "")
        expert = Expert(name, None if text else e.direction == "lower", meaning, text,
                        score_range=tuple(e.range) or None, cfg=e)
        if e.kind == "pyiqa":
            try:
                expert.metric = Metric(e.metric, device, download=download, options=e.options)
            except ValueError as err:  # an unknown metric or option
                raise ConfigError(f"experts: {err}") from None
            expert.lower_better = expert.metric.lower_better if not e.direction else e.direction == "lower"
            expert.full_reference = expert.metric.full_reference
            expert.score_range = expert.score_range or expert.metric.score_range
            expert.meaning = expert.meaning or f"{e.metric}, an image quality score"
        elif not meaning:
            expert.meaning = "a description of each restored image's quality" if text else f"{name}'s score"
        experts.append(expert)
    return experts


@torch.no_grad()
def restore_feedback(net, feedback, device, autocast):
    net.eval()
    out = []
    for item in feedback:
        try:
            with autocast:
                out.append(net(item["lq"].to(device)).float().clamp(0, 1).cpu())
        except RuntimeError as e:  # a shape the network cannot take: the same at every stage, so a setting to fix
            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            size = "x".join(map(str, item["lq"].shape[-2:]))
            raise ConfigError(f"the network cannot restore the feedback image {item['name']} ({size} pixels): "
                              f"{str(e).splitlines()[0]}") from None
    net.train()
    return out


def judge(experts, restored, feedback, stage, run_dir):
    """Judges the restored images [1,3,H,W]. Returns ({expert: {"per_image": [T], "mean"}} (text experts:
    per_image descriptions, no mean), {expert: error} for the experts that failed). A metric that cannot score the
    feedback images before training (stage 0) never will: that is a setting to fix, and stops the run."""
    scores, errors = {}, {}
    for e in experts:
        try:
            if e.cfg.kind == "pyiqa":
                values = score(e.metric, restored, [item["gt"] for item in feedback] if e.full_reference else None,
                               [item["name"] for item in feedback])
            elif e.cfg.kind == "command":
                values = ask_program(e.cfg.command, e.cfg.timeout, restored, feedback, e.text)
            else:
                values = ask_person(e.name, e.cfg.timeout, restored, feedback, e.text, stage, run_dir)
        except (ExpertError, MetricError) as err:
            if stage == 0 and isinstance(err, MetricError):
                raise ConfigError(f"expert {e.name}: {err}") from None
            errors[e.name] = str(err)
            print(f"expert {e.name} failed at stage {stage}: {err}", file=sys.stderr, flush=True)
            continue
        scores[e.name] = {"per_image": values} if e.text else {"per_image": values, "mean": float(np.mean(values))}
    return scores, errors


def judge_stage(cfg, experts, net, feedback, stage, run_dir, device, home, autocast):
    """The feedback phase: restore the feedback images, keep them (runs/<name>/feedback/stage_<i>/), let every
    expert judge them, and draw them with their scores (sheet.png there). Returns the stage's history fields, with
    this phase's peak memory."""
    move_experts_and_llm(experts, None, device)
    restored, folder = restore_feedback(net, feedback, device, autocast), run_dir / "feedback" / f"stage_{stage}"
    write_images(folder, restored, feedback, with_gt=False)
    scores, errors = judge(experts, restored, feedback, stage, run_dir)
    report.write_sheet(folder / "sheet.png", feedback, restored, scores)
    entry = {"scores": scores, **({"expert_errors": errors} if errors else {})}
    if cfg.fusion.enabled:
        entry["fused"] = fused_score(experts, scores, cfg.fusion)
    move_experts_and_llm(experts, None, home)  # back to the CPU with train.offload
    return entry, peak_memory_mib(device)


def fused_score(experts, scores, fusion, image=None):
    """Every score expert normalised to [0, 1] in its good direction, then a weighted mean (None if none)."""
    total = weight_sum = 0.0
    for e in experts:
        if e.text or e.name not in scores or not e.score_range:
            continue
        low, high = e.score_range
        value = scores[e.name]["per_image"][image] if image is not None else scores[e.name]["mean"]
        normalised = min(max((value - low) / (high - low), 0.0), 1.0)
        normalised = 1.0 - normalised if e.lower_better else normalised
        weight = {"balanced": 1.0, "fidelity": 4.0 if e.full_reference else 1.0,
                  "perception": 1.0 if e.full_reference else 4.0}.get(fusion.profile) or fusion.weights.get(e.name, 0.0)
        total, weight_sum = total + weight * normalised, weight_sum + weight
    return total / weight_sum if weight_sum else None


def move_experts_and_llm(experts, controller, device):
    """Moves the experts' networks and the LLM to `device`: to the CPU while the network trains (train.offload),
    so the GPU memory they hold goes to training, and back to the GPU to judge and answer."""
    for e in experts:
        if e.metric is not None:
            e.metric.to(device)
    if isinstance(controller, LLMAgent):
        controller.llm.to(device)
    if device.type == "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the freed blocks back, so nvidia-smi shows what training can use


# -----------------------------------------------------------------------------
# Prompt: system part (role, inputs, score meanings, goal), history part, rules part.

def build_messages(cfg, names, experts, history, image=None, experience=()):
    """The chat for one query: `image` is a feedback-image index (per-image mode) or None (all images, mean
    scores). `experts` are Expert objects; `history` is the run's list of stage entries; `experience` the
    texts distilled from earlier runs (agent.experience)."""
    a = cfg.agent
    network = cfg.task.description or {
        "cisr": f"a {cfg.model.arch} x{cfg.task.scale} super-resolution network for bicubic-downsampled images",
        "risr": f"a {cfg.model.arch} x{cfg.task.scale} super-resolution network for real-world degraded images",
        "air": f"a {cfg.model.arch} all-in-one restoration network (denoising, deraining, dehazing)",
    }[cfg.task.name]
    what = "one feedback image" if image is not None else f"{cfg.feedback.count} feedback images (mean scores)"
    fusion = cfg.fusion.enabled and any(not e.text for e in experts)

    system = [f"You are an expert advisor for training {network}. The network is trained with a weighted sum "
              f"of these losses: {', '.join(names)}. Training runs in stages. After every stage the network "
              f"restores {what}, and the result is judged by these experts:"]
    for e in experts:
        if e.text:
            line = (f"- {e.name}: {e.meaning}. Its feedback is a description in words, not a number: "
                    "the goal is to make the description better (fewer artifacts, finer detail, more natural).")
        else:
            line = f"- {e.name}: {e.meaning}."
            if a.direction_sentence:
                line += f" A {'lower' if e.lower_better else 'higher'} {e.name} score is better."
        system.append(line)
    if fusion:
        system.append(f"- Fused score: the scores above, each mapped to 0 (worst) .. 1 (best), averaged with "
                      f"'{cfg.fusion.profile}' weights." + (" A higher fused score is better." if a.direction_sentence else ""))
    system.append("You receive the loss weights used in every stage so far and the feedback that followed. "
                  "Your job is to choose the loss weights for the next stage so that the restored images get "
                  "the best possible feedback.")
    texts = [t for t in experience if t]
    if texts:
        system.append("What earlier runs showed (use it as a hint, the history below comes first):\n" + "\n".join(texts))

    def quote(e, text):
        text = " ".join(text.split())
        return text if len(text) <= e.cfg.max_chars else text[:e.cfg.max_chars] + "..."

    shown = history if a.history == "full" else history[-2:]
    lines = ["History:"]
    for entry in shown:
        label = "Before training" if entry["stage"] == 0 else f"Stage {entry['stage']}"
        if entry.get("rolled_back"):
            label += f", attempt {entry['attempt'] + 1}, UNDONE because it made things worse"
        verb = "initial weights" if entry["stage"] == 0 else "trained with weights"
        lines.append(f"{label} ({verb} {weights_text(names, [entry['weights'][n] for n in names])}):")
        for e in experts:
            s = entry["scores"].get(e.name)
            if s is None:
                lines.append(f"  {e.name}: unavailable (the expert failed)")
            elif e.text and image is not None:
                lines.append(f'  {e.name} says: "{quote(e, s["per_image"][image])}"')
            elif e.text:
                lines += [f'  {e.name} on image {k + 1}: "{quote(e, t)}"' for k, t in enumerate(s["per_image"])]
            else:
                lines.append(f"  {e.name} = {fmt(s['per_image'][image] if image is not None else s['mean'])}")
        if fusion:
            fused = fused_score(experts, entry["scores"], cfg.fusion, image)
            lines.append(f"  Fused score = {fmt(fused) if fused is not None else 'unavailable'}")

    if a.direction_sentence:
        goals = [f"the {e.name} description better" if e.text else f"{e.name} {'lower' if e.lower_better else 'higher'}"
                 for e in experts]
    else:
        goals = [f"the {e.name} {'description' if e.text else 'score'} better" for e in experts]
    example = [0.7, 0.3, 0.05, 0.2, 0.1, 0.5, 0.01, 1.0][:len(names)]
    rules = ["Rules:",
             f"1. Answer in exactly this format: a line 'Weights: {':'.join(names)}=' followed by "
             f"{len(names)} numbers separated by ':', in this order, then a line starting with 'Thoughts:' "
             "that explains your choice in one sentence."]
    if a.format_example:
        rules += ["Example:", f"Weights: {weights_text(names, example)}",
                  "Thoughts: the last change helped, so I continue in the same direction."]
    rules += [f"2. Your goal is to make {' and '.join(goals)}.",
              "3. If the history is not enough to decide, make a small random change to the weights.",
              f"4. Every weight must be between {fmt(cfg.losses.min_weight)} and {fmt(cfg.losses.max_weight)}."]
    return [{"role": "system", "content": "\n".join(system)},
            {"role": "user", "content": "\n".join(lines) + "\n\n" + "\n".join(rules)}]


# -----------------------------------------------------------------------------
# Agent and parser: the LLM (tools/llm.py: a local model or a server) answers the prompt of each feedback image,
# a regex parser reads the proposals, they are averaged, and a fallback covers failures. The agent is one
# controller: every way to choose the next stage's weights has its interface. Each is a function of the history
# alone (its state, if any, is replayed from it), so a resumed or rolled-back run asks it the same.

class Controller:
    """propose(history, weights, stage, attempt) -> (weights, record, logs). `history` ends with the evaluation just
    made (`stage`, `attempt`); `weights` are those the run goes on from; `record` goes into that history entry, `logs`
    into agent.jsonl. A stage whose experts failed gets the fallback (agent.fallback): its feedback is incomplete."""

    def __init__(self, cfg, experts):
        self.cfg, self.experts, self.names = cfg, experts, cfg.losses.names

    def propose(self, history, weights, stage, attempt):
        errors = history[-1].get("expert_errors")
        if not errors:
            return self.choose(history, weights, stage, attempt)
        new, fallback = self.fallback(weights, stage, attempt)
        return new, {"next_weights": dict(zip(self.names, new)), "fallback": fallback, "error": f"experts failed: {errors}"}, []

    def fallback(self, weights, stage, attempt):
        if self.cfg.agent.fallback == "perturb":
            return perturb(self.cfg, weights, stage, attempt), "perturb"
        return list(weights), "keep"

    def rule(self, name, new, stage, attempt, state):
        """The record and log line of a controller that follows a rule (not an LLM)."""
        log = {"stage": stage, "attempt": attempt, "controller": name, "weights": new, "ok": True}
        return new, {"controller": state, "next_weights": dict(zip(self.names, new))}, [log]


# A number (nan and inf too: a proposal with them is invalid, not absent); numbers x:y:z; ':' or '=' between spaces;
# a line that labels weights ("Weights: ...", "- New weights: ...", "1. Weights ..."); the end of a 'Weights' label.
NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf(?:inity)?)"
RATIO = re.compile(rf"(?:{NUMBER})(?:\s*:\s*(?:{NUMBER}))*", re.I)
SEPARATOR = re.compile(r"\s*[:=]\s*")
WEIGHTS_LINE = re.compile(r"[ \t]*(?:[-+*|]|\d+[.)])?[ \t]*(?:weights?\b|(?:[a-z]+[ \t]+){1,3}weights?[ \t]*[:=])", re.I)
LABEL = re.compile(r"[ \t]*(?:[:=]|\n)\s*")


def parse_weights(reply, names, min_weight=0.0, max_weight=10.0):
    """Finds the weight proposal in an LLM reply and returns it in the order of `names`, or None.

    Accepts `Weights: L1:Perceptual:GAN=0.7:0.3:0.05` anywhere in the reply (any case, spaces, markdown, names in
    any order), `Weights: 0.7:0.3:0.05`, and `L1=0.7, Perceptual=0.3, GAN=0.05` (on one line, or alone in the reply).
    A labelled proposal (on a line that labels weights, or right after a 'Weights:' label) wins over one that is not,
    such as an echo of the history; among equals the first valid one is taken. Invalid: wrong count, unknown names,
    nan/inf, values outside [min_weight, max_weight], all zero. Only where a name or 'weights' stands is read, each
    place once, by patterns that never backtrack far: linear time, whatever the reply holds. It is never evaluated."""
    if not isinstance(reply, str):
        return None
    text = re.sub(r"[*_`#>]", " ", reply)
    lower = [n.lower() for n in names]
    word = "(?:" + "|".join(re.escape(n) for n in sorted(lower, key=len, reverse=True)) + ")(?![a-z0-9])"
    anchor = re.compile(rf"(?<![a-z0-9])(?:({word})|weights?(?![a-z0-9]))", re.I)
    chain = re.compile(rf"(?:\s*:\s*{word})*", re.I)  # the rest of a chain A:B:C after its first name
    best, used, line, last, label_end, labels = None, 0, 0, 0, -1, {}  # used: where the last chain read ends
    everywhere, row = [], {"line": -1, "pos": 0, "pairs": {}, "twice": False}  # name=x pairs: all, and this line's

    def numbers(pos):  # the numbers x:y:z after a ':' or '=' at pos, and the position after them; or None
        separator = SEPARATOR.match(text, pos)
        m = separator and RATIO.match(text, separator.end())
        return (re.findall(NUMBER, m.group(), re.I), m.end()) if m else None

    def offer(labelled, pos, order, values):
        nonlocal best
        if len(order) != len(names) or len(values) != len(names) or sorted(order) != sorted(lower):
            return
        by_name = {n: float(v) for n, v in zip(order, values)}
        weights = [by_name[n] for n in lower]
        ok = all(math.isfinite(w) and min_weight <= w <= max_weight for w in weights) and any(w > 0 for w in weights)
        if ok and (best is None or (not labelled, pos) < best[0]):
            best = ((not labelled, pos), weights)

    def labelled(start):
        if start not in labels:
            labels[start] = WEIGHTS_LINE.match(text, start) is not None
        return labels[start]

    def close_row():  # a line's pairs name every loss once: a proposal
        if row["pairs"] and not row["twice"]:
            offer(labelled(row["line"]), row["pos"], list(row["pairs"]), list(row["pairs"].values()))

    for m in anchor.finditer(text):
        newline = text.rfind("\n", last, m.start())  # the line of m, looking back no further than the anchor before
        line, last = newline + 1 if newline >= 0 else line, m.start()
        if m.start() < used:
            continue  # inside a chain already read
        name = m.group(1) and m.group(1).lower()
        end = chain.match(text, m.end()).end() if name else m.end()
        order = [name, *(n.lower() for n in re.findall(word, text[m.end():end], re.I))] if name else lower
        found = numbers(end)
        used = found[1] if found else end
        if found:
            offer(not name or labelled(line) or m.start() == label_end, m.start(), order, found[0])
        elif not name and (label := LABEL.match(text, m.end())):
            label_end = label.end()  # 'Weights:' before a chain of names: that chain is labelled
        after = text[used:used + 2]  # a single number x is a pair name=x unless a digit, ':' or '.5' goes on
        if name and found and len(found[0]) == 1 and not (after[:1].isdigit() or after[:1] == ":"
                                                          or after[:1] == "." and after[1:].isdigit()):
            if row["line"] != line:
                close_row()
                row.update(line=line, pos=m.start(), pairs={}, twice=False)
            row["twice"] |= order[-1] in row["pairs"]
            row["pairs"][order[-1]] = found[0][0]
            everywhere.append((order[-1], found[0][0]))
    close_row()
    if best is None and len({p[0] for p in everywhere}) == len(everywhere):  # pairs across lines, each name once
        offer(False, len(text), [p[0] for p in everywhere], [p[1] for p in everywhere])
    return best and best[1]


def average_proposals(proposals):
    """The paper queries once per feedback image and averages the valid proposals, weight by weight."""
    return [float(np.mean(column)) for column in zip(*proposals)]


class LLMAgent(Controller):
    """The paper's agent: the three-part prompt, once per feedback image (or once, pooled); the valid proposals are
    averaged; when none parses, the fallback keeps the training going."""

    def __init__(self, cfg, experts, llm, experience):
        super().__init__(cfg, experts)
        self.llm, self.experience = llm, experience

    def choose(self, history, weights, stage, attempt):
        a, names = self.cfg.agent, self.names
        images = range(self.cfg.feedback.count) if a.per_image else [None]
        conversations = [build_messages(self.cfg, names, self.experts, history, image, self.experience)
                         for image in images]
        seed = a.seed * 100_003 + stage * 101 + attempt  # a retried stage samples anew
        start, error = time.time(), None
        try:
            replies = self.llm.generate(conversations, seed)
        except AgentError as e:
            replies, error = [None] * len(conversations), str(e)
        latency = (time.time() - start) / len(conversations)
        parsed = [parse_weights(r, names, self.cfg.losses.min_weight, self.cfg.losses.max_weight) for r in replies]
        valid = [p for p in parsed if p is not None]
        new, fallback = (average_proposals(valid), None) if valid else self.fallback(weights, stage, attempt)
        logs = [{"stage": stage, "attempt": attempt, "image": image, "messages": c, "reply": r, "weights": p,
                 "ok": p is not None, "latency_s": latency, "error": error}
                for image, c, r, p in zip(images, conversations, replies, parsed)]
        record = {"proposals": parsed, "next_weights": dict(zip(names, new)), "fallback": fallback, "error": error,
                  "parse_ok": len(valid), "parse_total": len(parsed)}
        return new, record, logs


# -----------------------------------------------------------------------------
# Controllers beside the agent: fixed weights (the paper's baseline) and rules that need no LLM, to answer "does
# the LLM beat a simple rule?"; and reflection, which undoes a stage that made things worse.

def perturb(cfg, weights, stage, attempt):
    """The paper's third rule alone: each weight times 1 + U(-s, s). Seeded by the stage and attempt, so a resumed
    run perturbs the same way and a retried stage differently; a weight at 0 stays off."""
    rng = np.random.default_rng([cfg.train.seed, stage, attempt])
    s = cfg.agent.perturb_scale
    return [float(np.clip(w * (1 + rng.uniform(-s, s)), cfg.losses.min_weight, cfg.losses.max_weight)) for w in weights]


def objective_change(cfg, experts, before, after, worst=False):
    """How much better `after` is than `before` (> 0: better): the fused score's rise when fusion is on, else the
    score experts' relative changes, their mean (HillClimb) or, with `worst`, the worst of them (reflection)."""
    if cfg.fusion.enabled and before.get("fused") is not None and after.get("fused") is not None:
        return after["fused"] - before["fused"]
    changed = list(objective_changes(experts, before, after).values())
    return min(changed, default=0.0) if worst else float(np.mean(changed or [0.0]))


def objective_changes(experts, before, after):
    """Relative change of each score expert from one history entry to the next, signed so that > 0 is better."""
    changes = {}
    for e in experts:
        if not e.text and e.name in before["scores"] and e.name in after["scores"]:
            b, a = before["scores"][e.name]["mean"], after["scores"][e.name]["mean"]
            change = (a - b) / max(abs(b), 1e-12)
            changes[e.name] = -change if e.lower_better else change
    return changes


class FixedWeights(Controller):
    """The paper's baseline: the initial weights at every stage."""

    def choose(self, history, weights, stage, attempt):
        return list(weights), {"next_weights": dict(zip(self.names, weights))}, []


class RandomWeights(Controller):
    """The paper's third rule alone: a seeded random change of every weight, whatever the feedback."""

    def choose(self, history, weights, stage, attempt):
        return self.rule("random", perturb(self.cfg, weights, stage, attempt), stage, attempt, "random")


class HillClimb(Controller):
    """One weight at a time: keep its direction while the objective (the fused score's rise, else the mean relative
    change of the score experts, against the stage the evaluation started from) improves; when it worsens, go back
    to the weights before the move, reverse and halve the step; after two reversals go on to the next weight.
    Its state is replayed over every evaluation of the history, undone attempts included."""

    def choose(self, history, weights, stage, attempt):
        cfg, state = self.cfg, None
        movable = [i for i, w in enumerate(history[0]["weights"].values()) if w > 0]  # a step cannot revive a 0
        for k, entry in enumerate(history):
            if entry["stage"] == 0 or entry.get("expert_errors"):
                continue  # no evaluation of a move
            start = [entry["weights"][n] for n in self.names]
            before = next((h for h in reversed(history[:k]) if h["stage"] < entry["stage"]
                           and not h.get("rolled_back") and not h.get("expert_errors")), None)
            if state is None:
                state = {"index": movable[0], "direction": 1, "step": cfg.agent.step, "reversals": 0}
            elif before is not None:
                if objective_change(cfg, self.experts, before, entry) <= 0:
                    i = state["index"]
                    start[i] = before["weights"][self.names[i]]  # undo the move that did not help
                    state = dict(state, direction=-state["direction"], step=state["step"] / 2,
                                 reversals=state["reversals"] + 1)
                    if state["reversals"] == 2:
                        later = [j for j in movable if j > i] or movable
                        state.update(index=later[0], direction=1, reversals=0)
            i = state["index"]
            start[i] = float(np.clip(start[i] * (1 + state["direction"] * state["step"]),
                                     cfg.losses.min_weight, cfg.losses.max_weight))
        return self.rule("hillclimb", start, stage, attempt, state)


class OptunaSearch(Controller):
    """A black-box optimizer at the same budget (Optuna's ask/tell; agent.backend optuna-tpe or optuna-cmaes): each
    stage is one trial, asked in the box [losses.min_weight, losses.max_weight] per loss, log-uniform when min_weight
    > 0 (weights span decades) and uniform otherwise (a log scale cannot reach 0), and told what the experts said after
    it: one score expert's mean in its direction, or the fused score of several. Weights it did not ask for (the
    initial ones, a fallback's) are told as given trials; CMA-ES starts at the initial weights. The study is replayed
    from the history at every call."""

    def __init__(self, cfg, experts):
        super().__init__(cfg, experts)
        needed = ["optuna", "cmaes"] if cfg.agent.backend == "optuna-cmaes" else ["optuna"]  # Optuna's CMA-ES needs cmaes
        if any(importlib.util.find_spec(m) is None for m in needed):
            raise ConfigError(f"agent.backend = '{cfg.agent.backend}' needs pip install {' '.join(needed)}")
        self.optuna = importlib.import_module("optuna")  # only for this controller
        self.optuna.logging.set_verbosity(self.optuna.logging.WARNING)  # not a line per trial at every replay
        # Sized for a run's stages - 1 trials: Optuna's defaults (TPE: 10 random trials first; CMA-ES: generations of
        # 4 + 3 ln(losses)) would leave the paper's 10 stages random. agent.sampler overrides them.
        self.options = {**({"n_startup_trials": 3} if cfg.agent.backend == "optuna-tpe" else {"popsize": 4}), **cfg.agent.sampler}
        try:
            self.sampler(dict(zip(self.names, cfg.losses.weights)))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"agent.sampler: {e}; give keyword arguments of Optuna's sampler") from None

    def sampler(self, initial):
        if self.cfg.agent.backend == "optuna-tpe":
            return self.optuna.samplers.TPESampler(seed=self.cfg.agent.seed, **self.options)
        return self.optuna.samplers.CmaEsSampler(x0=initial, seed=self.cfg.agent.seed, warn_independent_sampling=False, **self.options)

    def choose(self, history, weights, stage, attempt):
        optuna = self.optuna
        cfg, names, (low, high) = self.cfg, self.names, (self.cfg.losses.min_weight, self.cfg.losses.max_weight)
        space = {n: optuna.distributions.FloatDistribution(low, high, log=low > 0) for n in names}
        scored = [e for e in self.experts if not e.text]
        single = scored[0] if len(scored) == 1 else None
        study = optuna.create_study(sampler=self.sampler(history[0]["weights"]),
                                    direction="minimize" if single and single.lower_better else "maximize")
        for k, entry in enumerate(history):
            if entry["stage"] == 0:
                continue
            value = (None if entry.get("expert_errors") else entry["scores"][single.name]["mean"] if single
                     else fused_score(self.experts, entry["scores"], cfg.fusion))  # an incomplete verdict: a failed trial
            if history[k - 1].get("next_weights") and not history[k - 1].get("fallback"):  # weights it asked for
                trial = study.ask(space)
                study.tell(trial, value, state=None if value is not None else optuna.trial.TrialState.FAIL)
            elif value is not None:
                study.add_trial(optuna.trial.create_trial(params={n: entry["weights"][n] for n in names},
                                                          distributions=space, value=value))
        trial = study.ask(space)
        return self.rule(cfg.agent.backend, [trial.params[n] for n in names], stage, attempt, {"trial": trial.number})


def make_controller(cfg, experts, device):
    rule = {"fixed": FixedWeights, "random": RandomWeights, "hillclimb": HillClimb, "optuna-tpe": OptunaSearch,
            "optuna-cmaes": OptunaSearch}.get(cfg.agent.backend)
    if rule:
        return rule(cfg, experts)
    names, low, high = cfg.losses.names, cfg.losses.min_weight, cfg.losses.max_weight
    llm = TransformersLLM(cfg.agent, device, names, low, high) if cfg.agent.backend == "transformers" else OpenAILLM(cfg.agent, names)
    experience = [json.loads(Path(p).read_text())["text"] for p in cfg.agent.experience]
    return LLMAgent(cfg, experts, llm, experience)


def reflect(cfg, experts, history, stage, attempt):
    """Reflection: was this attempt at `stage` worse than the last kept stage by more than the tolerance?
    Returns (retry, the attempt the stage ends with). After R retries the best attempt of the stage is kept."""
    before = next(h for h in reversed(history) if h["stage"] < stage and not h.get("rolled_back"))
    attempts = [h for h in history if h["stage"] == stage]

    def change(after):
        return objective_change(cfg, experts, before, after, worst=True)

    if change(attempts[-1]) >= -cfg.reflection.tolerance:
        return False, attempt
    if attempt < cfg.reflection.retries:
        return True, attempt
    return False, max(attempts, key=change)["attempt"]


# -----------------------------------------------------------------------------
# Stage trainer: the training state, and K iterations with fixed weights.

def build_network(cfg):
    try:
        return make_network(cfg.model.arch, cfg.model.args)
    except TypeError as e:
        raise ConfigError(f"[model.args] for {cfg.model.arch}: {e}") from None


class TrainingState:
    """Everything training changes, in one object: the network (`raw`; `net` is what trains: compiled and/or DDP),
    its EMA, the optimizer, the grad scaler, the loss repository (a GAN term holds its discriminator and the
    discriminator's optimizer), every rank's RNG and training pairs (RISR's pair pool). save() and load_state_dict()
    write and read all of it, so saving, resuming and rolling back are one call each."""

    def __init__(self, cfg, device, ddp, rank, world, fresh=True):
        self.device, self.ddp, self.rank, self.world, t = device, ddp, rank, world, cfg.train
        self.pairs = TrainingPairs(cfg, rank, world, device)
        # The same seed on every rank gives identical initial networks (DDP also broadcasts rank 0's).
        torch.manual_seed(t.seed)
        self.raw = build_network(cfg).to(device)
        if cfg.model.pretrained and fresh:  # a resumed run (fresh = False) loads its own checkpoint instead
            load_pretrained(self.raw, cfg.model.pretrained, key=cfg.model.pretrained_key or None, trusted=cfg.model.trusted)
        try:
            self.losses = build_loss_repository(list(cfg.losses.names), cfg.losses.options).to(device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        # The terms that compare with the plain ground truth when losses.sharpen_gt is on, and the one that trains a
        # network of its own (the GAN term's discriminator), stepped after the generator (see losses/__init__.py).
        self.plain_gt = {n for n, loss in self.losses.items() if not getattr(loss, "sharpened_target", True)}
        self.adversary = next((n for n, loss in self.losses.items() if hasattr(loss, "discriminator_step")), None)
        self.optimizer = torch.optim.Adam(self.raw.parameters(), lr=t.lr, betas=tuple(t.betas))
        if t.channels_last:
            # Only the convolutions (PromptIR's 5-D prompts have no such layout); before the EMA copies the network, so
            # that the two have the same strides, which the EMA update's multi-tensor ops need for their fast path.
            for module in [*self.raw.modules(), *self.losses.modules()]:
                if isinstance(module, torch.nn.Conv2d):
                    module.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.raw).eval().requires_grad_(False) if t.ema_decay > 0 else None
        self.net, self.net_d = torch.compile(self.raw) if t.compile else self.raw, None
        if ddp:  # A static graph: DDP learns once which parameters get gradients (PromptIR has layers that never do)
            # instead of searching every iteration (without one it must search); gradients as views of its buckets.
            ids = [device.index] if device.type == "cuda" else None
            self.net = DDP(self.net, device_ids=ids, static_graph=t.static_graph, gradient_as_bucket_view=True,
                           find_unused_parameters=not t.static_graph)
            if self.adversary:
                self.net_d = DDP(self.losses[self.adversary].net_d, device_ids=ids, static_graph=t.static_graph,
                                 gradient_as_bucket_view=True)
        self.amp = t.amp if t.amp != "auto" else (("bf16" if torch.cuda.is_bf16_supported() else "fp16")
                                                  if device.type == "cuda" else "off")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
        self.autocast = torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == "fp16")

    def state_dict(self):
        """The network (under BasicSR's names, so models.load_pretrained and `eval` read it like an official file),
        the EMA, the optimizer, the grad scaler, the discriminator and its optimizer."""
        adversary = self.losses[self.adversary] if self.adversary else None
        return {"params": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                "net_d": adversary.net_d.state_dict() if adversary else None,
                "opt_d": adversary.opt_d.state_dict() if adversary else None, "scaler": self.scaler.state_dict(),
                **({"params_ema": self.ema.state_dict()} if self.ema is not None else {})}

    def save(self, path, is_main, **bookkeeping):
        """Writes the state, every rank's RNG and training pairs, and `bookkeeping` (stage, history, ...) to `path`
        atomically. Every rank takes part (its own streams are gathered); rank 0 writes."""
        mine = (rng_state(self.device), self.pairs.state_dict())
        ranks = [None] * self.world if self.ddp else [mine]
        if self.ddp:
            dist.gather_object(mine, ranks if self.rank == 0 else None, dst=0)
        if is_main:
            ckpt = {**self.state_dict(), "rng": [r for r, _ in ranks], "pairs": [p for _, p in ranks], **bookkeeping}
            write_atomic(path, lambda p: torch.save(ckpt, p))
        if self.ddp:
            dist.barrier()  # the file exists for every rank before anyone may read it

    def load_state_dict(self, ckpt):
        self.raw.load_state_dict(ckpt["params"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.adversary:
            self.losses[self.adversary].net_d.load_state_dict(ckpt["net_d"])
            self.losses[self.adversary].opt_d.load_state_dict(ckpt["opt_d"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["params_ema"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.pairs.load_state_dict(ckpt.get("pairs", [None] * self.world)[self.rank])
        set_rng_state(ckpt["rng"][self.rank], self.device)


def train_stage(cfg, state, weights, stage, attempt, log):
    """One stage: K iterations with fixed loss weights, L = sum_i w_i L_i over the loss repository. Rank 0 logs
    every train.log_every iterations (tools/runlog.py; `log` is None on the other ranks). Returns the phase's peak
    memory."""
    names, t = cfg.losses.names, cfg.train
    active = [(n, w) for n, w in zip(names, weights) if w > 0]  # zero-weight losses are not computed
    adversary = state.adversary if state.adversary and (weights[names.index(state.adversary)] > 0
                                                        or state.losses[state.adversary].update_when_zero) else None
    peak_memory_mib(state.device)  # starts this phase's count
    iteration, start = (stage - 1) * t.iters_per_stage, time.time()
    for step, (lq, gt, sharp) in enumerate(state.pairs.stage(stage), 1):
        with state.autocast:
            out = state.net(lq)
            terms = {n: state.losses[n](out, gt if sharp is None or n in state.plain_gt else sharp) for n, _ in active}
            total = sum(w * terms[n] for n, w in active)
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(total).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        d_terms = {}
        if adversary:
            # After the generator's step, as BasicSR does. fp16 would need a scaler of its own: fp32 then.
            with torch.autocast(state.device.type, dtype=state.amp_dtype, enabled=state.amp == "bf16"):
                d_terms = state.losses[adversary].discriminator_step(out.float(), gt, net_d=state.net_d)
        if state.ema is not None:  # multi-tensor ops: a few kernel launches, not two per parameter (SwinIR-M: ~500)
            with torch.no_grad():
                torch._foreach_lerp_(list(state.ema.parameters()), list(state.raw.parameters()), 1 - t.ema_decay)
                torch._foreach_copy_(list(state.ema.buffers()), list(state.raw.buffers()))
        iteration += 1
        if log and (step % t.log_every == 0 or step == t.iters_per_stage):  # reading the losses waits for the device
            log.iteration(stage, attempt, iteration, step, step / (time.time() - start), total, terms, dict(active), d_terms)
    return peak_memory_mib(state.device)


# -----------------------------------------------------------------------------
# run(): N stages of train -> judge -> reflect -> propose -> save, and the phases and resume it calls.

def ask_controller(controller, history, retry, stage, attempt, run_dir, device, home):
    """The agent phase (rank 0): the controller proposes the next stage's weights, going on from the attempt the stage
    ends with (the one just undone, for a retry). Its record and this phase's peak memory go into the history entry
    just judged, its lines into agent.jsonl."""
    start = history[-1] if retry else next(h for h in reversed(history) if h["stage"] == stage and not h.get("rolled_back"))
    move_experts_and_llm([], controller, device)
    new, record, logs = controller.propose(history, list(start["weights"].values()), stage, attempt)
    move_experts_and_llm([], controller, home)  # back to the CPU with train.offload
    history[-1].update(record)
    history[-1]["memory_mib"]["agent"] = peak_memory_mib(device)
    if logs:
        append_jsonl(run_dir / "agent.jsonl", logs)
    return new


def undo_if_worse(cfg, state, experts, history, stage, attempt, run_dir, is_main):
    """Reflection, on every rank: rank 0 decides (reflect()); every attempt's end state is kept until the stage is
    decided, so that the network, optimizers, EMA and RNG go back bit for bit to the stage's start (a retry) or to
    the end of its best attempt. Returns whether the stage is trained again."""
    retry, ended = broadcast(reflect(cfg, experts, history, stage, attempt) if is_main else None, state)
    state.save(run_dir / "ckpt" / f"stage_{stage}_attempt_{attempt}.pt", is_main, stage=stage - 1, attempt=attempt)
    if retry or ended != attempt:
        path = run_dir / "ckpt" / ("last.pt" if retry else f"stage_{stage}_attempt_{ended}.pt")
        state.load_state_dict(torch.load(path, map_location=state.device, weights_only=True))
        if is_main:
            for h in history:
                if h["stage"] == stage:
                    h["rolled_back"] = retry or h["attempt"] != ended
            set_aside(run_dir, stage, attempt, ended)
            print(f"stage {stage} attempt {attempt + 1}: " + ("worse than before, undone; asking again" if retry
                  else f"no retry was better: keeping attempt {ended + 1}"), flush=True)
    return retry


def broadcast(value, state):
    """Rank 0's `value` (weights, a decision, a file) on every rank."""
    shared = [value]
    if state.ddp:
        dist.broadcast_object_list(shared, src=0)
    return shared[0]


def save_stage(cfg, state, run_dir, history, weights, stage, attempt, decided, is_main, log, experts, feedback):
    """The save phase: ckpt/last.pt (training goes on at `attempt` of `stage`), ckpt/stage_<i>.pt once a stage is
    decided, the files derived from them, and the stage's log (rank 0)."""
    ckpt_dir = run_dir / "ckpt"
    state.save(ckpt_dir / "last.pt", is_main, stage=stage - 1, attempt=attempt, history=history, weights=weights,
               config=asdict(cfg))
    if not is_main:
        return
    log.stage(history[-1], weights)
    if decided and cfg.output.stage_checkpoints:
        keep_stage(ckpt_dir, stage - 1)
    report.write_run_files(cfg, run_dir, history, stage - 1, experts, feedback, partial(objective_changes, experts))


def resume(cfg, state, run_dir, is_main, experts, feedback):
    """The run's progress from its checkpoint, if there is one (tools/rundir.py: last.pt, or the newest intact
    stage_<i>.pt): (history, weights, stage, attempt) to go on from, with every rank's state restored, the logs cut back
    to what an uninterrupted run had written, and every file derived from the checkpoint written again; else None."""
    path, ckpt = read_checkpoint(run_dir / "ckpt", state.device) if is_main else (None, None)
    path = broadcast(path, state)  # rank 0 chose the file
    if path is None:
        return None
    ckpt = ckpt or torch.load(path, map_location=state.device, weights_only=True)
    changed = changed_settings(ckpt["config"], asdict(cfg), asdict(Config()))
    if changed:
        raise ConfigError(f"{run_dir} holds a run with other settings ({', '.join(changed)}); a rerun may change only "
                          f"{', '.join(MAY_CHANGE)}: choose another output.name, or remove that folder")
    if len(ckpt["rng"]) != state.world:
        raise ConfigError(f"{run_dir} was trained with {len(ckpt['rng'])} ranks: resume it with as many "
                          f"(torchrun --nproc_per_node={len(ckpt['rng'])}), or the batches would not be the same")
    state.load_state_dict(ckpt)
    history, finished, attempt = ckpt["history"], ckpt["stage"], ckpt["attempt"]
    if is_main:
        truncate_logs([run_dir / "metrics.jsonl", run_dir / "agent.jsonl"], finished, attempt)
        if finished and attempt == 0 and cfg.output.stage_checkpoints and not (run_dir / "ckpt" / f"stage_{finished}.pt").exists():
            keep_stage(run_dir / "ckpt", finished)
        report.write_run_files(cfg, run_dir, history, finished, experts, feedback, partial(objective_changes, experts))
        print(f"resuming {run_dir} after stage {finished}" + (f", at attempt {attempt + 1} of stage {finished + 1}" if attempt else ""))
    return history, ckpt["weights"], finished + 1, attempt


def run(cfg):
    """Trains one configured run (resuming it if its run directory holds a checkpoint).
    Returns the trained network and the loss weights of the last stage."""
    # Processes: torchrun sets RANK/WORLD_SIZE; without them this is one process.
    ddp = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if ddp:
        # Rank 0 scores and queries the LLM while the others wait at the broadcast: allow a long wait.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=2), device_id=device if use_cuda else None)
    is_main = rank == 0
    if cfg.train.batch_size % world or cfg.data.pool_size % (cfg.train.batch_size // world or 1):
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size} must be a multiple of the {world} ranks, and "
                          f"data.pool_size = {cfg.data.pool_size} of the batch per rank")
    doctor.check_before_training(cfg)  # every input and weight file is there, before any work
    run_dir, names = Path(cfg.output.root) / cfg.output.name, cfg.losses.names
    if is_main:
        held = lock(run_dir)  # one run per folder, for as long as this one lives

    state = TrainingState(cfg, device, ddp, rank, world, fresh=not (run_dir / "ckpt" / "last.pt").exists())
    # Rank 0 alone judges and asks: the feedback images, the experts and the controller. Between their phases the
    # experts' networks and the LLM wait at `home`: on the CPU with train.offload, so training has the GPU's memory.
    home = torch.device("cpu") if cfg.train.offload else device
    feedback, experts, controller = [], [], None
    if is_main:
        feedback, experts = feedback_images(cfg.feedback, cfg.task.scale), make_experts(cfg.experts, home)
        missing_gt = [e.name for e in experts if e.full_reference and any(item["gt"] is None for item in feedback)]
        if missing_gt:
            raise ConfigError(f"experts {missing_gt} need ground truth, but the feedback images have none "
                              f"(feedback.degradation = '{cfg.feedback.degradation}')")
        controller = make_controller(cfg, experts, home)
    progress = resume(cfg, state, run_dir, is_main, experts, feedback)
    if progress is None:
        # Different seeds per rank so that stochastic layers (drop path) differ across ranks, as in one big batch.
        torch.manual_seed(cfg.train.seed + rank)
        np.random.seed(cfg.train.seed + rank)
        random.seed(cfg.train.seed + rank)
    history, weights, stage, attempt = progress or ([], [float(w) for w in cfg.losses.weights], 1, 0)
    if progress and stage <= cfg.train.stages and attempt == 0 and history[-1]["stage"] and "next_weights" not in history[-1]:
        # The run is extended (train.stages raised on a rerun): its last stage had been its final one, so the controller
        # is asked now for the weights of the next.
        if is_main:
            weights = ask_controller(controller, history, False, stage - 1, history[-1].get("attempt", 0), run_dir,
                                     device, home)
        weights = broadcast(weights, state)
        state.save(run_dir / "ckpt" / "last.pt", is_main, stage=stage - 1, attempt=0, history=history, weights=weights,
                   config=asdict(cfg))  # so that a kill in the new stage does not ask (and log) it again
    log = RunLog(cfg, run_dir, cfg.train.iters_per_stage * sum(1 for h in history if h["stage"])) if is_main else None
    if is_main:
        write_atomic(run_dir / "config.toml", lambda p: p.write_text(configurator.to_toml(asdict(cfg)) + "\n"))
        print(f"run {run_dir}: {cfg.train.stages} stages x {cfg.train.iters_per_stage} iterations, "
              f"losses {':'.join(names)}, experts {', '.join(e.name for e in experts)}, agent {cfg.agent.backend}, "
              f"{world} rank(s) on {device}, amp {state.amp}")
    if not history:
        if is_main:
            # Stage 0: the score before any training (the paper's "initial score").
            scores, _ = judge_stage(cfg, experts, state.raw, feedback, 0, run_dir, device, home, state.autocast)
            history.append({"stage": 0, "iteration": 0, "weights": dict(zip(names, weights)), **scores})
        # Saved like a finished stage: a retry of stage 1 (reflection) and a resume start from it.
        state.save(run_dir / "ckpt" / "last.pt", is_main, stage=0, attempt=0, history=history, weights=weights,
                   config=asdict(cfg))

    while stage <= cfg.train.stages:
        # Train: K iterations with this stage's weights, on every rank.
        memory = {"train": train_stage(cfg, state, weights, stage, attempt, log)}
        # Judge: rank 0 restores the feedback images, and the experts judge them.
        if is_main:
            net = state.ema if state.ema is not None else state.raw  # the EMA restores, when there is one
            scores, memory["feedback"] = judge_stage(cfg, experts, net, feedback, stage, run_dir, device, home,
                                                     state.autocast)
            history.append({"stage": stage, "attempt": attempt, "iteration": stage * cfg.train.iters_per_stage,
                            "weights": dict(zip(names, weights)), "memory_mib": memory, **scores})
        # Reflect: a stage that made the objective worse is undone and trained again; after R retries its best
        # attempt stays.
        retry = cfg.reflection.enabled and undo_if_worse(cfg, state, experts, history, stage, attempt, run_dir, is_main)
        # Propose: rank 0's controller chooses the next stage's weights, and every rank trains with them.
        if stage < cfg.train.stages or retry:
            if is_main:
                weights = ask_controller(controller, history, retry, stage, attempt, run_dir, device, home)
            weights = broadcast(weights, state)
        # Save: the checkpoint of every rank's state, the history, the curves and the report.
        stage, attempt = (stage, attempt + 1) if retry else (stage + 1, 0)
        save_stage(cfg, state, run_dir, history, weights, stage, attempt, not retry, is_main, log, experts, feedback)

    if is_main:
        print("\n" + (run_dir / "report.md").read_text())
        log.close()
        held.close()
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return state.raw, weights


# -----------------------------------------------------------------------------
# main(): training, and the commands around it (eval, doctor, prefetch).

COMMANDS = """commands (python lossagent.py COMMAND --help for their options):
  eval      score a checkpoint on the configured benchmarks, or a folder of images, by the papers' protocols
  doctor    check offline that every file the config needs is in place
  prefetch  download those files (on a machine with internet)
  config    print the resolved config as TOML: every setting with its value, comment, default and choices"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:
        return evaluate.main(argv[1:], load_config, build_network)
    command = argv[0] if argv[:1] in (["doctor"], ["prefetch"], ["config"]) else None
    parser = argparse.ArgumentParser(
        prog=f"lossagent.py {command or ''}".strip(), formatter_class=argparse.RawDescriptionHelpFormatter,
        description=doctor.__doc__ if command in ("doctor", "prefetch") else __doc__.split("\n\n")[0].strip(),
        epilog=COMMANDS if command is None else None)
    parser.add_argument("file", nargs="?", help="the TOML config file (or --config)")
    parser.add_argument("--config", help="TOML file, e.g. configs/demo.toml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    args = parser.parse_args(argv[1:] if command else argv)
    path = args.file or args.config
    if path is None:
        parser.error("give the config file")
    cfg = load_config(path, args.set)
    if command == "config":
        print(configurator.listing(cfg), end="")
        return 0
    return doctor.doctor(cfg, download=command == "prefetch") if command else run(cfg)


if __name__ == "__main__":
    try:
        status = main()
        sys.exit(status if isinstance(status, int) else 0)
    except (ConfigError, FileNotFoundError, ImageError) as e:  # what a user can fix: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
