"""A synthetic Cityscapes: procedural street scenes written in the official layout.

Each scene is painted back to front on a canvas of label ids (sky, buildings, vegetation,
the ground plane with road and sidewalk, then walls, fences, poles with lights and signs,
then vehicles and people, then the ignore regions of a real frame: ego vehicle, out of
ROI, rectification border). The image is rendered from the labels: a colour per label id,
a texture per class (window grids, stripes, blotches), the scene's lighting and sensor
noise, so that a small model can learn the classes and the PNGs are as heavy as real ones.
Every image is a pure function of (seed, split, city, sequence number).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from seg.core import cityscapes as cs
from seg.core import parallel
from seg.core.atomic import leased_atomic_directory
from seg.core.cli import Size

CITYSCAPES_SIZE = Size(1024, 2048)  # the real frames' size

# The cities of the real splits, so that synthetic trees look like real ones.
CITIES = {
    "train": (
        "aachen", "bochum", "bremen", "cologne", "darmstadt", "dusseldorf", "erfurt", "hamburg",
        "hanover", "jena", "krefeld", "monchengladbach", "strasbourg", "stuttgart", "tubingen",
        "ulm", "weimar", "zurich",
    ),
    "val": ("frankfurt", "lindau", "munster"),
    "test": ("berlin", "bielefeld", "bonn", "leverkusen", "mainz", "munich"),
}  # fmt: skip
FRAME = 19  # real Cityscapes annotates the 20th frame of each snippet

_ID = {label.name: label.id for label in cs.LABELS}

# Texture kinds: 0 smooth, 1 horizontal stripes, 2 vertical stripes, 3 window grid, 4 blotches.
_TEXTURE = {
    "road": (1, 10), "sidewalk": (3, 14), "building": (3, 38), "wall": (1, 22), "fence": (2, 45),
    "pole": (2, 12), "traffic light": (0, 10), "traffic sign": (0, 8), "vegetation": (4, 45),
    "terrain": (4, 25), "sky": (0, 4), "person": (4, 30), "rider": (1, 30), "car": (1, 20),
    "truck": (2, 24), "bus": (3, 30), "train": (2, 30), "motorcycle": (3, 24), "bicycle": (2, 35),
}  # fmt: skip


def _appearance() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label id: base colour (256, 3), texture kind (256,), texture amplitude (256,)."""
    rng = np.random.default_rng(1234)
    colour = rng.integers(30, 200, size=(256, 3)).astype(np.float32)
    kind = np.zeros(256, dtype=np.int64)
    amplitude = np.full(256, 12.0, dtype=np.float32)
    for label in cs.LABELS:
        if label.id < 0:
            continue
        if label.color != (0, 0, 0):
            colour[label.id] = label.color
        if label.name in _TEXTURE:
            kind[label.id], amplitude[label.id] = _TEXTURE[label.name]
    colour[_ID["ego vehicle"]] = (40, 42, 48)
    colour[_ID["out of roi"]] = (12, 12, 12)
    colour[_ID["rectification border"]] = (0, 0, 0)
    # Keep the palette's order but pull it off the extremes, so that lighting stays visible.
    return 0.8 * colour + 25.0, kind, amplitude


_COLOUR, _KIND, _AMPLITUDE = _appearance()


@dataclass(frozen=True)
class Frame:
    split: str
    city: str
    seq: int

    @property
    def stem(self) -> str:
        return f"{self.city}_{self.seq:06d}_{FRAME:06d}"


