"""Argument types shared by the command-line tools."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30}  # fmt: skip


def parse_bytes(text: str) -> int:
    """``256MB`` -> 256000000, ``1GiB`` -> 1073741824, ``500000`` -> 500000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match[2].lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 256MB, 1GiB or 500000")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def at_least(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number no smaller than ``least`` (``--workers 0`` with
    ``at_least(1)``: ``argument --workers: 0: at least 1``). The one check of every count a
    command takes, made as the command line is read, before any work."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value}: at least {least}")
        return value

    return parse


def parse_list(text: str) -> tuple[str, ...]:
    """``a,b,,c`` -> (``a``, ``b``, ``c``)."""
    return tuple(item for item in text.split(",") if item)


class Size(NamedTuple):
    """An image size as arrays, configs (``data.size: [H, W]``) and functions hold it:
    (height, width). Only the command line writes it the other way round, ``WIDTHxHEIGHT``:
    :func:`parse_size` and :func:`format_size` are the one place that turns it around."""

    height: int
    width: int


def parse_size(text: str) -> Size:
    """``2048x1024`` (WIDTHxHEIGHT) -> Size(height=1024, width=2048)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 2048x1024") from None
    if width < 32 or height < 16:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 32x16")
    return Size(height, width)


def format_size(size: Sequence[int]) -> str:
    """(H, W) (a Size, a tuple, a config's ``[H, W]``) as the command line writes it: ``WIDTHxHEIGHT``."""
    height, width = size
    return f"{width}x{height}"


def orientation(size: Sequence[int]) -> str:
    """(H, W) as ``landscape`` (wider than high), ``portrait`` or ``square``."""
    height, width = size
    return "landscape" if width > height else "portrait" if height > width else "square"


def orientation_mismatch(option: str, size: Sequence[int], reference: Sequence[int], what: str) -> str | None:
    """None when ``size`` (H, W, given as ``option``) lies the way ``reference`` (H, W, described
    by ``what``: ``the frames``, ``the model's training size (data.size)``) does, or either is
    square; else one line naming the likely swap: ``--resize 64x128 is WIDTHxHEIGHT: 64 wide,
    128 high, portrait, but the frames are 2048x1024, landscape; did you mean 128x64?``.
    The one check of a size's orientation every tool makes (sizes are easily typed (H, W)
    on a command line that takes WIDTHxHEIGHT)."""
    mine, theirs = orientation(size), orientation(reference)
    if "square" in (mine, theirs) or mine == theirs:
        return None
    height, width = size
    noun = re.sub(r"\s*\(.*\)$", "", what)  # ``the train frames (e.g. x.png)``: frames, plural
    return (
        f"{option} {format_size(size)} is WIDTHxHEIGHT: {width} wide, {height} high, {mine}, but {what} "
        f"{'are' if noun.endswith('s') else 'is'} {format_size(reference)}, {theirs}; did you mean "
        f"{format_size((width, height))}?"
    )
