"""Adversarial loss with its own discriminator and optimiser.

The loss owns the discriminator (`net_d`) and its Adam (`opt_d`), so a loss repository is
self-contained: the trainer adds `forward(restored, gt)` (the generator term) to its weighted sum
like any other loss, and calls `discriminator_step(restored, gt)` once per iteration after the
generator's backward (and step), as in BasicSR's SRGAN/ESRGAN models. That order is required:
the generator term's graph runs through D, and the D step changes D's weights in place.
"""

import torch
import torch.nn.functional as F
from torch import nn

GAN_TYPES = ("vanilla", "lsgan", "hinge", "ragan")
DISCRIMINATORS = ("unet", "vgg")


class GANLoss(nn.Module):
    """Generator adversarial term; the discriminator is trained by `discriminator_step`.

    With losses.sharpen_gt the other terms compare with the sharpened ground truth; this one does not
    (`sharpened_target = False`): its discriminator must learn what real photographs look like (Real-ESRGAN).

    Options:
        gan_type: 'vanilla' (BCE on logits; SwinIR-GAN, Real-ESRGAN), 'lsgan' (least squares),
            'hinge', or 'ragan' (relativistic average GAN of ESRGAN, BCE on logit differences).
        discriminator: 'unet' (UNetDiscriminatorSN, per-pixel logits, Real-ESRGAN) or 'vgg'
            (VGGStyleDiscriminator, one logit per image, ESRGAN; needs inputs of size input_size).
        num_feat: discriminator width.
        input_size: patch size the 'vgg' discriminator is built for (128 or 256); unused by 'unet'.
        lr, betas: Adam settings of the discriminator (BasicSR's GAN configs).
        update_when_zero: read by the trainer: keep training the discriminator in stages where the
            GAN weight is 0, so it is not stale when the weight comes back.
    """

    sharpened_target = False

    def __init__(
        self,
        gan_type: str = "vanilla",
        discriminator: str = "unet",
        num_feat: int = 64,
        input_size: int = 128,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        update_when_zero: bool = False,
    ):
        super().__init__()
        if gan_type not in GAN_TYPES:
            raise ValueError(f"GAN loss: gan_type must be one of {', '.join(GAN_TYPES)}, got {gan_type!r}")
        if discriminator not in DISCRIMINATORS:
            raise ValueError(f"GAN loss: discriminator must be one of {', '.join(DISCRIMINATORS)}, got {discriminator!r}")
        from models.discriminators import UNetDiscriminatorSN, VGGStyleDiscriminator

        self.gan_type = gan_type
        self.update_when_zero = update_when_zero
        if discriminator == "unet":
            self.net_d = UNetDiscriminatorSN(num_in_ch=3, num_feat=num_feat, skip_connection=True)
        else:
            self.net_d = VGGStyleDiscriminator(num_in_ch=3, num_feat=num_feat, input_size=input_size)
        self.opt_d = torch.optim.Adam(self.net_d.parameters(), lr=lr, betas=tuple(betas))

    def _criterion(self, logits: torch.Tensor, target_is_real: bool, for_discriminator: bool) -> torch.Tensor:
        # In float32: logits may come out of an autocast region in half precision.
        logits = logits.float()
        if self.gan_type == "hinge":
            if for_discriminator:
                return F.relu(1 - logits).mean() if target_is_real else F.relu(1 + logits).mean()
            return -logits.mean()  # the generator just pushes the fake logits up
        target = torch.full_like(logits, 1.0 if target_is_real else 0.0)
        if self.gan_type == "lsgan":
            return F.mse_loss(logits, target)
        # vanilla and ragan: BCE on logits, which (unlike BCE on sigmoids) is allowed under autocast.
        return F.binary_cross_entropy_with_logits(logits, target)

    def forward(self, restored: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        # Freeze D while computing the generator term: the gradient flows through D to `restored`
        # but is not accumulated into D's parameters (that would leak into the next D step).
        saved = [p.requires_grad for p in self.net_d.parameters()]
        self.net_d.requires_grad_(False)
        try:
            fake = self.net_d(restored)
            if self.gan_type != "ragan":
                return self._criterion(fake, True, for_discriminator=False)
            # ESRGAN: the generator wants fakes to look "more real than the average real" and reals
            # "less real than the average fake"; D(gt) is a constant here.
            with torch.no_grad():
                real = self.net_d(gt)
            loss_real = self._criterion(real - fake.mean(), False, for_discriminator=False)
            loss_fake = self._criterion(fake - real.mean(), True, for_discriminator=False)
            return (loss_real + loss_fake) / 2
        finally:
            for p, flag in zip(self.net_d.parameters(), saved):
                p.requires_grad_(flag)

    def discriminator_step(self, restored: torch.Tensor, gt: torch.Tensor, net_d: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """One Adam step of the discriminator on (gt: real, restored: fake); returns detached logs.

        `net_d` lets the trainer pass a DDP-wrapped self.net_d. Real and fake losses are
        backpropagated separately, as BasicSR does, so each DDP forward is followed by its own
        backward (required by DDP, and keeps BatchNorm statistics per batch kind).
        """
        net_d = self.net_d if net_d is None else net_d
        restored = restored.detach()
        gt = gt.detach()
        self.opt_d.zero_grad(set_to_none=True)
        if self.gan_type == "ragan":
            # Each side is judged relative to the mean logit of the other side, held constant.
            with torch.no_grad():
                fake_ref = net_d(restored)
            real = net_d(gt)
            loss_real = self._criterion(real - fake_ref.mean(), True, for_discriminator=True) * 0.5
            loss_real.backward()
            fake = net_d(restored)
            loss_fake = self._criterion(fake - real.detach().mean(), False, for_discriminator=True) * 0.5
            loss_fake.backward()
        else:
            real = net_d(gt)
            loss_real = self._criterion(real, True, for_discriminator=True)
            loss_real.backward()
            fake = net_d(restored)
            loss_fake = self._criterion(fake, False, for_discriminator=True)
            loss_fake.backward()
        self.opt_d.step()
        # Detached tensors, not floats: calling .item() here would force a GPU sync every iteration.
        return {
            "D_real": loss_real.detach(),
            "D_fake": loss_fake.detach(),
            "D_out_real": real.detach().float().mean(),
            "D_out_fake": fake.detach().float().mean(),
        }
