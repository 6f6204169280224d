"""GPU prices: the default $ per GPU-hour, --price parsing and the lookup by GPU name."""

from __future__ import annotations

import math

from simulator.gpu_specs import gpu_key

DEFAULT_PRICES = {"h100": 3.00, "h200": 4.00}
"""On-demand $ per GPU-hour used when --price does not name a GPU: the middle of the specialty-cloud
(CoreWeave, Lambda, Crusoe, RunPod) on-demand ranges published in 2026: H100 SXM $2.49-3.99 / $2.50-3.50,
H200 SXM $3.50-4.50 (pricegpu.pages.dev/blog/h100-vs-a100-cloud-price, early 2026;
www.mercatus-ai.com/blog/cloud-gpu-pricing, May 2026). Hyperscalers list more; other GPUs need --price."""


def parse_prices(text: str | None) -> dict[str, float]:
    """'h100=2.5,h200=3.5' -> {gpu: $ per GPU-hour}, over the documented defaults."""
    prices = dict(DEFAULT_PRICES)
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        gpu, sep, value = item.partition("=")
        try:
            price = float(value)
            if not sep or not math.isfinite(price) or price < 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"--price item {item!r} is not GPU=DOLLARS_PER_GPU_HOUR (e.g. h100=2.5)") from None
        prices[gpu_key(gpu)] = price
    return prices


def price_of(prices: dict[str, float], gpu: str) -> float | None:
    """The $ per GPU-hour of `gpu` (any spelling gpu_key accepts), or None when not priced."""
    return prices.get(gpu_key(gpu))
