"""Independent pure-Python (int) Philox4x32-10 and uniform, the tests' oracle."""

from __future__ import annotations

import struct

M32 = 0xFFFFFFFF


def philox4x32_10(ctr: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    c0, c1, c2, c3 = (x & M32 for x in ctr)
    k0, k1 = (x & M32 for x in key)
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
    return c0, c1, c2, c3


def uniform(seed: int, choice: int, position: int, token: int) -> float:
    """The token's uniform; exact in float32, so struct-packing it below loses nothing."""
    s = seed & 0xFFFFFFFFFFFFFFFF  # the signed seed's two's-complement bits
    x0 = philox4x32_10((token, position, choice, 0), (s & M32, s >> 32))[0]
    return (2 * (x0 >> 9) + 1) * 2.0**-24


def float32_bits(x: float) -> int:
    """The int32 view of float32(x), as torch's .view(torch.int32) gives it."""
    return struct.unpack("<i", struct.pack("<f", x))[0]
