"""`lossagent.py eval`: the paper's benchmark protocol, for a trained network or for a folder of images.

Writes {"metrics": {metric: {"mean", "per_image"}}} for a folder, and {"ckpt", "datasets": {set: that}} for a
network. SR sets score PSNR/SSIM on the Y channel with `scale` pixels of border cropped (SwinIR/BasicSR); the
all-in-one sets follow PromptIR's test code; other metrics are pyiqa's with its defaults, on the RGB output.
"""
import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch

from data.benchmark import BENCHMARKS, benchmark_pairs, is_full_reference, score_images, tiled_forward
from data.images import read_images, to_tensor
from models import load_pretrained
from tools.configurator import AtLeast, ConfigError
from tools.report import fmt
from tools.rundir import write_json


# The settings of `eval`, two sections of lossagent.py's Config.

@dataclass
class BenchmarkConfig:
    name: str = "Set5"  # a set of data/benchmark.py's BENCHMARKS (Set5, BSD68, SOTS, ...) or any label
    kind: Literal["", "sr_bicubic", "noref", "denoise", "pairs"] = ""  # "" = known from the name
    gt: str = ""  # ground-truth folder
    lq: str = ""  # degraded-input folder (noref and pairs sets; optional for sr_bicubic)
    sigma: float = 0.0  # denoise: noise level (BSD68 at 15, 25, 50 = three tables)


@dataclass
class EvalConfig:
    metrics: list[str] = field(default_factory=lambda: ["psnr", "ssim"])  # psnr/ssim (BasicSR protocol) and any pyiqa metric
    tile: Annotated[int, AtLeast(0)] = 0  # tiled inference tile size in input pixels (0 = whole image)
    tile_overlap: int = 32  # overlap between tiles
    seed: int = 0  # noise seed of denoising sets


def show(value):
    return "—" if value is None else fmt(value)


def print_table(results):
    names = sorted({m for r in results.values() for m in r["metrics"]})
    print("| set | " + " | ".join(names) + " |\n|" + "---|" * (1 + len(names)))
    for label, r in results.items():
        print(f"| {label} | " + " | ".join(show(r["metrics"].get(m, {}).get("mean")) for m in names) + " |")


def write(out, document):
    """eval.json: a non-finite score (the PSNR of identical images) is written as null."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json(out, document)
    print(f"wrote {out}")


def scored(images, metrics, device, **settings):
    """score_images, with what a user can fix (an unknown metric, a metric without its ground truth) as one
    ConfigError, and a line on stderr for each metric that could not score an image (its mean is null)."""
    try:
        results = score_images(images, metrics, device, **settings)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name, result in results["metrics"].items():
        if "error" in result:
            print(f"warning: {result['error']}; {name} has no mean for this set (null in the JSON)", file=sys.stderr,
                  flush=True)
    return results


def score_folder(images, gt, metrics, device, out=None):
    """The images of folder `images` scored without any network (the tables' "GT (Ref.)" rows); full-reference
    metrics compare with the images of the same name in folder `gt`."""
    needing = [m for m in metrics if is_full_reference(m)]
    if needing and not gt:
        raise ConfigError(f"{', '.join(needing)} compare with the ground truth: give its folder with --gt")
    found = [(name, to_tensor(img)[None]) for name, img in read_images([images])]
    gts = {name: to_tensor(img)[None] for name, img in read_images([gt])} if gt else None
    missing = [name for name, _ in found if gts is not None and name not in gts]
    if missing:
        raise ConfigError(f"the --gt folder {gt} has no image named {', '.join(missing[:5])}"
                          + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    results = {Path(images).name: scored(found, metrics, device, gts=gts)}
    print_table(results)
    if out:
        write(out, results[Path(images).name])
    return results


def evaluate_network(cfg, net, ckpt, metrics, device, out):
    """Restores every [[benchmarks]] set of `cfg` with `net` (loaded from `ckpt`) and scores it."""
    if not cfg.benchmarks:
        raise ConfigError("the config has no [[benchmarks]] tables to evaluate")
    net = net.to(device).eval()
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
        if known.get("protocol") == "promptir":
            protocol = {"style": "promptir"}
        else:  # the SR sets, and sets of your own: BasicSR's protocol, on Y for SR
            crop = cfg.task.scale if known.get("crop_border") == "scale" else known.get("crop_border", 0)
            protocol = {"style": "basicsr", "crop_border": crop, "y_channel": known.get("y_channel", cfg.task.scale > 1)}
        usable = [m for m in metrics if has_gt or not is_full_reference(m)]  # no-GT sets: no-reference metrics only
        label = f"{b.name}_sigma{b.sigma:g}" if b.sigma else b.name
        results[label] = scored(restored, usable, device, gts=[it["gt"] for it in items] if has_gt else None,
                                protocol=protocol)
        print(f"{label}: " + ", ".join(f"{m} {show(v['mean'])}" for m, v in results[label]["metrics"].items()), flush=True)
    print_table(results)
    write(out, {"ckpt": str(ckpt), "datasets": results})
    return results


def main(argv, load_config, build_network):
    """`lossagent.py eval ...`: lossagent.py passes its config loader and network builder."""
    parser = argparse.ArgumentParser(prog="lossagent.py eval", description=__doc__)
    parser.add_argument("--config", help="the run's config: network, [[benchmarks]] and [eval]")
    parser.add_argument("--ckpt", help="our ckpt/*.pt or an official checkpoint; default: model.pretrained")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    parser.add_argument("--images", help="score the images of this folder without any network (the 'GT (Ref.)' row)")
    parser.add_argument("--gt", help="with --images: ground-truth folder for full-reference metrics (matched by name)")
    parser.add_argument("--metrics", help="comma-separated metric names; default: [eval] metrics")
    parser.add_argument("--out", help="JSON file to write; default: <run dir>/eval.json for --ckpt, none for --images")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if args.images:
        if not args.metrics:
            raise ConfigError("eval --images needs --metrics, e.g. --metrics niqe,musiq")
        return score_folder(args.images, args.gt, args.metrics.split(","), device, args.out)
    if not args.config:
        raise ConfigError("eval needs --config (with --ckpt) or --images")
    cfg = load_config(args.config, args.set)
    path = args.ckpt or cfg.model.pretrained
    if not path:
        raise ConfigError("eval needs --ckpt, or model.pretrained in the config")
    net = load_pretrained(build_network(cfg), path, key=cfg.model.pretrained_key or None, trusted=cfg.model.trusted)
    metrics = args.metrics.split(",") if args.metrics else list(cfg.eval.metrics)
    out = args.out or str(Path(cfg.output.root) / cfg.output.name / "eval.json")
    return evaluate_network(cfg, net, path, metrics, device, out)
