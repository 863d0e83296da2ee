"""Datasets, degradations and benchmark evaluation for LossAgent's three tasks.

images     reading/saving images, sources (folders, list files, skimage:NAME), shared crop helpers
imresize   MATLAB-compatible bicubic imresize in torch
cisr       bicubic x4 SR training pairs (CISRDataset), sub-image extraction for big sets
risr       GT crops and Real-ESRGAN's second-order degradation (RealESRGANDegradation)
jpeg       batched torch JPEG round trip used by the degradation
air        PromptIR's denoise/derain/dehaze training mixture (AIRDataset), paired-folder layouts
feedback   the fixed, seeded feedback images the agent judges after each stage
benchmark  test-set pairs, PSNR/SSIM (BasicSR conventions), pyiqa metrics, tiled inference
"""
