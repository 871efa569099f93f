"""The machine a benchmark ran on, for the header of its figures (which depend on it)."""

from __future__ import annotations

import platform
import subprocess


def cpu_model(flags: tuple[str, ...] = ()) -> str:
    """The CPU's model name and count, and whether it has each of ``flags`` (e.g. the bf16 matmul
    units that decide bf16 speed)."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):   # not Linux
        return platform.processor() or platform.machine()
    fields = {key.strip(): value.strip() for key, value in
              (line.split(":", 1) for line in lscpu.splitlines() if ":" in line)}
    described = f"{fields.get('Model name', '?')}, {fields.get('CPU(s)', '?')} CPU(s)"
    present = set(fields.get("Flags", "").split())
    units = ", ".join(f"{flag} {'yes' if flag in present else 'no'}" for flag in flags)
    return f"{described} ({units})" if flags else described
