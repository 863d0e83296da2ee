"""Networks and `load_pretrained` for the official checkpoints.

    from models.swinir import SwinIR, PRESETS              # SwinIR(**PRESETS["classical_x4_M"])
    from models.promptir import PromptIR                   # PromptIR() is the paper model
    from models.discriminators import UNetDiscriminatorSN, VGGStyleDiscriminator
    from models import build_network, load_pretrained       # build_network("SwinIR", {...}) from a config
"""
import os
import pickle
import warnings

import torch

# Official checkpoints (file name -> where to download it, and the entry holding the weights).
OFFICIAL_CHECKPOINTS = {
    "001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth": (
        "SwinIR(**PRESETS['classical_x4_M'])", "params",
        "https://github.com/JingyunLiang/SwinIR/releases/download/v0.0/001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth"),
    "003_realSR_BSRGAN_DFO_s64w8_SwinIR-M_x4_GAN.pth": (
        "SwinIR(**PRESETS['realworld_x4_M'])", "params_ema",
        "https://github.com/JingyunLiang/SwinIR/releases/download/v0.0/003_realSR_BSRGAN_DFO_s64w8_SwinIR-M_x4_GAN.pth"),
    "model.ckpt": (
        "PromptIR(decoder=True)", "state_dict (Lightning, 'net.' prefix)",
        "https://github.com/va1shn9v/PromptIR/releases (model.ckpt, v1.0; also linked from the PromptIR README)"),
}


def _missing_file_message(model, path):
    wanted = {name: info for name, info in OFFICIAL_CHECKPOINTS.items()
              if info[0].startswith(type(model).__name__)}
    lines = [f"checkpoint not found: {path}"]
    if wanted:
        lines.append(f"{type(model).__name__} loads the official checkpoints (download once, then pass the local path):")
        lines += [f"  {name}  for {build}: {url}" for name, (build, _, url) in wanted.items()]
    else:
        lines.append(f"pass the path of a checkpoint saved from a {type(model).__name__}.")
    return "\n".join(lines)


def _load_file(path, trusted):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not trusted:
            raise RuntimeError(
                f"{path} holds Python objects besides tensors (e.g. a Lightning checkpoint), which can run code "
                f"when unpickled. If you trust this file, call load_pretrained(..., trusted=True).") from error
    warnings.warn(f"loading {path} with weights_only=False (trusted=True): the file can execute code", stacklevel=3)
    return torch.load(path, map_location="cpu", weights_only=False)


def _strip_prefix(state_dict, prefix):
    """Keep the entries under `prefix` (prefix removed) when there are any; otherwise the dict as is."""
    if any(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def _select_state_dict(checkpoint, key, path):
    """Find the state dict inside the known checkpoint layouts (see load_pretrained)."""
    if not isinstance(checkpoint, dict):
        raise RuntimeError(f"{path} does not hold a state dict (found {type(checkpoint).__name__})")
    if key is None:
        key = next((k for k in ("params_ema", "params", "state_dict", "net") if isinstance(checkpoint.get(k), dict)), None)
    if key is not None:
        if key not in checkpoint:
            raise RuntimeError(f"{path} has no entry {key!r}; its entries are {sorted(checkpoint)[:10]}")
        state_dict = checkpoint[key]
    else:
        state_dict = checkpoint  # a raw state dict
    if key == "state_dict":  # Lightning: the network is the LightningModule's attribute `net`
        state_dict = _strip_prefix(state_dict, "net.")
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise RuntimeError(f"{path} does not look like a model checkpoint: expected a state dict, or one under "
                           f"'params_ema', 'params', 'state_dict' or 'net'; found entries {sorted(checkpoint)[:10]}")
    return _strip_prefix(state_dict, "module.")  # saved from a DistributedDataParallel wrapper


def build_network(arch, args):
    """The network `arch` (SwinIR or PromptIR) built with the constructor arguments `args` (official names)."""
    if arch == "SwinIR":
        from models.swinir import SwinIR
        return SwinIR(**args)
    from models.promptir import PromptIR
    return PromptIR(**args)


def load_pretrained(model, path, key=None, trusted=False):
    """Load weights from `path` into `model` (strict: every key must match) and return the model.

    Accepted files: a raw state dict; {'params': sd} and/or {'params_ema': sd} (BasicSR/KAIR, SwinIR
    releases; `key` picks one, default 'params_ema' when present, else 'params'); a Lightning checkpoint
    {'state_dict': {'net.<name>': ...}} (PromptIR release); a LossAgent checkpoint (ckpt/*.pt: 'params', and
    'params_ema' when the run keeps an EMA, under BasicSR's names).
    Files are read with torch.load(weights_only=True); a file that needs full unpickling (some Lightning
    checkpoints) is only read with trusted=True.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_file_message(model, path))
    state_dict = _select_state_dict(_load_file(path, trusted), key, path)

    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise RuntimeError(
            f"{path} does not match {type(model).__name__}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}. Is it the checkpoint for this configuration "
            f"(e.g. the SwinIR preset / upsampler), and the right entry (key={key!r})?")
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state_dict.items() if v.shape != expected[k].shape]
    if mismatched:
        raise RuntimeError(f"{path} has {len(mismatched)} tensors of the wrong shape for this {type(model).__name__} "
                           f"(another configuration, e.g. img_size / embed_dim?): {mismatched[:5]}")
    model.load_state_dict(state_dict, strict=True)
    return model
