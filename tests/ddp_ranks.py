"""Run under torchrun by test_run.py: trains, then each rank saves its final loss weights and parameters."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lossagent  # noqa: E402

config, runs, out = sys.argv[1:4]
net, weights = lossagent.run(lossagent.load_config(config, [f"output.root={runs}"]))
Path(out).mkdir(exist_ok=True)
torch.save({"weights": weights, "params": {k: v.detach().cpu() for k, v in net.state_dict().items()}},
           Path(out) / f"rank{os.environ['RANK']}.pt")
