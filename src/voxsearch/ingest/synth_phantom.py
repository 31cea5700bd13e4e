"""Render a CT-like (HU) or MR-like (T1, arbitrary units) phantom with organs and findings.

Geometry is defined in millimetres in RAS world space (origin at the body centre; +x is the
patient's right, +y anterior, +z superior), so the same anatomy is drawn at any grid size.
"""

from __future__ import annotations

import numpy as np

from voxsearch.ingest.synth_vocab import (
    CT_LESION_ABSOLUTE,
    CT_LESION_ABSOLUTE_IN_ORGAN,
    CT_LESION_DELTA,
    MR_LESION_DELTA,
)

# (in-plane voxels, (min slices, max slices)) per size knob.
GRIDS = {"tiny": (40, (16, 28)), "small": (96, (36, 64)), "full": (256, (90, 180))}
FOV_MM = {"head": (220.0, 180.0), "chest": (360.0, 280.0), "abdomen": (360.0, 240.0)}

CT = {"air": -1000.0, "fat": -100.0, "muscle": 45.0, "lung": -850.0, "bone": 700.0, "skull": 1000.0,
      "csf": 5.0, "brain": 35.0}
CT_PHASE = {  # tissue: {phase: HU}; missing phase -> non-contrast value
    "blood": {"non-contrast": 40.0, "arterial": 300.0, "portal venous": 170.0, "post-contrast": 150.0},
    "liver": {"non-contrast": 60.0, "arterial": 70.0, "portal venous": 110.0},
    "spleen": {"non-contrast": 50.0, "arterial": 90.0, "portal venous": 120.0},
    "kidney": {"non-contrast": 35.0, "arterial": 160.0, "portal venous": 180.0},
    "brain": {"non-contrast": 35.0, "post-contrast": 38.0},
}
MR = {"air": 0.0, "fat": 850.0, "muscle": 320.0, "lung": 30.0, "bone": 600.0, "skull": 60.0, "csf": 120.0,
      "brain": 500.0, "liver": 480.0, "spleen": 380.0, "kidney": 400.0, "blood": 80.0}
MR_POST = {"blood": 700.0, "liver": 540.0, "spleen": 450.0, "kidney": 560.0}


