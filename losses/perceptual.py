"""Perceptual loss: distance between VGG19 feature maps of restored and ground-truth images.

The default layer weights are those of Real-ESRGAN and SwinIR's GAN setting (BasicSR's PerceptualLoss
with vgg19 features taken before the ReLU, ImageNet input normalisation, L1 criterion).
"""

import torch
import torch.nn.functional as F
from torch import nn

from losses.weight_files import load_state_dict_file, require_weight_file, weight_file

VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"

# Real-ESRGAN / SwinIR-GAN: shallow layers weigh little, so the loss is mostly about texture and structure.
DEFAULT_LAYER_WEIGHTS = {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0}


def vgg19_layer_names() -> list[str]:
    """Names of torchvision's vgg19().features, in order: conv1_1, relu1_1, conv1_2, ..., pool5 (37 layers)."""
    names = []
    for block, n_convs in enumerate((2, 2, 4, 4, 4), start=1):
        for i in range(1, n_convs + 1):
            names += [f"conv{block}_{i}", f"relu{block}_{i}"]
        names.append(f"pool{block}")
    return names


class PerceptualLoss(nn.Module):
    """sum over layers of weight * criterion(VGG19_layer(restored), VGG19_layer(gt)).

    Options:
        layer_weights: {layer name: weight}, names as in vgg19_layer_names(); default DEFAULT_LAYER_WEIGHTS.
        use_input_norm: normalise inputs with the ImageNet mean/std VGG was trained with.
        criterion: 'l1' or 'l2' (mean squared error) between feature maps.
        pretrained: False gives a randomly initialised VGG; only for tests and benchmarks that ask for it.
        weights_path: where vgg19-dcbb9e9d.pth is, if not in $TORCH_HOME/hub/checkpoints/.
    """

    def __init__(
        self,
        layer_weights: dict[str, float] | None = None,
        use_input_norm: bool = True,
        criterion: str = "l1",
        pretrained: bool = True,
        weights_path: str | None = None,
    ):
        super().__init__()
        import torchvision

        layer_weights = dict(DEFAULT_LAYER_WEIGHTS if layer_weights is None else layer_weights)
        names = vgg19_layer_names()
        unknown = sorted(set(layer_weights) - set(names))
        if unknown or not layer_weights:
            raise ValueError(f"Perceptual loss: unknown or no layer names {unknown} in layer_weights; valid names: {', '.join(names)}")
        if criterion not in ("l1", "l2"):
            raise ValueError(f"Perceptual loss: criterion must be 'l1' or 'l2', got {criterion!r}")
        # Check for the weights before building anything, so a missing file stops the run at once.
        path = require_weight_file("Perceptual", VGG19_FILE, VGG19_URL, weights_path) if pretrained else None

        # Keep only the layers up to the deepest one we read: conv5_4 is layer 34 of 37, and the
        # classifier (the bulk of VGG19's 548 MB) is never needed. Building on the meta device skips
        # the costly random init of the parts we throw away; to_empty then allocates what is left.
        self.layer_weights = {names.index(name): float(w) for name, w in layer_weights.items()}  # layer index -> weight
        deepest = max(self.layer_weights)
        with torch.device("meta"):
            features = torchvision.models.vgg19(weights=None).features[: deepest + 1]
        features = features.to_empty(device="cpu")
        if pretrained:
            state = load_state_dict_file(path)
            # torchvision keys look like 'features.34.weight'; slicing kept the indices as module names.
            kept = {
                k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.") and int(k.split(".")[1]) <= deepest
            }
            features.load_state_dict(kept)
        else:
            for m in features.modules():
                if isinstance(m, nn.Conv2d):  # the same init torchvision's VGG uses
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(m.bias)
        for m in features.modules():
            if isinstance(m, nn.ReLU):
                # torchvision's ReLUs work in place and would overwrite the pre-activation maps we keep.
                m.inplace = False
        self.features = features.requires_grad_(False).eval()

        self.use_input_norm = use_input_norm
        self.criterion = F.l1_loss if criterion == "l1" else F.mse_loss
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def weight_files(cls, pretrained: bool = True, weights_path: str | None = None, **_) -> list[tuple[str, str]]:
        """[(path, download url)] of the files this loss loads with these options."""
        return [(str(weight_file(VGG19_FILE, weights_path)), VGG19_URL)] if pretrained else []

    def train(self, mode: bool = True):
        # The VGG is a fixed measuring device: dropping it into train mode must never happen.
        super().train(mode)
        self.features.eval()
        return self

    def _features(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        if self.use_input_norm:
            x = (x - self.mean) / self.std
        feats = {}
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.layer_weights:
                feats[index] = x
        return feats

    def forward(self, restored: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        pred = self._features(restored)
        with torch.no_grad():
            target = self._features(gt.detach())
        return sum(w * self.criterion(pred[i], target[i]) for i, w in self.layer_weights.items())
