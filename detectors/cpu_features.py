"""Which ONNX variant (fp32 or dynamically quantized int8) of a model to run on this CPU.

ONNX Runtime's int8 MatMul is only faster than fp32 where the CPU has 8-bit dot-product
instructions (VNNI: ``avx512_vnni``, ``avx_vnni``, or AMX ``amx_int8``); on AVX2-only CPUs the
int8 model was measured slower than fp32 (10.8 vs 10.0 ms per prompt, issue 16). ``auto``
therefore picks int8 only on such CPUs and only when an int8 file exists.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Literal

__all__ = ["VNNI_FLAGS", "Variant", "cpu_flags", "has_int8_dot_product", "choose_variant"]

#: /proc/cpuinfo flags of CPUs on which int8 matrix products beat fp32 ones.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})

Variant = Literal["auto", "fp32", "int8"]


@functools.lru_cache(maxsize=4)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (x86 ``flags`` line; empty where there is no /proc/cpuinfo)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def has_int8_dot_product(flags: Iterable[str] | None = None) -> bool:
    return bool(VNNI_FLAGS & frozenset(cpu_flags() if flags is None else flags))


def choose_variant(variant: Variant, int8_available: bool,
                   flags: Iterable[str] | None = None) -> Literal["fp32", "int8"]:
    """``auto`` -> int8 when the file exists and the CPU has VNNI, else fp32; an explicit
    choice is returned as is (the caller reports a missing file)."""
    if variant == "auto":
        return "int8" if int8_available and has_int8_dot_product(flags) else "fp32"
    if variant not in ("fp32", "int8"):
        raise ValueError(f"variant must be auto, fp32 or int8, not {variant!r}")
    return variant