def paint_labels(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A random street scene as an (H, W) uint8 array of Cityscapes label ids."""
    canvas = Image.new("L", (width, height), _ID["sky"])
    draw = ImageDraw.Draw(canvas)
    w, h = width, height

    def box(label: str, x0: float, y0: float, x1: float, y1: float) -> None:
        # At least one pixel wide and tall, so thin things survive tiny resolutions.
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))
        draw.rectangle((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)), fill=_ID[label])

    def ellipse(label: str, x0: float, y0: float, x1: float, y1: float) -> None:
        draw.ellipse((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)), fill=_ID[label])

    horizon = h * rng.uniform(0.36, 0.48)
    ground = horizon + 0.04 * h
    vanish = w * rng.uniform(0.4, 0.6)

    # Skyline: buildings with gaps of sky, a wall or a bridge here and there.
    x = -rng.uniform(0, 0.1) * w
    while x < w:
        bw = rng.uniform(0.06, 0.2) * w
        if rng.random() < 0.85:
            top = horizon - rng.uniform(0.08, 0.34) * h
            box("building", x, top, x + bw, ground)
        x += bw + (rng.uniform(0, 0.04) * w if rng.random() < 0.3 else 0)
    if rng.random() < 0.15:
        y = horizon - rng.uniform(0.12, 0.2) * h
        box("bridge", 0, y, w, y + 0.04 * h)
    for _ in range(rng.integers(2, 6)):  # trees crossing the skyline
        cx, r = rng.uniform(0, w), rng.uniform(0.04, 0.12) * w
        ellipse("vegetation", cx - r, horizon - 1.4 * r, cx + r, ground)

    # Ground plane: sidewalk everywhere, terrain at the edges, the road in perspective.
    box("sidewalk", 0, ground, w, h)
    if rng.random() < 0.8:
        box("terrain", 0, ground, rng.uniform(0.05, 0.2) * w, h)
    if rng.random() < 0.5:
        box("terrain", w - rng.uniform(0.05, 0.2) * w, ground, w, h)
    spread = rng.uniform(0.02, 0.08) * w
    left, right = rng.uniform(-0.2, 0.2) * w, w + rng.uniform(-0.2, 0.2) * w
    draw.polygon([(vanish - spread, ground), (vanish + spread, ground), (right, h), (left, h)], fill=_ID["road"])
    for name, p in (("parking", 0.4), ("ground", 0.3), ("rail track", 0.15)):
        if rng.random() < p:
            y = rng.uniform(ground + 0.05 * h, h)
            x = rng.uniform(0, w)
            box(name, x, y, x + rng.uniform(0.05, 0.15) * w, y + rng.uniform(0.02, 0.06) * h)

    def depth_scale(y: float) -> float:
        return max((y - horizon) / (h - horizon), 0.05)  # 0 at the horizon, 1 at the bottom

    # Street furniture along the sidewalk's back edge.
    for name in ("wall", "fence", "guard rail"):
        if rng.random() < (0.9 if name != "guard rail" else 0.2):
            x = rng.uniform(0, 0.8 * w)
            box(name, x, ground - rng.uniform(0.03, 0.08) * h, x + rng.uniform(0.1, 0.3) * w, ground + 0.02 * h)
    for _ in range(rng.integers(2, 6)):
        foot = rng.uniform(ground + 0.02 * h, h * 0.9)
        s = depth_scale(foot)
        x, pw, ph = rng.uniform(0, w), max(0.006 * w * s, 1), 0.5 * h * s + 0.05 * h
        box("polegroup" if rng.random() < 0.1 else "pole", x, foot - ph, x + pw, foot)
        if rng.random() < 0.6:
            box("traffic light", x - pw, foot - ph, x + 2 * pw, foot - ph + 0.06 * h * s + 2)
        if rng.random() < 0.7:
            y = foot - 0.7 * ph
            ellipse("traffic sign", x - 3 * pw, y, x + 4 * pw, y + 7 * pw)

    # Vehicles on the road, people on the sidewalk, far to near so nearer ones occlude.
    objects = []
    for name, p, (ow, oh) in (
        ("car", 1.0, (0.16, 0.1)), ("car", 0.8, (0.16, 0.1)), ("truck", 0.4, (0.2, 0.18)),
        ("bus", 0.35, (0.26, 0.2)), ("train", 0.2, (0.5, 0.18)), ("caravan", 0.1, (0.2, 0.14)),
        ("trailer", 0.1, (0.2, 0.1)), ("motorcycle", 0.5, (0.05, 0.06)), ("bicycle", 0.6, (0.05, 0.06)),
        ("person", 1.0, (0.02, 0.14)), ("person", 0.7, (0.02, 0.14)), ("dynamic", 0.3, (0.03, 0.04)),
        ("static", 0.3, (0.04, 0.05)),
    ):  # fmt: skip
        if rng.random() < p:
            objects.append((rng.uniform(ground + 0.02 * h, h * 0.95), name, ow, oh))
    for foot, name, ow, oh in sorted(objects):
        s = depth_scale(foot)
        ow, oh = ow * w * s * rng.uniform(0.8, 1.2), oh * h * s * 2 * rng.uniform(0.8, 1.2)
        x = rng.uniform(-0.5 * ow, w - 0.5 * ow)
        if name == "person":
            ellipse("person", x, foot - oh, x + ow, foot - 0.75 * oh)  # head
            box("person", x, foot - 0.8 * oh, x + ow, foot)
        elif name in ("motorcycle", "bicycle"):
            box(name, x, foot - oh, x + ow, foot)
            if rng.random() < 0.8:
                box("rider", x + 0.2 * ow, foot - 2.4 * oh, x + 0.8 * ow, foot - 0.7 * oh)
        else:
            box(name, x, foot - oh, x + ow, foot)

    # What a real Cityscapes frame has at its borders: all ignored in evaluation.
    ego_top = h * rng.uniform(0.9, 0.95)
    ellipse("ego vehicle", -0.2 * w, ego_top, 1.2 * w, h + (h - ego_top))
    border = max(1, round(0.004 * w))
    for rect in ((0, 0, w, border), (0, 0, border, h), (w - border, 0, w, h), (0, h - border, w, h)):
        draw.rectangle(rect, fill=_ID["out of roi"])
    corner = 0.05 * w
    draw.polygon([(0, h), (corner, h), (0, h - corner / 2)], fill=_ID["rectification border"])
    draw.polygon([(w, h), (w - corner, h), (w, h - corner / 2)], fill=_ID["rectification border"])
    return np.asarray(canvas)


def render_image(rng: np.random.Generator, ids: np.ndarray) -> np.ndarray:
    """Render (H, W) label ids into an (H, W, 3) uint8 photo-like image."""
    h, w = ids.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = max(w / 96.0, 3.0)
    small = rng.standard_normal((max(h // 32, 2), max(w // 32, 2))).astype(np.float32)
    blotches = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    patterns = np.stack(
        [
            np.zeros((h, w), np.float32),
            np.sin(yy * (2 * np.pi / period)),
            np.sin(xx * (2 * np.pi / period)),
            ((np.sin(xx * (2 * np.pi / (2 * period))) > 0.3) & (np.sin(yy * (2 * np.pi / (2 * period))) > 0.3)) * 2.0
            - 1.0,
            blotches,
        ]
    )
    texture = np.take_along_axis(patterns, _KIND[ids][None], axis=0)[0] * _AMPLITUDE[ids]
    light = rng.uniform(0.75, 1.15) * (1.0 + 0.15 * (yy / h - 0.5))  # exposure and vignette-ish falloff
    image = _COLOUR[ids] * light[..., None] + texture[..., None]
    image += rng.normal(0.0, 3.0, size=image.shape).astype(np.float32)  # sensor noise
    return np.clip(image, 0, 255).astype(np.uint8)


def png_bytes(array: np.ndarray, compress_level: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def frame_rng(seed: int, frame: Frame) -> np.random.Generator:
    split_index = cs.SPLITS.index(frame.split)
    city_index = CITIES[frame.split].index(frame.city)
    return np.random.default_rng([seed, split_index, city_index, frame.seq])


def write_frame(root: Path, frame: Frame, width: int, height: int, seed: int, train_ids: bool) -> None:
    """Write one frame's image and gtFine files under ``root``."""
    rng = frame_rng(seed, frame)
    ids = paint_labels(rng, width, height)
    image = render_image(rng, ids)
    colour = np.zeros((256, 4), dtype=np.uint8)
    for label in cs.LABELS:
        if label.id >= 0:
            colour[label.id] = (*label.color, 255)
    files = {
        cs.image_path(frame.split, frame.city, frame.seq, FRAME): png_bytes(image),
        cs.label_path(frame.split, frame.city, frame.seq, FRAME): png_bytes(ids),
        cs.label_path(frame.split, frame.city, frame.seq, FRAME, cs.COLOR_SUFFIX): png_bytes(colour[ids]),
    }
    if train_ids:
        path = cs.label_path(frame.split, frame.city, frame.seq, FRAME, cs.LABEL_TRAINIDS_SUFFIX)
        files[path] = png_bytes(cs.ID_TO_TRAINID[ids])
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)  # the whole tree is renamed into place at the end


