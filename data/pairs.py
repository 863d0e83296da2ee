"""The training pairs of each task, stage by stage, as the trainer takes them: (lq, gt, sharpened gt or None) batches
of one rank on the training device. Everything the loop needs to know of a task is here."""
import torch

from data.air import AIRDataset
from data.cisr import CISRDataset
from data.images import SeededItems, StageSampler, stage_seed
from data.risr import GTCropDataset, RealESRGANPairs
from losses.sharpen import usm_sharp


class TrainingPairs:
    """The training batches of one rank, stage by stage: (lq, gt, sharpened gt or None) on the training device.
    CISR and AIR read their pairs from the loader; RISR degrades its GT crops on the device, as Real-ESRGAN does
    (the sharpened GT degraded, the patch cut after, the pair pool: data.risr.RealESRGANPairs).
    The loader lives as long as the run (its workers and their image caches persist), and every stage's patches
    depend only on (seed, stage, rank), so a resumed stage sees what an uninterrupted one saw."""

    def __init__(self, cfg, rank, world, device):
        d, task = cfg.data, cfg.task.name
        if task == "cisr":
            dataset = CISRDataset(d.train, scale=cfg.task.scale, lr_patch=d.patch_size, augment=d.augment)
        elif task == "risr":
            dataset = GTCropDataset(d.train, crop=d.degrade_size or d.patch_size, augment=d.augment)
        else:
            dataset = AIRDataset(d.train, derain_dir=d.derain or None, dehaze_dir=d.dehaze or None,
                                 patch=d.patch_size, sigmas=tuple(d.sigmas), augment=d.augment)
        per_rank = cfg.train.batch_size // world
        # Its own generator: the loader draws its workers' base seed from it at every new iteration, which must not
        # consume the training RNG (drop path). The patches themselves are seeded item by item (SeededItems).
        self.loader = torch.utils.data.DataLoader(
            SeededItems(dataset), batch_size=per_rank, drop_last=True,
            sampler=StageSampler(len(dataset), cfg.train.iters_per_stage * per_rank),
            num_workers=cfg.train.num_workers, pin_memory=device.type == "cuda",
            persistent_workers=cfg.train.num_workers > 0, generator=torch.Generator())
        self.degradation = RealESRGANPairs(cfg.task.scale, d.patch_size, d.pool_size, d.jpeg) if task == "risr" else None
        self.seed, self.rank, self.device = cfg.train.seed, rank, device
        self.sharpen, self.channels_last = cfg.losses.sharpen_gt, cfg.train.channels_last

    def stage(self, stage):
        seed = stage_seed(self.seed, stage, self.rank)
        self.loader.sampler.reseed(seed)
        # The degradation draws its sizes and branches from this CPU generator (reading those never waits for the
        # GPU), seeded like the loader.
        generator = torch.Generator().manual_seed(seed)
        for batch in self.loader:
            gt = batch["gt"].to(self.device, non_blocking=True)
            if self.degradation:
                lq, gt = self.degradation(gt, generator)
            else:
                lq = batch["lq"].to(self.device, non_blocking=True)
            if self.channels_last:
                lq = lq.contiguous(memory_format=torch.channels_last)
            yield lq, gt, usm_sharp(gt) if self.sharpen else None

    def state_dict(self):
        """The pairs' own state (RISR's pair pool), which must survive a resume and a rollback."""
        pool = self.degradation.pool if self.degradation else None
        return {"pool": pool.state_dict() if pool else None}

    def load_state_dict(self, state):
        if state and state["pool"] is not None:
            self.degradation.pool.load_state_dict(state["pool"], self.device)
