"""Where components go: a device the user named, checked before any weight is read, or diffusers' `device_map`.

A device that cannot hold weights (``cuda`` on a machine without CUDA, ``cuda:3`` with two GPUs,
``meta``, a misspelled name) is refused here with the devices that exist, instead of failing inside
torch after the first component has loaded.
"""

from __future__ import annotations

from typing import Any

import torch


class DeviceError(ValueError):
    """A device or device map that cannot be used here; the message names the devices there are."""


#: diffusers' strategies that spread a pipeline's components over several GPUs
SPREADING_MAPS = ("balanced", "auto")


def available_devices() -> list[str]:
    """The devices weights can be loaded onto in this process, as torch spells them."""
    devices = ["cpu"]
    devices += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        devices += [f"xpu:{index}" for index in range(torch.xpu.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_device(device: torch.device | str | int | None) -> torch.device:
    """`device` as a `torch.device` that exists here (None: the CPU); `DeviceError` naming the ones that do."""
    if device is None:
        return torch.device("cpu")
    available = ", ".join(available_devices())
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise DeviceError(f"{device!r} is not a device ({error}). Devices here: {available}.") from None
    if parsed.type == "meta":
        raise DeviceError(
            "device 'meta' holds no data, so weights cannot be loaded onto it. To see a pipeline's sizes without "
            f"loading it use pipequant.estimate. Devices here: {available}."
        )
    if parsed.type == "cpu":
        return parsed
    count = _device_count(parsed.type)
    if count == 0:
        raise DeviceError(
            f"device {str(device)!r}: this machine has no {parsed.type} device. Devices here: {available}."
        )
    if parsed.index is not None and parsed.index >= count:
        raise DeviceError(
            f"device {str(device)!r}: there are {count} {parsed.type} device(s), numbered from 0. Devices here: "
            f"{available}."
        )
    return parsed


def _device_count(device_type: str) -> int:
    if device_type == "cuda":
        return torch.cuda.device_count()
    if device_type == "mps":
        return int(torch.backends.mps.is_available())
    module = getattr(torch, device_type, None)
    count = getattr(module, "device_count", None)
    return int(count()) if callable(count) and getattr(module, "is_available", lambda: False)() else 0


def device_from_map(device_map: Any, device: torch.device | str | None) -> torch.device | str:
    """One device for the whole pipeline, from diffusers' `device_map` (a device, or ``{"": device}``) or
    `device`; or "balanced" to spread components over the visible GPUs (``"balanced"`` / ``"auto"``)."""
    if device_map is None:
        return check_device(device)
    if device is not None:
        raise TypeError("Give device or device_map, not both.")
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise DeviceError(
                f"device_map={device_map!r} places parts of models; pipequant places whole components. Give one device "
                "({'': 'cuda:0'} or 'cuda:0') or 'balanced' to spread components over several GPUs."
            )
        return check_device(device_map[""])
    if device_map in SPREADING_MAPS:
        gpus = torch.cuda.device_count()
        if gpus < 2:
            raise DeviceError(
                f"device_map={device_map!r} spreads components over several GPUs, and this machine has {gpus}. "
                f"Give one device instead (device_map='cuda' or device='cuda'). Devices here: "
                f"{', '.join(available_devices())}."
            )
        return "balanced"
    return check_device(device_map)


def roomiest_gpu() -> torch.device:
    """The visible GPU with the most free memory now: where "balanced" puts the next component.

    Placing each component as it comes, where the most room is left, balances by what components
    really take once quantized, which no estimate from full-precision files gives.
    """
    free = [torch.cuda.mem_get_info(index)[0] for index in range(torch.cuda.device_count())]
    return torch.device("cuda", free.index(max(free)))
