"""The embedded default data set: procedural marble slabs with cracks, dots and joints.

Pure numpy, no disk. A slab is a veined texture (turbulence-warped sine veins over a cloudy
base, in one of several stone colourings) rendered directly at the requested size; lengths
are in units of size/64, so a crack is 1-2 px wide at 64 px and 4-8 px wide at 256 px.

Defects are drawn last, as an intensity layer over the finished clean slab: the mask is the
set of pixels whose value the defect changed, and every pixel outside it is bit-identical to
the clean slab. Since the defect uses the generator only after the slab has been drawn,
`make_slab(rng(s), size, "crack")` equals `make_slab(rng(s), size, "good")` outside its mask.
"""

from __future__ import annotations

import numpy as np

KINDS = ("good", "joint", "crack", "dot")

# (base, main vein, secondary vein) colours of a few stones
PALETTES = {
    "carrara": ((232, 231, 226), (112, 117, 128), (170, 172, 178)),
    "statuario": ((243, 241, 236), (92, 90, 92), (196, 192, 188)),
    "bardiglio": (( 160, 164, 170), (92, 96, 104), (222, 224, 228)),
    "crema": ((226, 209, 178), (168, 134, 92), (204, 182, 146)),
    "verde": ((112, 142, 118), (214, 228, 214), (62, 86, 68)),
    "rosa": ((222, 190, 178), (164, 112, 102), (242, 226, 218)),
}

# colours a `dot` may take when it is a stain rather than a dark pit
DOT_COLOURS = np.array([(150, 78, 38), (36, 54, 40), (188, 148, 58), (28, 28, 30), (90, 60, 90)], float)

