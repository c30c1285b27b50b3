"""The simulated sky: sun position, per-scene weather, fractal clouds, cirrus, haze and cloud shadows.

Cloud fields are world-anchored noise keyed by (seed, scene id), so a patch read and a full-grid read
of one scene see the same clouds. Shadows are the same opacity field evaluated at ground points moved
towards the sun by ``height * tan(zenith)``: the cloud that shades a pixel is exactly the one above the
shifted point, with no edge effects at patch borders.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import ndtri

from pipeline.sources.synthetic.noise import fbm, hash_uniform, key_of, value_noise

# Truth thresholds: what counts as thick cloud, thin cloud and shadow.
# Thick cloud: opacity >= 0.5 (optical thickness >= 0.7), the surface no longer dominates the signal.
CLOUD_ALPHA = 0.5
# Thin cloud = a semi-transparent veil that visibly alters the surface signal (CloudSEN12's definition),
# taken as a blue (B2) TOA brightening of at least THIN_VISIBLE: ~a quarter of clear-sky blue TOA over this
# cropland and ~5x the L1C radiometric uncertainty. One criterion for the three veils, which add up:
# a cloud rim adds alpha * (cloud blue ~0.40 - clear blue ~0.13), aerosol haze HAZE_BLUE x its 560 nm
# reflectance (Angstrom 1.3), cirrus its own reflectance. Aerosol haze is not cloud, and a uniform
# regional haze below this level is what atmospheric correction removes, so it stays CLEAR.
THIN_VISIBLE = 0.03
RIM_BLUE = 0.27
HAZE_BLUE = (492.0 / 560.0) ** -1.3
# Cirrus is also thin cloud wherever the 1375 nm band (B10, dark under a clear sky: ~0.003) measures it.
CIRRUS_MIN = 0.015
# Shadow: cloud removing >= 40 % of the direct beam (NIR then drops by >= 30 %, see synth_render.DIFFUSE).
SHADOW_ALPHA = 0.4

REGIMES = ("clear", "clear", "scattered", "broken", "overcast")


def sun_position(when: dt.datetime, lat: float, lon: float) -> tuple[float, float]:
    """(azimuth clockwise from north, elevation) in degrees, NOAA low-precision formulas (< 0.5 deg)."""
    when = when.astimezone(dt.timezone.utc)
    doy = when.timetuple().tm_yday
    hour = when.hour + when.minute / 60 + when.second / 3600
    g = 2 * math.pi / 365 * (doy - 1 + (hour - 12) / 24)
    eqtime = 229.18 * (
        0.000075
        + 0.001868 * math.cos(g)
        - 0.032077 * math.sin(g)
        - 0.014615 * math.cos(2 * g)
        - 0.040849 * math.sin(2 * g)
    )
    decl = (0.006918 - 0.399912 * math.cos(g) + 0.070257 * math.sin(g) - 0.006758 * math.cos(2 * g)
            + 0.000907 * math.sin(2 * g) - 0.002697 * math.cos(3 * g) + 0.00148 * math.sin(3 * g))
    tst = hour * 60 + eqtime + 4 * lon
    ha = math.radians(tst / 4 - 180)
    phi = math.radians(lat)
    cos_zen = math.sin(phi) * math.sin(decl) + math.cos(phi) * math.cos(decl) * math.cos(ha)
    zen = math.acos(max(-1.0, min(1.0, cos_zen)))
    az = math.degrees(math.atan2(math.sin(ha), math.cos(ha) * math.sin(phi) - math.tan(decl) * math.cos(phi))) + 180.0
    return az % 360.0, 90.0 - math.degrees(zen)


def draw_weather(seed: int, track: str, index: int, when: dt.date, event: dt.date | None) -> dict[str, Any]:
    """Cloud parameters of one acquisition, stored in ``Scene.properties`` so ``read`` needs only the scene.

    A July monsoon climatology for the north China plain: acquisitions come in blocks of five that hold
    two clear, one scattered, one broken and one overcast date in a seeded order, so every ~25 days
    has clear references and fully cloudy dates. The days around a region's event are overcast.
    """
    block, pos = divmod(index, len(REGIMES))
    order = np.argsort(
        hash_uniform(np.arange(len(REGIMES)), np.full(len(REGIMES), block), key_of("regime", seed, track))
    )
    regime = REGIMES[int(order[pos])]
    if event is not None and -3 <= (when - event).days <= 1:
        regime = "overcast"
    u = [float(v) for v in hash_uniform(np.arange(8), np.full(8, index), key_of("weather", seed, track))]
    cover = {"clear": 0.0, "scattered": 0.05 + 0.3 * u[0], "broken": 0.35 + 0.45 * u[0], "overcast": 1.0}[regime]
    cirrus = 0.0 if regime == "clear" else (0.02 + 0.06 * u[1] if u[2] < 0.3 else 0.0)
    # haze (aerosol) on some cloudy days only; where dense enough to veil the ground it is thin cloud in truth
    haze = 0.0 if regime == "clear" or u[6] < 0.6 else 0.01 + 0.025 * u[3]
    return {
        "synth_regime": regime,
        "synth_cover": round(cover, 4),
        "synth_cirrus": round(cirrus, 4),
        "synth_haze": round(haze, 4),
        "synth_cloud_height_m": round(800.0 + 1700.0 * u[4], 1),
        "synth_cloud_scale_m": round(600.0 + 1000.0 * u[5], 1),
    }


@dataclass
class Sky:
    alpha: np.ndarray  # thick-cloud opacity 0..1
    tau: np.ndarray  # cloud optical thickness (thick + cirrus)
    cirrus: np.ndarray  # cirrus reflectance added at TOA
    haze: np.ndarray  # aerosol haze reflectance at 560 nm
    shadow: np.ndarray  # shadow opacity 0..1 (cloud above the sun-ward point)

    def mask(self) -> np.ndarray:
        from pipeline.masking.codes import MaskClass

        m = np.full(self.alpha.shape, MaskClass.CLEAR, dtype=np.uint8)
        m[self.shadow >= SHADOW_ALPHA] = MaskClass.SHADOW
        veil = RIM_BLUE * self.alpha + self.cirrus + np.float32(HAZE_BLUE) * self.haze
        thin = (veil >= THIN_VISIBLE) | (self.cirrus >= CIRRUS_MIN)
        m[thin] = MaskClass.THIN_CLOUD
        m[self.alpha >= CLOUD_ALPHA] = MaskClass.CLOUD
        return m


def _cumulus_noise(xs: np.ndarray, ys: np.ndarray, p: dict[str, Any], key: int) -> np.ndarray:
    scale = float(p["synth_cloud_scale_m"])
    cells = [scale * 0.5**i for i in range(7) if scale * 0.5**i >= 25.0]
    return fbm(xs, ys, cells, key, persistence=0.55)


def cloud_threshold(xs: np.ndarray, ys: np.ndarray, props: dict[str, Any], seed: int, scene_key: str) -> float:
    """Noise level whose exceedance covers ``synth_cover`` of the sampled area (set at search time)."""
    cover = float(props["synth_cover"])
    if cover <= 0.0 or cover >= 1.0:
        return float("nan")
    n = _cumulus_noise(xs, ys, props, key_of("cloud", seed, scene_key))
    return float(np.quantile(n, 1.0 - cover))


def _thick(xs: np.ndarray, ys: np.ndarray, p: dict[str, Any], key: int) -> tuple[np.ndarray, np.ndarray]:
    cover = float(p["synth_cover"])
    shape = (len(ys), len(xs))
    if cover <= 0.0:
        z = np.zeros(shape, dtype=np.float32)
        return z, z
    n = _cumulus_noise(xs, ys, p, key)
    if cover >= 1.0:
        tau = (14.0 + 7.0 * n).clip(2.5, None).astype(np.float32)
    else:
        t = p.get("synth_cloud_threshold")
        if t is None or not np.isfinite(t):
            t = float(ndtri(1.0 - cover))  # unit-std noise; search() calibrates it on the region instead
        tau = (np.maximum(n - np.float32(t), 0.0) * np.float32(12.0)).astype(np.float32)
    return (1.0 - np.exp(-tau)).astype(np.float32), tau


def sky_on(
    xs: np.ndarray, ys: np.ndarray, props: dict[str, Any], seed: int, scene_key: str, with_shadow: bool = True
) -> Sky:
    key = key_of("cloud", seed, scene_key)
    alpha, tau = _thick(xs, ys, props, key)
    shape = alpha.shape
    ci_amp = float(props.get("synth_cirrus", 0.0))
    if ci_amp > 0:
        stretched = [(6000.0, 1200.0), (3000.0, 600.0), (1500.0, 300.0), (700.0, 140.0)]
        if hash_uniform(np.array([0]), np.array([0]), key ^ 0x99)[0] < 0.5:
            stretched = [(b, a) for a, b in stretched]
        nc = fbm(xs, ys, stretched, key ^ 0xC1, persistence=0.6)
        cirrus = (ci_amp * np.clip(nc - 0.5, 0.0, None)).astype(np.float32)
    else:
        cirrus = np.zeros(shape, dtype=np.float32)
    hz_amp = float(props.get("synth_haze", 0.0))
    haze = (hz_amp * np.clip(0.7 + 0.5 * value_noise(xs, ys, 15000.0, key ^ 0x4A), 0.0, None)).astype(np.float32)
    shadow = np.zeros(shape, dtype=np.float32)
    if with_shadow and float(props["synth_cover"]) > 0 and float(props["synth_cover"]) < 1.0:
        az = math.radians(float(props["sun_azimuth"]))
        zen = math.radians(90.0 - float(props["sun_elevation"]))
        reach = float(props["synth_cloud_height_m"]) * math.tan(zen)
        # the ground point is shaded by the cloud above the point ``reach`` metres towards the sun; the
        # direct beam crosses that cloud on a slant path, tau / cos(zenith)
        _, tau_sun = _thick(xs + reach * math.sin(az), ys + reach * math.cos(az), props, key)
        shadow = (1.0 - np.exp(-tau_sun / np.float32(math.cos(zen)))).astype(np.float32)
    elif float(props["synth_cover"]) >= 1.0:
        shadow = np.ones(shape, dtype=np.float32)
    tau_total = (tau + cirrus * np.float32(20.0)).astype(np.float32)
    return Sky(alpha, tau_total, cirrus, haze, shadow)
