"""Timestep respacing: choose which of the original diffusion steps a sampler visits.

Sampling with fewer steps than training keeps a subset of the original timesteps and rebuilds
the betas from the kept alpha_bars (see `gaussian.create_diffusion`). The subset follows the
IDDPM rules so that "250" and "ddim50" give exactly the steps the reference DiT samples with;
"logsnrN" spaces N steps evenly in log signal-to-noise ratio (the DPM-Solver papers' choice).
"""

import numpy as np

from .schedule import linear_betas, log_snr


def _ddim_steps(num_timesteps: int, desired: int) -> list[int]:
    """Integer stride: the smallest stride whose range(0, T, stride) has exactly `desired` steps.

    When `desired` divides T this is T // desired (ddim50 of 1000 -> stride 20).
    """
    if desired < 1:
        raise ValueError(f"ddim respacing needs at least one step, got ddim{desired}")
    for stride in range(1, num_timesteps + 1):
        steps = range(0, num_timesteps, stride)
        if len(steps) == desired:
            return list(steps)
    raise ValueError(
        f"cannot create exactly {desired} steps with an integer stride over {num_timesteps}"
    )


def _logsnr_steps(num_timesteps: int, desired: int) -> list[int]:
    """`desired` timesteps from 0 to T-1 whose log-SNRs (DiT's linear schedule) are evenly
    spaced, each rounded to the nearest timestep. Where rounding makes two equal (lambda
    falls fastest near t = 0) the later ones move up by one step (and back down from T-1),
    so the count is exact."""
    if not 1 <= desired <= num_timesteps:
        raise ValueError(
            f"logsnr respacing needs 1 to {num_timesteps} steps, got logsnr{desired}"
        )
    lam = log_snr(np.cumprod(1.0 - linear_betas(num_timesteps)))  # decreasing in t
    targets = np.linspace(lam[0], lam[-1], desired)
    times = np.interp(targets, lam[::-1], np.arange(num_timesteps)[::-1].astype(np.float64))
    kept = np.rint(times).astype(int)
    for j in range(1, desired):
        kept[j] = max(kept[j], kept[j - 1] + 1)
    kept[-1] = min(kept[-1], num_timesteps - 1)  # and back down from the end if pushed past
    for j in range(desired - 2, -1, -1):
        kept[j] = min(kept[j], kept[j + 1] - 1)
    return kept.tolist()


def _parse_counts(section_counts: str | list[int]) -> list[int]:
    """Turn "10,20" / "250" / [250] into a list of per-section step counts."""
    if isinstance(section_counts, str):
        parts = [p.strip() for p in section_counts.split(",")]
        try:
            counts = [int(p) for p in parts]
        except ValueError as err:
            raise ValueError(f"bad timestep respacing string {section_counts!r}") from err
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"every respacing section needs >= 1 step, got {section_counts!r}")
    return counts


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> list[int]:
    """Return the sorted original timesteps kept by a respacing spec.

    `section_counts` splits [0, T) into equal sections (the first T % n sections get one extra
    step) and takes the given number of steps from each with a fractional stride, always
    including both ends of the section: "250" of 1000 -> {0, 4, 8, ..., 991, 995, 999}.
    "ddimN" instead uses an integer stride from 0 (ddim50 of 1000 -> {0, 20, ..., 980});
    "logsnrN" takes N steps evenly spaced in log-SNR, both ends included.
    """
    if isinstance(section_counts, str) and section_counts.startswith("logsnr"):
        tail = section_counts[len("logsnr"):]
        if not tail.isdigit():
            raise ValueError(f"bad logsnr respacing string {section_counts!r}")
        return _logsnr_steps(num_timesteps, int(tail))
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        tail = section_counts[len("ddim"):]
        if not tail.isdigit():
            raise ValueError(f"bad ddim respacing string {section_counts!r}")
        return _ddim_steps(num_timesteps, int(tail))

    counts = _parse_counts(section_counts)
    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    kept: set[int] = set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count} steps")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.add(start + round(cur))
            cur += stride
        start += size
    return sorted(kept)