# split -> index in the per-slab seed; generate() keeps each (split, label) stream apart
_SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------- noise
def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) smooth value noise in [-1, 1] with `cells` lattice cells per side."""
    grid = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1))
    u = (np.arange(size) + 0.5) * (cells / size)
    i = np.minimum(u.astype(int), cells - 1)
    f = u - i
    f = f * f * (3.0 - 2.0 * f)  # smoothstep: no creases at the lattice lines
    rows = grid[i] * (1.0 - f)[:, None] + grid[i + 1] * f[:, None]  # (size, cells+1)
    return rows[:, i] * (1.0 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _fbm(rng, size, cells, octaves, persistence=0.5, turbulence=False) -> np.ndarray:
    """Multi-octave value noise; `turbulence` sums |noise| (ridged, marble-like folds)."""
    total, amp, norm = np.zeros((size, size)), 1.0, 0.0
    for _ in range(octaves):
        n = _value_noise(rng, size, min(cells, 2 * size))
        total += amp * (np.abs(n) if turbulence else n)
        norm += amp
        amp *= persistence
        cells *= 2
    return total / norm


# ---------------------------------------------------------------- clean slabs
def _texture(rng: np.random.Generator, size: int, palette: str | None = None) -> np.ndarray:
    """(size, size, 3) float marble texture in [0, 255] (not yet quantised)."""
    name = palette or list(PALETTES)[rng.integers(len(PALETTES))]
    base, vein, vein2 = (np.array(c, float) for c in PALETTES[name])
    base = base * rng.uniform(0.94, 1.04)
    coords = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")

    # main veins: bands across the slab, warped by turbulence so they fold and branch
    angle = rng.uniform(0, np.pi)
    density = rng.uniform(0.8, 3.0)            # vein bands per slab width
    warp = rng.uniform(3.0, 8.0)
    turb = _fbm(rng, size, cells=2, octaves=5, persistence=0.55, turbulence=True)
    phase = 2 * np.pi * density * (xx * np.cos(angle) + yy * np.sin(angle)) + warp * turb
    sharp = rng.uniform(5.0, 14.0)
    veins = (1.0 - np.abs(np.sin(phase))) ** sharp
    strength = rng.uniform(0.55, 0.95)

    # fine secondary veins at another angle, denser and fainter
    angle2 = angle + rng.uniform(0.5, 1.2) * rng.choice([-1, 1])
    turb2 = _fbm(rng, size, cells=3, octaves=4, persistence=0.6, turbulence=True)
    phase2 = 2 * np.pi * rng.uniform(2.0, 6.0) * (xx * np.cos(angle2) + yy * np.sin(angle2)) \
        + rng.uniform(4.0, 10.0) * turb2
    veins2 = (1.0 - np.abs(np.sin(phase2))) ** rng.uniform(14.0, 30.0)
    strength2 = rng.uniform(0.2, 0.6)

    # veins fade in and out along their length, with a soft halo around the strong ones
    fade = np.clip(0.3 + 0.9 * (0.5 + 0.5 * _fbm(rng, size, cells=2, octaves=3)), 0, 1)
    halo = (1.0 - np.abs(np.sin(phase))) ** (sharp * 0.2) * rng.uniform(0.08, 0.22)

    # cloudy base: slow, soft variation of the stone's colour, mottled toward the vein colour
    cloud = _fbm(rng, size, cells=3, octaves=4, persistence=0.5)
    img = base * (1.0 + rng.uniform(0.05, 0.12) * cloud)[..., None]
    mottle = (np.clip(cloud, 0, 1) * rng.uniform(0.0, 0.25))[..., None]
    img = img * (1 - mottle) + vein * mottle
    a2 = (strength2 * veins2)[..., None]
    img = img * (1 - a2) + vein2 * a2
    a1 = (np.maximum(strength * veins, halo) * fade)[..., None]
    img = img * (1 - a1) + vein * a1
    # fine grain of the crystals
    img = img + rng.normal(0.0, 1.6, (size, size, 1))
    return img


def _quantise(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _joint(rng: np.random.Generator, size: int) -> np.ndarray:
    """Two pieces of stone meeting at a straight seam, with a thin grout line."""
    first = list(PALETTES)[rng.integers(len(PALETTES))]
    second = first if rng.random() < 0.5 else None  # often the same stone, other veins
    a, b = _texture(rng, size, first), _texture(rng, size, second)
    s = size / 64
    centre = size * rng.uniform(0.3, 0.7, 2)
    theta = rng.uniform(0, np.pi)
    normal = np.array([np.cos(theta), np.sin(theta)])
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    dist = (xx - centre[0]) * normal[0] + (yy - centre[1]) * normal[1]  # signed, in pixels
    img = np.where((dist > 0)[..., None], a, b)
    width = rng.uniform(0.8, 1.8) * s
    grout = np.full(3, rng.choice([rng.uniform(70, 110), rng.uniform(180, 215)]))
    alpha = np.clip(width / 2 + 0.5 - np.abs(dist), 0, 1)[..., None] * rng.uniform(0.7, 1.0)
    return img * (1 - alpha) + grout * alpha


# ---------------------------------------------------------------- defects
def _segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) distance of each point (N, 2) to the nearest of the segments a[k]-b[k] (K, 2)."""
    ab = b - a                                                       # (K, 2)
    ap = points[:, None, :] - a[None, :, :]                          # (N, K, 2)
    t = np.clip((ap * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
    closest = a[None] + t[..., None] * ab[None]
    return np.sqrt(((points[:, None, :] - closest) ** 2).sum(-1)).min(1)


def _walk(rng, start, heading, n_steps, step, jag) -> np.ndarray:
    """A jagged polyline: a slowly drifting heading plus a sharp zig-zag at every vertex."""
    pts = [np.asarray(start, float)]
    for _ in range(n_steps):
        heading += rng.normal(0, 0.15)
        d = heading + rng.normal(0, jag)
        pts.append(pts[-1] + step * rng.uniform(0.6, 1.4) * np.array([np.cos(d), np.sin(d)]))
    return np.array(pts)


def _crack_layer(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) intensity in [0, 1] of a thin, jagged, branching crack."""
    s = size / 64
    heading = rng.uniform(0, 2 * np.pi)
    main = _walk(rng, size * rng.uniform(0.2, 0.8, 2), heading,
                 int(rng.integers(8, 20)), 2.4 * s, jag=rng.uniform(0.3, 0.6))
    width = rng.uniform(0.8, 2.0) * s
    lines = [(main, width)]
    for _ in range(int(rng.integers(0, 3))):  # 0-2 branches off the main line
        start = main[rng.integers(1, len(main))]
        turn = rng.uniform(0.4, 1.1) * rng.choice([-1, 1])
        branch = _walk(rng, start, heading + turn, int(rng.integers(3, 9)), 2.0 * s, jag=0.5)
        lines.append((branch, width * rng.uniform(0.55, 0.9)))
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    points = np.stack([xx.ravel(), yy.ravel()], 1)
    layer = np.zeros(size * size)
    for pts, w in lines:
        d = _segment_distance(points, pts[:-1], pts[1:])
        layer = np.maximum(layer, np.clip(w / 2 + 0.5 - d, 0, 1))  # antialiased stroke
    return layer.reshape(size, size)


def _dot_layer(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) intensity in [0, 1] of one or two small, slightly elliptic spots."""
    s = size / 64
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    layer = np.zeros((size, size))
    for _ in range(1 if rng.random() < 0.7 else 2):
        r = rng.uniform(1.5, 4.0) * s
        cx, cy = rng.uniform(r + 1, size - r - 1, 2)
        ratio, phi = rng.uniform(0.7, 1.0), rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(phi) + (yy - cy) * np.sin(phi)
        v = (-(xx - cx) * np.sin(phi) + (yy - cy) * np.cos(phi)) / ratio
        layer = np.maximum(layer, np.clip(r + 0.5 - np.hypot(u, v), 0, 1))
    return layer


def _apply(rng: np.random.Generator, clean: np.ndarray, kind: str):
    """Draw a defect over the quantised clean slab; return (image, mask) or None if invisible."""
    size = clean.shape[0]
    base = clean.astype(float)
    if kind == "crack":
        layer = _crack_layer(rng, size)
        contrast = rng.uniform(0.15, 0.6)  # darkening at the crack's core: faint to deep
        tint = np.array([1.0, 1.03, 1.07])  # slightly brown-black, like dirt in a fissure
        drawn = base * (1 - contrast * layer[..., None] * tint)
    else:
        layer = _dot_layer(rng, size)
        contrast = rng.uniform(0.15, 0.7)
        if rng.random() < 0.5:  # a dark pit
            drawn = base * (1 - contrast * layer[..., None])
        else:  # a stain of another colour
            colour = DOT_COLOURS[rng.integers(len(DOT_COLOURS))]
            a = contrast * layer[..., None]
            drawn = base * (1 - a) + colour * a
    inside = layer > 0.3
    out = np.where(inside[..., None], _quantise(drawn), clean)
    mask = (out != clean).any(-1)  # exactly the pixels the defect changed
    if mask.sum() < max(2, 3 * (size / 64) ** 2):  # at least 3 px at 64 px
        return None
    # faint is fine, invisible is not: a stain the colour of its background is redrawn
    core = layer > 0.7
    change = np.abs(out.astype(int) - clean).max(-1)
    if change[core if core.any() else mask].mean() < 12:
        return None
    return out, mask.astype(np.uint8)


# ---------------------------------------------------------------- public API
def make_slab(rng: np.random.Generator, size: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """One slab: (image uint8 (size, size, 3), mask uint8 (size, size) in {0, 1}).

    kind: `good` | `joint` (normal: empty mask) | `crack` | `dot` (mask = changed pixels).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "joint":
        return _quantise(_joint(rng, size)), np.zeros((size, size), np.uint8)
    clean = _quantise(_texture(rng, size))
    if kind == "good":
        return clean, np.zeros((size, size), np.uint8)
    while True:  # a defect that ran off the slab or changed too few pixels is redrawn
        drawn = _apply(rng, clean, kind)
        if drawn is not None:
            return drawn


def _normal_kind(index: int, joint_fraction: float) -> str:
    """Joints spread evenly over the indices: the first n slabs always hold floor(n*f) joints,
    and a slab's kind does not depend on how many slabs are asked for."""
    return "joint" if int((index + 1) * joint_fraction) > int(index * joint_fraction) else "good"


def generate(seed: int, synth_cfg, size: int) -> list[dict]:
    """Every slab of the embedded data set, as dicts split/label/defect/name/image/mask.

    Slab `i` of a (split, label) group is drawn from `default_rng([seed, group, i])`, so
    changing one count changes no other slab. Anomalous slabs alternate crack, dot.
    """
    counts = {
        ("train", "normal"): synth_cfg.n_train_normal,
        ("train", "anomalous"): synth_cfg.n_train_anomalous,
        ("val", "normal"): synth_cfg.n_val_normal,
        ("val", "anomalous"): synth_cfg.n_val_anomalous,
        ("test", "normal"): synth_cfg.n_test_normal,
        ("test", "anomalous"): synth_cfg.n_test_anomalous,
    }
    records = []
    for (split, label), n in counts.items():
        group = 2 * _SPLITS.index(split) + (label == "anomalous")
        for i in range(n):
            if label == "normal":
                kind = _normal_kind(i, synth_cfg.joint_fraction)
            else:
                kind = ("crack", "dot")[i % 2]
            image, mask = make_slab(np.random.default_rng([seed, group, i]), size, kind)
            records.append(dict(split=split, label=label, defect=kind, name=f"{kind}_{i:04d}",
                                image=image, mask=mask))
    return records
