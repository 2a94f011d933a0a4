"""Block-wise integer compression of an fp32 vector, in plain PyTorch (any backend, CPU
included): what a DiLoCo group sends of its outer gradient.

A vector is cut into blocks of `BLOCK` values. Each block sends one fp32 scale (its largest
magnitude over the largest code) and one signed integer code per value, rounded to the
nearest level:

    int8   codes -127..127, one byte each
    int4   codes -7..7, two per byte
    int2   codes -1..1 (ternary), four per byte
    none   the fp32 values themselves

Decoding multiplies code by scale in fp32. The wire form is a flat uint8 tensor (scales,
then codes), so that every group can send it through the same all-gather and decode every
peer's copy the same way. `ErrorFeedback` keeps what compression lost and adds it to the
next round's vector (Seide et al. 2014; Karimireddy et al. 2019), so that the loss does
not accumulate as a bias.

`wire_bytes` is the size of the wire form. torch is imported inside the functions that
need it: config.py takes `COMPRESSIONS` from here, and the planner's CLI reads the config
without torch.
"""

from __future__ import annotations

import math

COMPRESSIONS = ("none", "int8", "int4", "int2")
BITS = {"none": 32, "int8": 8, "int4": 4, "int2": 2}
BLOCK = 256  # values per scale: 4 bytes of scale per 256 values (1/64 byte a value)


def wire_bytes(numel: int, compression: str) -> int:
    """Bytes of the wire form of `numel` values."""
    if compression == "none":
        return 4 * numel
    blocks = math.ceil(numel / BLOCK)
    per_byte = 8 // BITS[compression]
    return 4 * blocks + math.ceil(blocks * BLOCK / per_byte)


def _qmax(compression: str) -> int:
    return (1 << (BITS[compression] - 1)) - 1  # symmetric: 127, 7, 1


def encode(values, compression: str):
    """The wire form (uint8) of a 1-D fp32 tensor."""
    import torch

    values = values.detach().reshape(-1).float()
    if compression == "none":
        return values.clone().view(torch.uint8)
    numel, qmax, bits = values.numel(), _qmax(compression), BITS[compression]
    blocks = math.ceil(numel / BLOCK)
    padded = torch.zeros(blocks * BLOCK, dtype=torch.float32, device=values.device)
    padded[:numel] = values
    padded = padded.view(blocks, BLOCK)
    scales = padded.abs().amax(dim=1) / qmax
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.clamp(torch.round(padded / safe[:, None]), -qmax, qmax).to(torch.int16) + qmax  # 0..2 qmax
    codes = codes.to(torch.uint8).view(-1)
    per_byte = 8 // bits
    if per_byte > 1:
        codes = codes.view(-1, per_byte)
        packed = torch.zeros(codes.shape[0], dtype=torch.uint8, device=values.device)
        for i in range(per_byte):
            packed |= codes[:, i] << (i * bits)
        codes = packed
    return torch.cat([scales.contiguous().view(torch.uint8), codes])


def chunk_ranges(numel: int, parts: int) -> list[tuple[int, int]]:
    """`parts` ranges of values that cover 0..numel, cut at block boundaries and as even as
    the blocks allow: the wire form of each range is a slice of the whole one."""
    blocks = math.ceil(numel / BLOCK)
    cuts = [min(k * blocks // parts * BLOCK, numel) for k in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def wire_slice(wire, numel: int, compression: str, lo: int, hi: int):
    """The wire form of values lo..hi (a range of `chunk_ranges`) cut from the wire form of
    all `numel`: decoding it gives exactly those values of the whole one's decoding."""
    import torch

    if compression == "none":
        return wire[4 * lo:4 * hi]
    blocks, first, last = math.ceil(numel / BLOCK), lo // BLOCK, math.ceil(hi / BLOCK)
    per_block = BLOCK * BITS[compression] // 8  # code bytes of one block
    codes = wire[4 * blocks:]
    return torch.cat([wire[4 * first:4 * last], codes[first * per_block:last * per_block]])


def exchange_sent(numel: int, compression: str, participants: int) -> int:
    """The bytes one participant sends in an outer exchange of `numel` values (headers
    aside). Two participants or fewer: a ring all-gather of every payload, (participants - 1)
    payloads. More: a reduce-scatter (participant k receives range k of every payload and
    reduces it) then a ring all-gather of the reduced ranges, compressed the same way: about
    2 (participants - 1) / participants payloads, as a ring all-reduce. training/outer.py counts
    its exchanges with it (for participant 0), and the planner models them with it."""
    if participants <= 2:
        return (participants - 1) * wire_bytes(numel, compression)
    sizes = [wire_bytes(hi - lo, compression) for lo, hi in chunk_ranges(numel, participants)]
    return sum(sizes[1:]) + (participants - 1) * max(sizes)


def decode(wire, numel: int, compression: str):
    """The fp32 values of a wire form (what every group decodes from the same bytes)."""
    import torch

    if compression == "none":
        return wire.view(torch.float32)[:numel].clone()
    qmax, bits = _qmax(compression), BITS[compression]
    blocks = math.ceil(numel / BLOCK)
    scales = wire[:4 * blocks].view(torch.float32)
    codes = wire[4 * blocks:]
    per_byte = 8 // bits
    if per_byte > 1:
        mask = (1 << bits) - 1
        codes = torch.stack([(codes >> (i * bits)) & mask for i in range(per_byte)], dim=1).view(-1)
    levels = codes.to(torch.float32).view(blocks, BLOCK) - qmax
    return (levels * scales[:, None]).view(-1)[:numel]


class ErrorFeedback:
    """The residual of the last rounds' compression, added to the next vector."""

    def __init__(self) -> None:
        self.residual = None

    def encode(self, values, compression: str):
        target = values if self.residual is None else values + self.residual
        wire = encode(target, compression)
        self.residual = target - decode(wire, target.numel(), compression)
        return wire

    def state_dict(self) -> dict:
        return {} if self.residual is None else {"residual": self.residual}

    def load_state_dict(self, state: dict) -> None:
        self.residual = state.get("residual")
