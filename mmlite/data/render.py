"""Vectorised numpy rendering of shapes scenes into RGB images (derived in chapter 1).

Every shape is a signed distance function d(p) (negative inside, in pixels); its coverage of a pixel
is alpha = clip(1/2 - d, 0, 1), a one-pixel linear ramp that anti-aliases the edges. Objects are
composited in slot order over a lightly textured background: img <- img + alpha * (colour - img).
"""

from __future__ import annotations

import numpy as np

from mmlite.data.world import COLOR, COLOR_RGB, SHAPE, SHAPES, SIZE, SIZE_RADIUS, VALID, X, Y, FIELDS

_BLOCK_PIXELS = 1 << 22  # object-pixels per block (16 MiB of float32 alphas): bounds the memory used


def _circle(px: np.ndarray, py: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.sqrt(px * px + py * py) - 0.85 * r


def _square(px: np.ndarray, py: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(px), np.abs(py)) - 0.72 * r


def _triangle(px: np.ndarray, py: np.ndarray, r: np.ndarray) -> np.ndarray:
    # Equilateral, apex up, centroid at the centre, circumradius r (inradius r/2): the largest of the
    # three edge distances p . n_i - r/2, with outward normals n = (0, 1) (down, image y grows
    # downwards) and (+-cos 30, -sin 30).
    c, s = np.float32(np.sqrt(3) / 2), np.float32(0.5)
    return np.maximum(np.maximum(py, c * px - s * py), -c * px - s * py) - 0.5 * r


def _diamond(px: np.ndarray, py: np.ndarray, r: np.ndarray) -> np.ndarray:
    return (np.abs(px) + np.abs(py) - r) * np.float32(1 / np.sqrt(2))


def _cross(px: np.ndarray, py: np.ndarray, r: np.ndarray) -> np.ndarray:
    ax, ay, long, half = np.abs(px), np.abs(py), 0.95 * r, 0.3 * r
    return np.minimum(np.maximum(ax - long, ay - half), np.maximum(ax - half, ay - long))


def _star(px: np.ndarray, py: np.ndarray, r: np.ndarray) -> np.ndarray:
    # Five-pointed star (outer radius r, inner 0.5 r), one point up: fold the plane by the star's
    # mirror symmetries into one wedge, then measure the distance to that wedge's edge segment.
    k1x, k1y = np.float32(0.809016994375), np.float32(-0.587785252292)
    x, y = np.abs(px), -py  # y up
    d = np.maximum(k1x * x + k1y * y, 0)
    x, y = x - 2 * d * k1x, y - 2 * d * k1y
    d = np.maximum(-k1x * x + k1y * y, 0)
    x, y = np.abs(x + 2 * d * k1x), y - 2 * d * k1y
    y = y - r
    bax, bay = np.float32(0.5 * 0.587785252292), np.float32(0.5 * 0.809016994375 - 1)
    h = np.clip((x * bax + y * bay) / (bax * bax + bay * bay), 0, r)
    return np.sqrt((x - bax * h) ** 2 + (y - bay * h) ** 2) * np.sign(y * bax - x * bay)


_SDF = (_circle, _square, _triangle, _diamond, _cross, _star)  # in the order of SHAPES
assert len(_SDF) == len(SHAPES)


def _coverage(objects: np.ndarray, size: int) -> np.ndarray:
    """alpha (n, K, size, size) float32 of every object slot (0 for empty slots)."""
    n, k = objects.shape[:2]
    flat = objects.reshape(n * k, len(FIELDS))  # (n*K, 6)
    alpha = np.zeros((n * k, size, size), dtype=np.float32)
    grid = (np.arange(size, dtype=np.float32) + 0.5)  # pixel centres
    scale = np.float32(size / 100)
    for s, sdf in enumerate(_SDF):
        idx = np.flatnonzero((flat[:, VALID] == 1) & (flat[:, SHAPE] == s))
        if len(idx) == 0:
            continue
        cx = (flat[idx, X].astype(np.float32) * scale)[:, None, None]  # (m, 1, 1)
        cy = (flat[idx, Y].astype(np.float32) * scale)[:, None, None]  # (m, 1, 1)
        r = (np.asarray(SIZE_RADIUS, dtype=np.float32)[flat[idx, SIZE]] * scale)[:, None, None]  # (m, 1, 1)
        dist = sdf(grid[None, None, :] - cx, grid[None, :, None] - cy, r)  # (m, size, size)
        alpha[idx] = np.clip(0.5 - dist, 0, 1)
    return alpha.reshape(n, k, size, size)  # (n, K, size, size)


def render_scenes(objects: np.ndarray, image_size: int, rng: np.random.Generator, color_jitter: int = 12,
                  return_visibility: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Render scenes (N, K, 6) (columns as in mmlite.data.world.FIELDS) to uint8 images (N, H, W, 3).

    `rng` draws the background (grey level, tint, gradient, pixel noise) and each object's colour
    jitter. With return_visibility, also returns (N, K) float: the fraction of each object's area
    left visible by the objects drawn over it (1.0 for empty slots).
    """
    objects = np.asarray(objects)
    if objects.ndim != 3 or objects.shape[-1] != len(FIELDS):
        raise ValueError(f"objects must have shape (N, K, {len(FIELDS)}) with columns {FIELDS}, "
                         f"got {objects.shape}")
    if not np.issubdtype(objects.dtype, np.integer):
        raise TypeError(f"objects must be an integer array, got dtype {objects.dtype}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    valid = objects[..., VALID] == 1
    for col, name, high in ((SHAPE, "shape", len(SHAPES)), (COLOR, "color", len(COLOR_RGB)),
                            (SIZE, "size", len(SIZE_RADIUS)), (X, "x", 101), (Y, "y", 101)):
        bad = valid & ((objects[..., col] < 0) | (objects[..., col] >= high))
        if bad.any():
            raise ValueError(f"objects column {name!r} must lie in 0..{high - 1} for valid objects, "
                             f"got {objects[..., col][bad][0]}")
    n, k, size = objects.shape[0], objects.shape[1], int(image_size)
    # Every random draw happens here, up front, so the result does not depend on the block size.
    grey = rng.uniform(45, 75, size=(n, 1, 1, 1)).astype(np.float32)
    tint = rng.uniform(-6, 6, size=(n, 1, 1, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi, size=n)
    slope = rng.uniform(0, 12, size=n)  # gradient amplitude: +- this many grey levels across the image
    jitter = rng.integers(-color_jitter, color_jitter + 1, size=(n, k, 3))
    noise = rng.standard_normal(size=(n, size, size, 1), dtype=np.float32) * np.float32(3.0)
    rgb = np.asarray(COLOR_RGB, dtype=np.int64)[np.clip(objects[..., COLOR], 0, None)] + jitter
    rgb = np.clip(rgb, 0, 255).astype(np.float32)  # (n, K, 3)

    coord = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5  # (size,) in [-1/2, 1/2]
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    visible = np.ones((n, k), dtype=np.float64)
    block = max(1, _BLOCK_PIXELS // (max(k, 1) * size * size))
    for start in range(0, n, block):
        sl = slice(start, start + block)
        gx = (np.cos(angle[sl]) * 2 * slope[sl]).astype(np.float32)[:, None, None]  # (b, 1, 1)
        gy = (np.sin(angle[sl]) * 2 * slope[sl]).astype(np.float32)[:, None, None]  # (b, 1, 1)
        ramp = gx * coord[None, None, :] + gy * coord[None, :, None]  # (b, size, size)
        img = grey[sl] + tint[sl] + ramp[..., None]  # (b, size, size, 3)
        alpha = _coverage(objects[sl], size)  # (b, K, size, size)
        for j in range(k):
            a = alpha[:, j, :, :, None]  # (b, size, size, 1)
            img += a * (rgb[sl, j, None, None, :] - img)  # colour (b, 1, 1, 3)
        img += noise[sl]
        images[sl] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        if return_visibility:
            area = alpha.sum(axis=(2, 3), dtype=np.float64)  # (b, K)
            uncovered = np.ones_like(alpha[:, 0])  # (b, size, size): not covered by later slots
            for j in range(k - 1, -1, -1):
                seen = (alpha[:, j] * uncovered).sum(axis=(1, 2), dtype=np.float64)
                visible[sl, j] = np.where(area[:, j] > 0, seen / np.maximum(area[:, j], 1e-12), 1.0)
                uncovered *= 1 - alpha[:, j]
    visible[~valid] = 1.0
    return (images, visible) if return_visibility else images
