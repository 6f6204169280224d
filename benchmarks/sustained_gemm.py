"""Does a GEMM slow down when the GPU runs it for a long time? (issue 15: large prefill steps run 6-9% longer
than the operator profile's short bursts predict).

Runs each GEMM shape back to back for --seconds, timing every call with CUDA events, and reads the SM clock and
power (NVML) once a window; prints per window the mean call time relative to the first window's.

    python3 benchmarks/sustained_gemm.py [--seconds 3] [--out sustained.json]
"""

import argparse
import json
import time

import torch

# (tokens, N, K): the largest prefill GEMMs of Qwen3-32B (gate_up, down) and Qwen3-8B (gate_up) at 8192 tokens.
SHAPES = [(8192, 51200, 5120), (8192, 5120, 25600), (8192, 24576, 4096)]


def sm_clock_and_power() -> tuple[float, float]:
    """The SM clock (MHz) and board power (W) of device 0, or NaN where NVML is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        clock = pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
        power = pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3
        return float(clock), float(power)
    except Exception:  # noqa: BLE001 - a reading, never a reason to stop the timing
        return float("nan"), float("nan")


def sustained(shape: tuple[int, int, int], seconds: float, window: float) -> list[dict]:
    """Per window of about `window` seconds: mean seconds a call, the SM clock and power at its end."""
    m, n, k = shape
    a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(k, n, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    torch.matmul(a, b, out=out)
    torch.cuda.synchronize()
    time.sleep(2.0)  # let the card cool to where a profile's short burst would find it
    windows, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        events[0].record()
        calls, window_start = 0, time.perf_counter()
        while calls < 2 or time.perf_counter() - window_start < window:
            torch.matmul(a, b, out=out)
            calls += 1
            if calls % 4 == 0:
                torch.cuda.synchronize()
        events[1].record()
        events[1].synchronize()
        clock, power = sm_clock_and_power()
        windows.append({"elapsed_s": time.perf_counter() - start, "calls": calls,
                        "seconds_per_call": events[0].elapsed_time(events[1]) / 1e3 / calls,
                        "sm_clock_mhz": clock, "power_w": power})
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--window", type=float, default=0.05)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {}
    for shape in SHAPES:
        windows = sustained(shape, args.seconds, args.window)
        results["x".join(map(str, shape))] = windows
        first = windows[0]["seconds_per_call"]
        flops = 2 * shape[0] * shape[1] * shape[2]
        print(f"{shape}: first window {first * 1e3:.3f} ms ({flops / first / 1e12:.0f} TFLOP/s)")
        for w in windows[:: max(1, len(windows) // 8)] + windows[-1:]:
            print(f"  t={w['elapsed_s']:5.2f}s  {w['seconds_per_call'] / first:6.3f}x  "
                  f"sm {w['sm_clock_mhz']:.0f} MHz  {w['power_w']:.0f} W")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
