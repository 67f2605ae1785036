"""One decision, shared by every stage, of whether to compute in bf16: the `--bf16 auto|true|false` flag.

`auto` (the default of evaluation, encoding, mining, fine-tuning and pre-training) picks bf16 only where the device
runs bf16 matrix products natively and faster than fp32:
- a CUDA device that supports bf16 (`torch.cuda.is_bf16_supported()`);
- a CPU that reports one of `CPU_BF16_FLAGS` in /proc/cpuinfo.
Elsewhere bf16 is emulated and slower than fp32, so `auto` means fp32. `true` / `false` force the choice (a bare
`--bf16` is `true`); forcing bf16 without native support logs a warning. Each stage logs the choice and the reason.

Whether `avx512_bf16` without AMX counts was measured (`benchmarks/bf16_cpu.py --force`, a 2-core AMD EPYC with
avx512_bf16 and no AMX, shared with other jobs; medians of 3 alternating rounds, bf16 / fp32): SciFact encoding
1.72x per CPU second at 1 thread and 1.75x at 2 (nDCG@10 +0.0005), the MiniLM pre-training step (seq 128, batch
16, ZeRO-2) 1.43x per CPU second at 1 thread and even at 2 (1.02x wall, 1.00x per CPU second). bf16 was not
slower, so it counts, as the issue asks; the AMX figures are benchmarks/bf16_cpu.py's to fill.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

import torch

#: CPU flags (as /proc/cpuinfo spells them) under which `--bf16 auto` chooses bf16.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
#: The values `--bf16` accepts, and what each means.
SETTINGS = {"auto": None, "true": True, "false": False}
_SPELLINGS = {"auto": "auto", "true": "true", "yes": "true", "1": "true", "t": "true", "y": "true",
              "false": "false", "no": "false", "0": "false", "f": "false", "n": "false"}


def bf16_field(help: str = "bf16 compute: auto (bf16 where the device has native bf16, else fp32), true, false"):
    """A `--bf16` dataclass field for HfArgumentParser: default "auto", a bare `--bf16` means "true"; normalize
    the value with `parse_bf16` in `__post_init__` (YAML/JSON configs may give a bool)."""
    return field(default="auto", metadata={"help": help, "nargs": "?", "const": "true"})


def parse_bf16(value) -> str:
    """"auto", "true" or "false" from a flag string (any case; yes/no/1/0 too), a bool or None (= auto)."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "true" if value else "false"
    spelled = _SPELLINGS.get(str(value).strip().lower())
    if spelled is None:
        raise ValueError(f"--bf16 must be auto, true or false, got {value!r}")
    return spelled


@dataclass(frozen=True)
class Bf16Choice:
    """The outcome of `--bf16`: whether to compute in bf16, and why (one phrase for the log)."""

    enabled: bool
    reason: str
    emulated: bool = False  # bf16 forced on a device without native bf16 (logged as a warning)

    @property
    def name(self) -> str:
        return "bf16" if self.enabled else "fp32"

    def log(self, logger: logging.Logger, stage: str) -> None:
        logger.log(logging.WARNING if self.emulated else logging.INFO, "%s precision: %s (%s)", stage, self.name,
                   self.reason)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (the first `flags` line of /proc/cpuinfo); empty where there is none."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device | str, flags: Iterable[str] | None = None) -> tuple[bool, str]:
    """(whether bf16 runs natively and fast on `device` per the rules above, the reason)."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return True, f"CUDA device {torch.cuda.get_device_name(device)} supports bf16"
        return False, "the CUDA device does not support bf16"
    if device.type != "cpu":
        return False, f"no bf16 rule for device type {device.type}"
    flags = cpu_flags() if flags is None else set(flags)
    found = [flag for flag in CPU_BF16_FLAGS if flag in flags]
    if found:
        return True, f"the CPU reports {found[0]}"
    return False, "the CPU reports neither amx_bf16 nor avx512_bf16 (bf16 would be emulated, slower than fp32)"


def decide_bf16(setting, device: torch.device | str = "cpu", flags: Iterable[str] | None = None) -> Bf16Choice:
    """The `--bf16` setting (auto/true/false, see `parse_bf16`) resolved for `device`."""
    setting = parse_bf16(setting)
    native, why = native_bf16(device, flags)
    if setting == "auto":
        return Bf16Choice(native, f"--bf16 auto: {why}")
    if setting == "true" and not native:
        return Bf16Choice(True, f"--bf16 true, although {why}: expect it slower than fp32", emulated=True)
    return Bf16Choice(SETTINGS[setting], f"--bf16 {setting}")


def training_device() -> torch.device:
    """The device a DeepSpeed stage trains on (its accelerator: cuda, or cpu under DS_ACCELERATOR=cpu)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name())


def decide_deepspeed_bf16(config: dict, setting, source: str, device: torch.device | str | None = None) -> Bf16Choice:
    """Fill `config["bf16"]["enabled"]` (a DeepSpeed JSON) from `--bf16` and return the choice.

    An explicit true/false in the JSON is kept (`source` names the JSON in messages; ds_configs/zero2_cpu.json is the
    explicit fp32 one) and a forced flag that contradicts it is a ValueError; "auto" or an absent section follows
    `decide_bf16`. With fp16 enabled, `auto` means no bf16."""
    setting = parse_bf16(setting)
    section = config.setdefault("bf16", {})
    given = section.get("enabled", "auto")
    fp16 = config.get("fp16", {}).get("enabled") is True
    if given != "auto":
        if not isinstance(given, bool):
            raise ValueError(f"{source}: bf16.enabled must be true, false or \"auto\", got {given!r}")
        if setting != "auto" and SETTINGS[setting] != given:
            raise ValueError(f"{source}: bf16.enabled is {str(given).lower()} but --bf16 {setting} was given")
        choice = Bf16Choice(given, f"{source} sets bf16.enabled {str(given).lower()}")
    elif fp16 and setting != "true":
        choice = Bf16Choice(False, f"{source} enables fp16")
    else:
        choice = decide_bf16(setting, training_device() if device is None else device)
    section["enabled"] = choice.enabled
    return choice
