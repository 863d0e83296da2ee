"""What a run logs as it goes: per logged iteration a line in metrics.jsonl and on the console, per stage its summary
line; and, opt-in ([output] tensorboard = true, [output] wandb = "<project>"), the same in TensorBoard and Weights &
Biases: every loss term unweighted and weighted, the discriminator's terms and it/s, then per stage every expert's
mean score, the weights the stage trained with and the ones proposed next, the parse success rate, and the feedback
sheet (input | restored | ground truth, with the scores).

Rank 0 only; each package is imported only when switched on. The step is the number of iterations trained so far,
undone attempts included, so it only grows. A resumed run writes into the same TensorBoard folder, which drops what the
killed run had logged after its last checkpoint (purge_step), and into the same W&B run (its id is kept in
runs/<name>/wandb_id), where steps that run already has are not logged again.
"""
import time
import uuid

import numpy as np

from tools.report import fmt, weights_text
from tools.rundir import append_jsonl, attempt_folder, write_atomic


class RunLog:
    def __init__(self, cfg, run_dir, trained):
        """`trained`: the iterations trained before this process goes on (0 for a new run)."""
        o, self.writer, self.wandb = cfg.output, None, None
        self.cfg, self.run_dir, self.trained, self.first_step = cfg, run_dir, trained, trained + 1
        self.seconds = 0.0  # what logging to TensorBoard and W&B has cost (bench.py reads it)
        if o.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=self.first_step)
        if o.wandb:
            import wandb
            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            write_atomic(id_file, lambda p: p.write_text(run_id + "\n"))
            self.wandb = wandb.init(project=o.wandb, name=o.name, id=run_id, resume="allow", dir=str(run_dir),
                                    mode=o.wandb_mode, reinit="finish_previous")

    def scalars(self, step, values):
        start = time.perf_counter()
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        if self.wandb and step >= max(self.first_step, self.wandb.step):
            self.wandb.log(values, step=step)
        self.seconds += time.perf_counter() - start

    def iteration(self, stage, attempt, iteration, step, it_per_s, total, terms, weights, d_terms):
        """The line of one logged iteration (`step` of the stage's attempt): the total loss, every term unweighted and
        weighted, the discriminator's terms, it/s. The tensors are read here (.item() waits for the device)."""
        line = {"stage": stage, "attempt": attempt, "iteration": iteration, "step": self.trained + step,
                "loss": total.item(), **{n: v.item() for n, v in terms.items()}}
        line.update(weighted={n: weights[n] * line[n] for n in terms}, **{k: v.item() for k, v in d_terms.items()},
                    it_per_s=it_per_s)
        append_jsonl(self.run_dir / "metrics.jsonl", [line])
        print(f"stage {stage}/{self.cfg.train.stages} iter {iteration} | loss {line['loss']:.4f} | "
              + " ".join(f"{n} {line[n]:.4f}" for n in terms) + f" | {it_per_s:.2f} it/s", flush=True)
        if self.writer or self.wandb:
            values = {"loss/total": line["loss"], "speed/it_per_s": it_per_s}
            values.update({f"loss/{n}": line[n] for n in terms})
            values.update({f"loss_weighted/{n}": v for n, v in line["weighted"].items()})
            values.update({f"discriminator/{k}": line[k] for k in d_terms})
            self.scalars(line["step"], values)

    def stage(self, entry, weights):
        """A stage's attempt is judged (and its next weights chosen): its summary line, and its numbers and sheet."""
        self.trained += self.cfg.train.iters_per_stage
        names = self.cfg.losses.names
        print(f"stage {entry['stage']} done: " + ", ".join(f"{k} {fmt(v['mean'])}" for k, v in entry["scores"].items()
                                                          if "mean" in v)
              + (f" | next {weights_text(names, weights)}" if "next_weights" in entry else "")
              + (f" (fallback: {entry['fallback']})" if entry.get("fallback") else "")
              + " | peak MiB " + ", ".join(f"{k} {v}" for k, v in entry["memory_mib"].items() if v is not None), flush=True)
        if not (self.writer or self.wandb):
            return
        values = {f"experts/{k}": v["mean"] for k, v in entry["scores"].items() if "mean" in v}
        if entry.get("fused") is not None:
            values["experts/fused"] = entry["fused"]
        values.update({f"weights/{n}": entry["weights"][n] for n in names})
        values.update({f"next_weights/{n}": v for n, v in entry.get("next_weights", {}).items()})
        if entry.get("parse_total"):
            values["agent/parse_rate"] = entry["parse_ok"] / entry["parse_total"]
        self.scalars(self.trained, values)
        sheet = self.run_dir / "feedback" / attempt_folder(entry) / "sheet.png"
        if sheet.exists():
            from PIL import Image
            image = np.asarray(Image.open(sheet).convert("RGB"))
            if self.writer:
                self.writer.add_image(f"feedback/stage_{entry['stage']}", image, self.trained, dataformats="HWC")
            if self.wandb and self.trained >= max(self.first_step, self.wandb.step):
                import wandb
                self.wandb.log({"feedback": wandb.Image(image, caption=f"stage {entry['stage']}")}, step=self.trained)

    def close(self):
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()
