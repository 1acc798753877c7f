"""Model conventions in one place (k-diffusion `external.py` style).

Samplers work in "k-space": for VP models x = x0 + sigma * eps (the variance-exploding form of the latent, as in
k-diffusion and ComfyUI), for flow models x = (1 - sigma) * x0 + sigma * eps. A parameterization converts between a
network's raw output and the denoised x0, maps sigma to the network's timestep, and says how noise is added. Nothing
else in the samplers knows which kind of model runs.
"""

from __future__ import annotations

import bisect

import torch

from ..errors import InvalidParameterError


def sd_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                      beta_schedule: str = "scaled_linear") -> torch.Tensor:
    """The Stable Diffusion noise schedule (float64, like diffusers computes it before casting)."""
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:
        raise InvalidParameterError(
            f"beta_schedule={beta_schedule!r} is not supported; use 'scaled_linear' or 'linear'")
    return torch.cumprod(1.0 - betas, dim=0)


class VP:
    """Discrete variance-preserving model (SD1.5, SDXL): sigma_t = sqrt((1 - abar_t) / abar_t).

    prediction: "epsilon", "v_prediction" or "sample".
    """

    kind = "vp"

    def __init__(self, alphas_cumprod: torch.Tensor | None = None, prediction: str = "epsilon",
                 consistency_timestep_scaling: float | None = None):
        if prediction not in ("epsilon", "v_prediction", "sample"):
            raise InvalidParameterError(
                f"prediction={prediction!r}; valid: 'epsilon', 'v_prediction', 'sample'")
        acp = sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
        # float64 tables: conversions between spaces must not add rounding of their own
        self.alphas_cumprod = acp.double()
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()   # (T,), increasing in t
        self.log_sigmas = self.sigmas.log()
        self._log_sigma_list = self.log_sigmas.tolist()         # for the scalar search, _sigma_to_t_float
        self.prediction = prediction
        # LCM's boundary condition (Song et al. 2023 consistency models; Luo et al. 2023 eq. 9): x0 is mixed with
        # the input by c_skip / c_out of the scaled timestep. Negligible at t >= 100 but part of the model's output.
        self.consistency_timestep_scaling = consistency_timestep_scaling
        self._boundary_cache = {}

    @property
    def num_train_timesteps(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t) -> torch.Tensor:
        """Sigma at (possibly fractional) timestep t, interpolated in log-sigma like k-diffusion."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(self.sigmas) - 1)
        lo = t.floor().long()
        hi = t.ceil().long()
        w = t - lo
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def sigma_to_t(self, sigma) -> torch.Tensor:
        """Inverse of t_to_sigma (piecewise linear in log-sigma); sigma 0 maps to t 0."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log_sigma = sigma.clamp(min=1e-10).log()
        # the last table entry <= log sigma (the first below the table), one binary search per element
        lo = (torch.searchsorted(self.log_sigmas, log_sigma, right=True) - 1).clamp(0, len(self.log_sigmas) - 2)
        hi = lo + 1
        w = ((self.log_sigmas[lo] - log_sigma) / (self.log_sigmas[lo] - self.log_sigmas[hi])).clamp(0, 1)
        return (1 - w) * lo + w * hi

    def _sigma_to_t_float(self, sigma: float) -> float:
        """sigma_to_t of one python float, bit for bit, in Python: the tensor version launches a dozen kernels
        (~35 µs), too slow per sampling step (LCM's boundary condition). The log still goes through torch, whose log
        can differ from math.log in the last bit."""
        log_sigma = torch.tensor(max(sigma, 1e-10), dtype=torch.float64).log().item()
        table = self._log_sigma_list
        lo = min(max(bisect.bisect_right(table, log_sigma) - 1, 0), len(table) - 2)
        w = min(max((table[lo] - log_sigma) / (table[lo] - table[lo + 1]), 0.0), 1.0)
        return (1 - w) * lo + w * (lo + 1)

    def c_in(self, sigma):
        """Scale from k-space x to the network's input x_t = sqrt(abar) x0 + sqrt(1 - abar) eps."""
        return 1.0 / (sigma**2 + 1.0) ** 0.5

    def noise_scaling(self, sigma, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        if isinstance(sigma, float) and isinstance(x0, torch.Tensor):
            return torch.add(x0, noise, alpha=sigma)        # one kernel: samplers step with float sigmas
        return x0 + noise * sigma

    def renoise(self, x: torch.Tensor, sigma_from, sigma_to, noise: torch.Tensor) -> torch.Tensor:
        """Forward-diffuse a k-space sample from sigma_from up to sigma_to >= sigma_from."""
        if isinstance(sigma_to, float) and isinstance(sigma_from, float):
            return torch.add(x, noise, alpha=(sigma_to**2 - sigma_from**2) ** 0.5)    # one kernel
        return x + noise * (sigma_to**2 - sigma_from**2) ** 0.5

    def eps(self, x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
        """The noise implied by x and its x0 prediction."""
        return (x - denoised) / sigma

    def denoised(self, x: torch.Tensor, sigma, output: torch.Tensor) -> torch.Tensor:
        """x0 from the network output at k-space x (network saw c_in(sigma) * x)."""
        if self.prediction == "epsilon":
            x0 = torch.sub(x, output, alpha=sigma) if isinstance(sigma, float) else x - sigma * output
        elif self.prediction == "v_prediction":
            # k-diffusion VDenoiser with sigma_data = 1
            x0 = x / (sigma**2 + 1) - output * sigma / (sigma**2 + 1) ** 0.5
        else:
            x0 = output
        if self.consistency_timestep_scaling is None:
            return x0
        c_skip, c_out = self._boundary(sigma)
        if isinstance(sigma, float):
            return torch.add(x0 * c_out, x, alpha=c_skip * self.c_in(sigma))
        return c_out * x0 + c_skip * x * self.c_in(sigma)

    def _boundary(self, sigma):
        """LCM's c_skip, c_out at sigma (sigma_data = 0.5), cached per sigma: a table search per step is slow."""
        key = float(sigma) if isinstance(sigma, float) or sigma.numel() == 1 else None
        cached = self._boundary_cache.get(key) if key is not None else None
        if cached is None:
            t = self._sigma_to_t_float(key) if key is not None else self.sigma_to_t(sigma)
            c = t * self.consistency_timestep_scaling
            cached = (0.25 / (c**2 + 0.25), c / (c**2 + 0.25) ** 0.5)
            if key is not None:
                cached = tuple(float(v) for v in cached)
                self._boundary_cache[key] = cached
        return cached


class Flow:
    """Rectified flow (SD3, Flux, InstaFlow): x = (1 - sigma) x0 + sigma eps, network predicts v = eps - x0.

    shift: the SD3 timestep shift, sigma' = shift * sigma / (1 + (shift - 1) * sigma), applied by schedules.
    prediction: "flow" (velocity, the usual) or "sample" (x0-predicting flow models).
    """

    kind = "flow"
    sigma_min = 0.0
    sigma_max = 1.0

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, prediction: str = "flow"):
        if prediction not in ("flow", "sample"):
            raise InvalidParameterError(f"prediction={prediction!r}; valid for flow models: 'flow', 'sample'")
        self.num_train_timesteps = num_train_timesteps
        self.shift = shift
        self.prediction = prediction

    def t_to_sigma(self, t) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float32) / self.num_train_timesteps

    def sigma_to_t(self, sigma) -> torch.Tensor:
        return torch.as_tensor(sigma, dtype=torch.float32) * self.num_train_timesteps

    def c_in(self, sigma):
        return 1.0

    def noise_scaling(self, sigma, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (1 - sigma) * x0 + sigma * noise

    def renoise(self, x: torch.Tensor, sigma_from, sigma_to, noise: torch.Tensor) -> torch.Tensor:
        # keep the x0 coefficient consistent and top up the noise variance to sigma_to**2
        a = (1 - sigma_to) / (1 - sigma_from)
        return a * x + noise * max(sigma_to**2 - (a * sigma_from) ** 2, 0.0) ** 0.5

    def eps(self, x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
        return (x - (1 - sigma) * denoised) / sigma

    def denoised(self, x: torch.Tensor, sigma, output: torch.Tensor) -> torch.Tensor:
        if self.prediction == "sample":
            return output
        if isinstance(sigma, float):
            return torch.sub(x, output, alpha=sigma)            # one kernel: schedulers step with float sigmas
        return x - sigma * output


def shift_sigma(sigma, shift: float):
    """SD3 / Flux resolution shift of a flow sigma."""
    return shift * sigma / (1 + (shift - 1) * sigma)




__all__ = ["VP", "Flow", "sd_alphas_cumprod", "shift_sigma"]
