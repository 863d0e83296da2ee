"""The loss repository whose weights the LLM agent adjusts.

LOSSES maps the display name used in prompts and configs to a loss class. Every loss is an
nn.Module with forward(restored, gt) -> scalar, both images [B, 3, H, W] in [0, 1].
Adding a loss = one class + one entry here. Its constructor's keyword arguments are its options,
and a classmethod `weight_files(**options)` may list the files it loads (see required_files).
Two optional attributes tell the trainer how to use a loss, so that it never needs the loss's name:
`sharpened_target = False` (default True) keeps the plain ground truth for it when losses.sharpen_gt is on,
and a method `discriminator_step(restored, gt, net_d=None)` trains a network of its own after every generator
step (GAN), with `net_d` the module to train (its DDP wrapper) and `update_when_zero` whether it trains while
the loss's weight is 0.
"""

import inspect

from torch import nn

from losses.gan import GANLoss
from losses.lpips_loss import LPIPSLoss
from losses.perceptual import PerceptualLoss
from losses.pixel import CharbonnierLoss, FFTLoss, L1Loss, MSELoss, SSIMLoss
from losses.sharpen import usm_sharp

LOSSES = {
    "L1": L1Loss,
    "MSE": MSELoss,
    "Charbonnier": CharbonnierLoss,
    "SSIM": SSIMLoss,
    "Perceptual": PerceptualLoss,
    "LPIPS": LPIPSLoss,
    "GAN": GANLoss,
    "FFT": FFTLoss,
}


def accepted_options(name: str) -> list[str]:
    """The option names (constructor keyword arguments) of loss `name`."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}'; known losses: {', '.join(LOSSES)}")
    params = inspect.signature(LOSSES[name]).parameters.values()
    # A loss without its own __init__ shows nn.Module's (*args, **kwargs): those are not options.
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def check_options(name: str, options: dict) -> None:
    """Raises ValueError for an unknown loss or an option it does not take, naming what it takes."""
    accepted = accepted_options(name)
    bad = sorted(set(options) - set(accepted))
    if bad:
        raise ValueError(f"bad option(s) {', '.join(bad)} for loss '{name}'; accepted options: {', '.join(accepted) or '(none)'}")


def check_repository(names: list[str], options: dict[str, dict]) -> None:
    """Raises ValueError for a loss listed twice, an unknown loss (also among `options`) or an option a loss does not
    take, before anything is built: a typo should not cost a VGG load first."""
    if len(set(names)) != len(names):
        raise ValueError(f"the loss repository lists a loss twice: {names}")
    for name in dict.fromkeys([*names, *options]):
        check_options(name, options.get(name, {}))


def build_loss_repository(names: list[str], options: dict[str, dict] | None = None) -> nn.ModuleDict:
    """Build the losses `names` (in that order) with options[name] as each one's keyword arguments."""
    options = options or {}
    check_repository(names, options)
    return nn.ModuleDict({name: LOSSES[name](**options.get(name, {})) for name in names})


def required_files(name: str, options: dict | None = None) -> list[tuple[str, str]]:
    """[(path, download url)] of the weight files loss `name` would load with `options`, without building it."""
    options = options or {}
    check_options(name, options)
    weight_files = getattr(LOSSES[name], "weight_files", None)
    return weight_files(**options) if weight_files else []


__all__ = ["LOSSES", "accepted_options", "build_loss_repository", "check_options", "check_repository", "required_files",
           "usm_sharp"]
