"""LPIPS (Zhang et al. 2018) as a training loss, through the `lpips` package.

The package ships its calibrated linear layers, but builds its backbone with torchvision's
`alexnet(pretrained=True)` / `vgg16(pretrained=True)`, which downloads ImageNet weights. We ask it
for a random backbone instead (pnet_rand=True: it then calls torchvision with pretrained=False) and
copy the ImageNet weights in ourselves from the torch hub cache, so nothing is ever downloaded.
"""

import warnings

import torch
from torch import nn

from losses.weight_files import load_state_dict_file, require_weight_file, weight_file

BACKBONE_FILES = {
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
}


class LPIPSLoss(nn.Module):
    """Mean LPIPS distance between restored and gt (images in [0, 1]).

    Options:
        net: 'alex' (default, the variant the LPIPS authors recommend as a metric) or 'vgg'.
        pretrained: False keeps a random backbone (the package's linear layers are still loaded);
            only for tests and benchmarks that ask for it.
        weights_path: the torchvision backbone file, if not in $TORCH_HOME/hub/checkpoints/.
    """

    def __init__(self, net: str = "alex", pretrained: bool = True, weights_path: str | None = None):
        super().__init__()
        if net not in BACKBONE_FILES:
            raise ValueError(f"LPIPS loss: net must be one of {', '.join(BACKBONE_FILES)}, got {net!r}")
        filename, url = BACKBONE_FILES[net]
        path = require_weight_file("LPIPS", filename, url, weights_path) if pretrained else None

        import lpips

        with warnings.catch_warnings():
            # pnet_rand=True makes lpips call torchvision with the deprecated pretrained=False argument.
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
        if pretrained:
            backbone = load_state_dict_file(path)
            # lpips splits torchvision's `features` into slice1..slice5 but keeps each layer's original
            # index as its name, so 'slice2.3.weight' is torchvision's 'features.3.weight'.
            # A wrong file leaves keys missing, which load_state_dict then reports by name.
            renamed = {k: backbone.get("features." + k.split(".", 1)[1]) for k in model.net.state_dict()}
            model.net.load_state_dict({k: v for k, v in renamed.items() if v is not None})
        self.model = model.requires_grad_(False).eval()

    @classmethod
    def weight_files(cls, net: str = "alex", pretrained: bool = True, weights_path: str | None = None, **_) -> list[tuple[str, str]]:
        """[(path, download url)] of the files this loss loads with these options."""
        if not pretrained or net not in BACKBONE_FILES:
            return []
        filename, url = BACKBONE_FILES[net]
        return [(str(weight_file(filename, weights_path)), url)]

    def train(self, mode: bool = True):
        # A fixed metric: its dropout layers must stay off whatever the trainer does.
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, restored: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        # LPIPS expects inputs in [-1, 1]; it returns one distance per image, [B, 1, 1, 1].
        return self.model(restored * 2 - 1, gt.detach() * 2 - 1).mean()
