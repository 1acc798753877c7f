"""Editing operators (issue 15), pure torch: inversion, prompt-tuning inversion, DiffEdit masks and mask-guided
edits, inpainting blends, restoration by data consistency (DDS), FilterPrompt filters. Samplers here are ask/tell
generators like core.sampling's."""

from .diffedit import (draw_noises, edit_map, edit_mask, mask_sigma, sample_masked_edit, smooth_map, threshold_map,
                       trajectory_path)
from .filters import FILTERS, apply_filter
from .inpaint import check_mask, differential_masks, sample_inpaint
from .inversion import check_model_kind, invert, latent_psnr, reconstruct, truncate
from .operators import OPERATORS, Blur, Downsample, Mask, conjugate_gradient, data_consistency
from .pti import interpolate, run_per_step, sample_per_step, tune_prompt
from .restore import sample_dds, sample_replace

__all__ = ["draw_noises", "edit_map", "edit_mask", "mask_sigma", "sample_masked_edit", "smooth_map", "threshold_map",
           "trajectory_path", "FILTERS",
           "apply_filter", "check_mask", "differential_masks", "sample_inpaint", "check_model_kind",
           "invert", "latent_psnr", "reconstruct", "truncate", "OPERATORS", "Blur", "Downsample", "Mask",
           "conjugate_gradient", "data_consistency", "interpolate", "run_per_step", "sample_per_step",
           "tune_prompt", "sample_dds", "sample_replace"]
