"""Where the frozen backbones of Perceptual and LPIPS find their ImageNet weights.

We never let torchvision download: on a cluster node without internet that would hang or fail
in the middle of a run. Instead each loss checks for its file before building anything and
fails early with one message that says exactly what to fetch and where to put it.
"""

from pathlib import Path

import torch


def hub_checkpoint(filename: str) -> Path:
    """The path torchvision itself would cache `filename` at: $TORCH_HOME/hub/checkpoints/."""
    # torch.hub.get_dir() reads $TORCH_HOME on every call, so tests can redirect it per test.
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def weight_file(filename: str, weights_path: str | None) -> Path:
    """The file a loss will load: the user's `weights_path` if given, else the torch hub cache path."""
    return Path(weights_path).expanduser() if weights_path else hub_checkpoint(filename)


def require_weight_file(loss_name: str, filename: str, url: str, weights_path: str | None) -> Path:
    """Return the weight file's path, or raise FileNotFoundError explaining how to provide it."""
    path = weight_file(filename, weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{loss_name} loss needs the ImageNet weights file '{filename}', not found at {path}. "
            f"Download it once with internet access from {url} and place it at {hub_checkpoint(filename)} "
            f"(the torch hub cache, $TORCH_HOME/hub/checkpoints/), or point the loss's `weights_path` option "
            f"at a copy elsewhere."
        )
    return path


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    # weights_only: a weights file is data, never code to execute.
    return torch.load(path, map_location="cpu", weights_only=True)