class Canvas:
    """A voxel grid with world coordinates; paints shapes only inside their bounding boxes."""

    def __init__(self, shape, spacing, fill: float):
        self.shape = tuple(shape)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.array = np.full(self.shape, fill, dtype=np.float32)
        self.axes = [((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32) for n, s in zip(self.shape, self.spacing, strict=True)]

    @property
    def affine(self) -> np.ndarray:
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = [float(a[0]) for a in self.axes]
        return aff

    def _box(self, center, radii):
        sl = []
        for ax, c, r in zip(self.axes, center, radii, strict=True):
            lo, hi = np.searchsorted(ax, c - r), np.searchsorted(ax, c + r, side="right")
            sl.append(slice(int(lo), int(hi)))
        return tuple(sl)

    def ellipsoid(self, center, radii, value: float, inside=None):
        box = self._box(center, radii)
        if any(s.stop <= s.start for s in box):
            return
        x, y, z = (ax[s] for ax, s in zip(self.axes, box, strict=True))
        d = (((x - center[0]) / radii[0]) ** 2)[:, None, None] + (((y - center[1]) / radii[1]) ** 2)[None, :, None] \
            + (((z - center[2]) / radii[2]) ** 2)[None, None, :]
        mask = d <= 1.0
        if inside is not None:
            mask &= inside[box]
        self.array[box][mask] = value

    def cylinder(self, center_xy, radii_xy, z_range, value: float):
        r = (radii_xy[0], radii_xy[1], (z_range[1] - z_range[0]) / 2.0)
        c = (center_xy[0], center_xy[1], (z_range[0] + z_range[1]) / 2.0)
        box = self._box(c, r)
        if any(s.stop <= s.start for s in box):
            return
        x, y = self.axes[0][box[0]], self.axes[1][box[1]]
        mask2 = (((x - c[0]) / r[0]) ** 2)[:, None] + (((y - c[1]) / r[1]) ** 2)[None, :] <= 1.0
        self.array[box][np.broadcast_to(mask2[:, :, None], tuple(s.stop - s.start for s in box))] = value


def grid_for(rng: np.random.Generator, body_part: str, size: str) -> tuple[tuple, tuple]:
    n_inplane, (zmin, zmax) = GRIDS[size]
    fov, zext = FOV_MM[body_part]
    nz = int(rng.integers(zmin, zmax + 1))
    inplane = fov * float(rng.uniform(0.92, 1.08)) / n_inplane
    return (n_inplane, n_inplane, nz), (inplane, inplane, zext / nz)


def _organ_layout(body_part: str, jitter) -> dict:
    """organ -> list of (center, radii) in mm; paired organs list right then left."""
    j = jitter
    if body_part == "head":
        return {"brain": [((0.0, 5.0 + j[0], 5.0), (62.0, 78.0, 70.0))]}
    if body_part == "chest":
        return {"lung": [((72.0 + j[0], 0.0, 10.0), (52.0, 68.0, 115.0)), ((-72.0 + j[1], 0.0, 10.0), (50.0, 68.0, 115.0))]}
    return {
        "liver": [((58.0 + j[0], 12.0, 30.0), (72.0, 62.0, 68.0))],
        "spleen": [((-82.0 + j[1], -15.0, 40.0), (30.0, 42.0, 45.0))],
        "kidney": [((62.0, -48.0, -25.0 + j[2]), (22.0, 26.0, 48.0)), ((-62.0, -48.0, -20.0 + j[2]), (22.0, 26.0, 48.0))],
    }


def _tissue(modality: str, name: str, phase: str) -> float:
    if modality == "CT":
        if name in CT_PHASE:
            table = CT_PHASE[name]
            return table.get(phase, table["non-contrast"])
        return CT[name]
    if phase == "post-contrast" and name in MR_POST:
        return MR_POST[name]
    return MR[name]


def render(rng: np.random.Generator, body_part: str, modality: str, phase: str, findings: list[dict], size: str,
           noise: bool = True):
    """(array (X,Y,Z) float32 in RAS order: HU for CT, T1 units for MR; RAS affine). ``noise=False`` gives
    the noiseless object (a rescan bench adds motion and its own noise with ``add_noise``)."""
    shape, spacing = grid_for(rng, body_part, size)
    t = lambda name: _tissue(modality, name, phase)  # noqa: E731
    cv = Canvas(shape, spacing, fill=t("air"))
    zext = FOV_MM[body_part][1]
    jitter = rng.uniform(-6, 6, size=3)
    scale = float(rng.uniform(0.92, 1.06))
    if body_part == "head":
        cv.ellipsoid((0, 5, 5), (74 * scale, 92 * scale, 84), t("fat"))  # scalp
        cv.ellipsoid((0, 5, 5), (70 * scale, 88 * scale, 80), t("skull"))
        cv.ellipsoid((0, 5, 5), (63 * scale, 80 * scale, 72), t("brain"))
        for sx in (1, -1):  # lateral ventricles
            cv.ellipsoid((sx * 9.0, 8.0, 12.0), (6.0, 22.0, 12.0), t("csf"))
    else:
        rx, ry = (150.0 if body_part == "chest" else 145.0) * scale, 105.0 * scale
        span = (-zext / 2.0 - 5, zext / 2.0 + 5)
        cv.cylinder((0, 0), (rx, ry), span, t("fat"))
        cv.cylinder((0, -3), (rx - 14, ry - 14), span, t("muscle"))
        cv.cylinder((0, -0.62 * ry), (17.0, 17.0), span, t("bone"))  # vertebral bodies
        cv.cylinder((-14.0, -0.4 * ry), (11.0, 11.0), span, t("blood"))  # aorta
    layout = _organ_layout(body_part, jitter)
    for organ, parts in layout.items():
        if organ == "brain":
            continue
        for center, radii in parts:
            cv.ellipsoid(center, radii, t(organ))
    if body_part == "chest":
        cv.ellipsoid((-22.0, 38.0, -25.0), (48.0, 36.0, 48.0), t("blood"))  # heart, left-anterior
    host_mask_cache: dict = {}
    for finding in findings:
        _draw_lesions(rng, cv, finding, layout[finding["organ"]], modality, t(finding["organ"]), host_mask_cache)
    if noise:
        add_noise(rng, cv.array, modality)
    return cv.array, cv.affine


def _lesion_value(modality: str, kind: str, organ: str, host: float) -> float:
    if modality == "CT":
        if (organ, kind) in CT_LESION_ABSOLUTE_IN_ORGAN:
            return CT_LESION_ABSOLUTE_IN_ORGAN[(organ, kind)]
        delta = CT_LESION_DELTA[kind]
        return CT_LESION_ABSOLUTE[kind] if delta is None else host + delta
    return max(host + MR_LESION_DELTA[kind], 20.0)


def _draw_lesions(rng, cv: Canvas, finding: dict, parts, modality: str, host: float, cache: dict):
    value = _lesion_value(modality, finding["type"], finding["organ"], host)
    side = finding["side"]
    for i in range(finding["count"]):
        if finding["organ"] == "brain":
            center, radii = parts[0]
            this_side = side if side != "bilateral" else ("right", "left")[i % 2]
            sign = 1.0 if this_side == "right" else -1.0
        else:
            idx = 0 if side in (None, "right") else 1 if side == "left" else i % 2
            center, radii = parts[min(idx, len(parts) - 1)]
            sign = 0.0
        diameter = finding["size_mm"] * (1.0 if i == 0 else float(rng.uniform(0.6, 0.95)))
        r = diameter / 2.0
        # A point inside the host shrunk by the lesion radius, so lesions stay inside the organ.
        inner = np.maximum(np.asarray(radii) - r, 2.0)
        u = rng.normal(size=3)
        u = u / np.linalg.norm(u) * float(rng.uniform(0.0, 0.8)) ** (1 / 3)
        pos = np.asarray(center) + u * inner
        if sign:
            pos[0] = sign * max(abs(pos[0]), r + 6.0)
        shape_jitter = rng.uniform(0.85, 1.15, size=3)
        cv.ellipsoid(tuple(pos), tuple(r * shape_jitter), value)


def add_noise(rng: np.random.Generator, array: np.ndarray, modality: str) -> None:
    """Scanner noise (and, for MR, a coil bias field), in place."""
    if modality == "CT":
        array += rng.normal(0.0, 10.0, size=array.shape).astype(np.float32)
        return
    # T1-like: smooth receive-coil bias field, then Rician noise (magnitude of complex signal).
    x, y, z = (np.linspace(-1, 1, n, dtype=np.float32) for n in array.shape)
    g = rng.uniform(-0.1, 0.1, size=3).astype(np.float32)
    array *= 1.0 + g[0] * x[:, None, None] + g[1] * y[None, :, None] + g[2] * z[None, None, :]
    n1 = rng.normal(0.0, 15.0, size=array.shape).astype(np.float32)
    n2 = rng.normal(0.0, 15.0, size=array.shape).astype(np.float32)
    np.sqrt((array + n1) ** 2 + n2 ** 2, out=array)