def plan_frames(counts: dict[str, int], cities: dict[str, int], seed: int) -> list[Frame]:
    """Spread each split's images unevenly over its cities (at least one each)."""
    frames = []
    for split, count in counts.items():
        if count < 0:
            raise ValueError(f"--{split} {count}: a number of images, 0 or more")
        if count == 0:
            continue
        names = CITIES[split]
        n_cities = cities[split]
        if not 1 <= n_cities <= len(names):
            raise ValueError(f"--{split}-cities must be between 1 and {len(names)}, got {n_cities}")
        if count < n_cities:
            raise ValueError(f"--{split} {count} is fewer images than --{split}-cities {n_cities}")
        rng = np.random.default_rng([seed, cs.SPLITS.index(split), 999])
        per_city = 1 + rng.multinomial(count - n_cities, rng.dirichlet(np.full(n_cities, 2.0)))
        for city, n in zip(names[:n_cities], per_city, strict=True):
            frames += [Frame(split, city, seq) for seq in range(int(n))]
    if not frames:
        raise ValueError(f"{', '.join(f'--{s}' for s in counts)} are all 0: ask for at least one image")
    return frames


def _write_frame_star(args: tuple) -> None:
    write_frame(*args)


def make_synthetic(
    out: str | Path,
    counts: dict[str, int],
    cities: dict[str, int],
    size: Size = CITYSCAPES_SIZE,
    seed: int = 0,
    workers: int = 1,
    train_ids: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Frame]:
    """Write a synthetic Cityscapes tree at ``out`` with frames of ``size`` (height, width);
    return the frames written."""
    height, width = size
    if seed < 0:
        raise ValueError(f"--seed {seed}: a seed is 0 or more")
    frames = plan_frames(counts, cities, seed)
    with leased_atomic_directory(out, f"make_synthetic into {out}", overwrite) as tmp:
        jobs = [(tmp, frame, width, height, seed, train_ids) for frame in frames]
        # closed on an error too, so that the error's line starts a line of its own
        bar = tqdm(total=len(jobs), desc="synthesize", unit="img", disable=not progress)
        with bar, parallel.unordered(_write_frame_star, jobs, workers) as done:
            for _ in done:
                bar.update()
    return frames
