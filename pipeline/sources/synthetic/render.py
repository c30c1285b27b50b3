"""Sensor models of the synthetic source: ground + sky -> Sentinel-2 L1C/L2A, Landsat C2 L2, Sentinel-1.

Surface reflectance per endmember at the 13 Sentinel-2 bands (values typical of published spectral
libraries: loess soil, summer maize, broadleaf trees, concrete, turbid river water), a fixed hazy-summer
atmosphere (path reflectance + transmittance) for TOA that each overpass perturbs (aerosol load, water
vapour, illumination), clouds blended by opacity, radiometric noise, SAR sigma0 per endmember mixed in
linear power with gamma speckle.

Two clear overpasses of unchanged ground therefore differ as real ones do (a few % in L1C blue from the
aerosol, ~1-2 % from illumination, sensor noise), so a "copy the last clear date" baseline is good but
never exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.masking.codes import MaskClass
from pipeline.sensors import S2_BANDS, QAPixel
from pipeline.sources.synthetic.noise import pixel_gamma, pixel_normal, pixel_uniform, value_noise
from pipeline.sources.synthetic.sky import Sky
from pipeline.sources.synthetic.world import ENDMEMBERS, Ground

_B = {b: i for i, b in enumerate(S2_BANDS)}


def _spec(b1, b2, b3, b4, b5, b6, b7, b8, b8a, b11, b12):  # noqa: ANN001, ANN202
    # B9 (water vapour) sees the surface like NIR; B10 like SWIR: the atmosphere makes the difference.
    return [b1, b2, b3, b4, b5, b6, b7, b8, b8a, 0.95 * b8a, 0.9 * b11, b11, b12]


# Surface reflectance per endmember (rows follow synth_world.ENDMEMBERS, columns S2_BANDS).
SURFACE = np.array([
    _spec(.050, .050, .060, .035, .025, .015, .012, .010, .009, .005, .003),  # water_clear
    _spec(.070, .080, .110, .105, .085, .050, .045, .040, .035, .012, .008),  # water_turbid
    _spec(.030, .032, .072, .033, .110, .320, .420, .450, .470, .240, .110),  # crop canopy
    _spec(.025, .028, .055, .028, .080, .220, .280, .300, .310, .160, .070),  # forest
    _spec(.040, .045, .080, .070, .130, .250, .300, .320, .330, .280, .170),  # grass
    _spec(.085, .095, .135, .170, .205, .230, .250, .265, .275, .350, .290),  # soil_dry (loess)
    _spec(.055, .060, .085, .115, .135, .150, .160, .170, .175, .180, .140),  # soil_wet
    _spec(.120, .135, .160, .180, .195, .205, .215, .225, .225, .260, .240),  # concrete
    _spec(.090, .090, .100, .110, .120, .120, .130, .130, .130, .150, .140),  # roof_grey
    _spec(.100, .120, .110, .085, .090, .090, .100, .100, .100, .080, .070),  # roof_blue
    _spec(.300, .320, .340, .350, .360, .360, .370, .370, .370, .320, .270),  # bright (greenhouse film)
    _spec(.070, .070, .080, .090, .100, .110, .120, .120, .130, .150, .140),  # asphalt
    _spec(.080, .085, .105, .105, .095, .080, .080, .075, .075, .060, .050),  # flooded_urban
], dtype=np.float32)
assert SURFACE.shape == (len(ENDMEMBERS), 13)

# Hazy summer atmosphere over the north China plain: TOA = PATH + TRANS * surface.
PATH = np.array([.092, .068, .050, .035, .028, .022, .018, .015, .013, .006, .001, .004, .002], dtype=np.float32)
TRANS = np.array([.75, .80, .85, .88, .89, .90, .91, .91, .92, .40, .012, .93, .92], dtype=np.float32)
# Opaque water cloud at TOA (bright, flat visible-NIR, lower SWIR from droplet absorption).
CLOUD = np.array([.52, .50, .48, .47, .48, .48, .48, .47, .47, .30, .06, .32, .20], dtype=np.float32)
# Cirrus per unit visible cirrus reflectance (ice: B10 sees it above the water vapour).
CIRRUS = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.9, 1.0, 0.8, 0.6], dtype=np.float32)
# Diffuse (skylight) share of the ground irradiance under this hazy summer sky: all a cloud shadow keeps
# once the direct beam is blocked (Rayleigh + aerosol scattering fall with wavelength), so shadows under
# thick cumulus are ~0.25x clear in NIR and less dark in blue, as in real L1C shadows.
DIFFUSE = np.array([.50, .45, .38, .32, .30, .28, .26, .25, .25, .25, .25, .18, .15], dtype=np.float32)
_WAVELENGTH = np.array([443, 492, 560, 665, 704, 740, 783, 833, 865, 945, 1374, 1614, 2202], dtype=np.float32)
HAZE = (_WAVELENGTH / 560.0) ** -1.3 * np.where(_WAVELENGTH > 1300, 0.3, 1.0).astype(np.float32)
HAZE[_B["B10"]] = 0.0

# Sentinel-1 sigma0 (VV, VH dB at 37 deg) per endmember.
SAR_DB = np.array([
    (-22.0, -29.0), (-21.0, -28.0), (-9.0, -15.0), (-7.5, -13.0), (-11.0, -18.0), (-12.5, -20.0), (-8.5, -16.5),
    (-6.0, -13.0), (-5.0, -12.0), (-4.5, -11.5), (-7.0, -15.0), (-15.0, -22.0), (-1.5, -10.5),
], dtype=np.float32)
SAR_SLOPE = np.array(
    [-0.30, -0.30, -0.12, -0.10, -0.13, -0.15, -0.15, -0.08, -0.08, -0.08, -0.10, -0.20, -0.05], dtype=np.float32
)
ENL = 4.4
# cirrus reflectance above which the operational masks (QA60 bit 11, SCL 10, QA_PIXEL bit 2) flag cirrus
CIRRUS_MIN_QA = 0.015

# Landsat OLI SR bands taken from the nearest S2 band of the same surface.
LANDSAT_FROM_S2 = {
    "SR_B1": "B1",
    "SR_B2": "B2",
    "SR_B3": "B3",
    "SR_B4": "B4",
    "SR_B5": "B8A",
    "SR_B6": "B11",
    "SR_B7": "B12",
}
SURFACE_TEMP_K = np.array([299, 300, 301, 300, 303, 312, 303, 313, 314, 312, 309, 315, 300], dtype=np.float32)


def surface(ground: Ground, band_idx: list[int] | None) -> np.ndarray:
    """Cloud-free surface reflectance (len(band_idx), H, W); all 13 bands when ``band_idx`` is None."""
    k, h, w = ground.abundance.shape
    # always the full 13-band product, in float64, then select and round to float32: BLAS sums in a
    # shape-dependent order, and a pixel must get bit-identical values whatever the grid and bands are
    out = (SURFACE.T.astype(np.float64) @ ground.abundance.reshape(k, -1)).astype(np.float32).reshape(13, h, w)
    if band_idx is not None:
        out = out[band_idx]
    out *= ground.texture[None]
    return out


# Per-overpass variation of that atmosphere. The aerosol part of the path reflectance and its extinction
# scale with the scene's aerosol load (Angstrom-like 1.3 fall-off in extinction); B9 follows the water
# vapour column; B10 (1375 nm, below a saturated water-vapour absorption) is left as is.
AEROSOL_SHARE = 0.6  # of PATH, the rest Rayleigh
AEROSOL_EXT = np.where(_WAVELENGTH > 1300, 0.03, 0.12 * (_WAVELENGTH / 560.0) ** -1.3).astype(np.float32)
AEROSOL_RANGE = (0.8, 1.25)  # load relative to the hazy-summer mean
VAPOUR_RANGE = (0.92, 1.08)  # B9 transmittance factor
GAIN_RANGE = (0.98, 1.02)  # illumination / view-geometry (BRDF) gain, spectrally flat
# Radiometric noise sigma = floor + slope * reflectance (S2 MSI SNR ~100-170 at reference radiance).
NOISE_FLOOR = np.float32(0.0008)
NOISE_SLOPE = np.float32(0.004)


@dataclass(frozen=True)
class Atmosphere:
    """One overpass: TOA = path + trans * gain * surface."""

    path: np.ndarray  # (13,)
    trans: np.ndarray  # (13,)
    gain: float

    def toa(self, surf: np.ndarray, band_idx: list[int]) -> np.ndarray:
        return self.path[band_idx, None, None] + (self.trans[band_idx] * np.float32(self.gain))[:, None, None] * surf


MEAN_ATMOSPHERE = Atmosphere(PATH, TRANS, 1.0)


def atmosphere(key: int) -> Atmosphere:
    """The atmosphere of the overpass with noise key ``key`` (deterministic)."""
    u = np.random.default_rng(key).random(3)
    aerosol = AEROSOL_RANGE[0] + (AEROSOL_RANGE[1] - AEROSOL_RANGE[0]) * u[0]
    path = PATH * np.float32(1.0 - AEROSOL_SHARE + AEROSOL_SHARE * aerosol)
    trans = TRANS * (1.0 - AEROSOL_EXT * np.float32(aerosol - 1.0))
    trans[_B["B9"]] = TRANS[_B["B9"]] * np.float32(VAPOUR_RANGE[0] + (VAPOUR_RANGE[1] - VAPOUR_RANGE[0]) * u[1])
    path[_B["B10"]], trans[_B["B10"]] = PATH[_B["B10"]], TRANS[_B["B10"]]
    gain = GAIN_RANGE[0] + (GAIN_RANGE[1] - GAIN_RANGE[0]) * float(u[2])
    return Atmosphere(path.astype(np.float32), trans.astype(np.float32), gain)


def _run(idx: np.ndarray) -> slice:
    """A slice selecting the indices ``idx``, a run of consecutive integers going up or down."""
    step = 1 if len(idx) < 2 or idx[1] > idx[0] else -1
    stop = int(idx[-1]) + step
    return slice(int(idx[0]), None if stop < 0 else stop, step)


def sensor_noise(xs: np.ndarray, ys: np.ndarray, res: float, key: int, band_idx: list[int]) -> list[np.ndarray]:
    """Independent N(0, 1) radiometric noise per band and world pixel, one (H, W) view per band.

    One normal field is hashed on the grid's pixels plus 12 more east and south; band b reads it shifted
    b pixels east and (2b mod 13) south, i.e. at other world pixels, so bands are independent and a pixel's
    noise does not depend on the grid asking for it (nor on its row order), at the cost of one field, not 13.
    """
    x0, y0 = float(np.min(xs)), float(np.min(ys))
    ix = np.rint((np.asarray(xs) - x0) / res).astype(np.int64)  # 0.. along the grid's columns
    iy = np.rint((np.asarray(ys) - y0) / res).astype(np.int64) + 12  # row 0 of the field is 12 px south
    z = pixel_normal(
        x0 + res * np.arange(int(ix.max()) + 13), y0 - 12 * res + res * np.arange(int(iy.max()) + 1), res, key
    )
    return [z[_run(iy - (2 * b) % 13), _run(ix + b)] for b in band_idx]


def toa_clear(surf: np.ndarray, band_idx: list[int], atm: Atmosphere = MEAN_ATMOSPHERE) -> np.ndarray:
    return atm.toa(surf, band_idx)


def apply_sky(surf: np.ndarray, sky: Sky, band_idx: list[int], atm: Atmosphere = MEAN_ATMOSPHERE,
              noise: list[np.ndarray] | None = None) -> np.ndarray:
    """TOA with haze, cirrus, shadow (direct beam removed, skylight and path radiance kept), thick cloud on
    top, then the sensor's noise (``noise``: one N(0, 1) field per band, see ``sensor_noise``)."""
    a = sky.alpha
    keep = (1.0 - a).astype(np.float32)
    # thicker clouds are brighter; the opacity mixes cloud over the (possibly shaded) ground
    cloud = (a * (0.8 + 0.3 * (1.0 - np.exp(-sky.tau / np.float32(12.0))))).astype(np.float32)
    out = np.empty(surf.shape, dtype=np.float32)
    tmp = np.empty(sky.alpha.shape, dtype=np.float32)
    for i, b in enumerate(band_idx):
        o = out[i]
        np.multiply(sky.shadow, np.float32(1.0) - DIFFUSE[b], out=tmp)
        tmp *= surf[i]
        np.subtract(surf[i], tmp, out=o)
        o *= atm.trans[b] * np.float32(atm.gain)
        o += atm.path[b]
        if HAZE[b]:
            np.multiply(sky.haze, HAZE[b], out=tmp)
            o += tmp
        np.multiply(sky.cirrus, CIRRUS[b], out=tmp)
        o += tmp
        o *= keep
        np.multiply(cloud, CLOUD[b], out=tmp)
        o += tmp
        if noise is not None:
            np.multiply(o, NOISE_SLOPE, out=tmp)
            tmp += NOISE_FLOOR
            tmp *= noise[i]
            o += tmp
    return out


def to_surface(toa: np.ndarray, band_idx: list[int], atm: Atmosphere = MEAN_ATMOSPHERE) -> np.ndarray:
    """Invert the overpass's atmosphere (what a Sen2Cor/LaSRC-like correction that retrieved its aerosol
    gives for a clear sky); the illumination gain stays in the surface reflectance, as it does in real L2A."""
    return ((toa - atm.path[band_idx, None, None]) / atm.trans[band_idx, None, None]).astype(np.float32)


def cloud_probability(sky: Sky, xs: np.ndarray, ys: np.ndarray, res: float, key: int) -> np.ndarray:
    """s2cloudless-like probability 0..100: follows opacity, soft at edges, cirrus half-seen, some noise."""
    noise = 0.08 * value_noise(xs, ys, 400.0, key) + 0.04 * pixel_normal(xs, ys, res, key ^ 0x11)
    p = np.clip(1.15 * sky.alpha + 1.5 * sky.cirrus + 2.0 * sky.haze + noise + 0.03, 0.0, 1.0)
    return np.round(p * 100.0).astype(np.float32)


def cs_cdf(sky: Sky, xs: np.ndarray, ys: np.ndarray, res: float, key: int) -> np.ndarray:
    """Cloud Score+-like clear-sky score (1 clear): low under cloud and shadow, slightly noisy."""
    occl = np.maximum.reduce([sky.alpha, 0.85 * sky.shadow, 6.0 * sky.cirrus, 8.0 * sky.haze])
    noise = 0.05 * value_noise(xs, ys, 600.0, key) + 0.03 * pixel_normal(xs, ys, res, key ^ 0x22)
    return np.clip(0.97 - occl + noise, 0.0, 1.0).astype(np.float32)


def qa60(sky: Sky) -> np.ndarray:
    """QA60 bit 10 opaque cloud, bit 11 cirrus (the operational mask: no shadow, coarse)."""
    q = np.zeros(sky.alpha.shape, dtype=np.float32)
    q[sky.cirrus >= 2 * CIRRUS_MIN_QA] = 2048
    q[sky.alpha >= 0.6] = 1024
    return q



def scl(mask: np.ndarray, ground: Ground, prob: np.ndarray, sky: Sky) -> np.ndarray:
    """L2A scene classification consistent with the clouds (3 shadow, 4 veg, 5 bare, 6 water, 8/9 cloud, 10 cirrus)."""
    ab = ground.abundance
    veg = ab[2] + ab[3] + ab[4]
    water = ab[0] + ab[1]
    out = np.where(veg > 0.5, 4, 5).astype(np.float32)
    out[water > 0.5] = 6
    out[mask == MaskClass.SHADOW] = 3
    out[sky.cirrus >= CIRRUS_MIN_QA * 2] = 10
    out[(prob >= 35) & (prob < 65)] = 8
    out[prob >= 65] = 9
    return out


def landsat_qa(mask: np.ndarray, ground: Ground, sky: Sky) -> np.ndarray:
    """QA_PIXEL per USGS C2: cloud / dilated cloud / cirrus / shadow / clear / water bits and confidences."""
    from scipy.ndimage import binary_dilation

    cloud = mask == MaskClass.CLOUD
    shadow = (mask == MaskClass.SHADOW)
    cirrus = sky.cirrus >= CIRRUS_MIN_QA * 2
    dilated = binary_dilation(cloud, iterations=3) & ~cloud
    water = (ground.abundance[0] + ground.abundance[1]) > 0.5
    clear = ~(cloud | dilated)
    q = np.zeros(mask.shape, dtype=np.uint16)
    q |= dilated.astype(np.uint16) << QAPixel.DILATED_CLOUD
    q |= cirrus.astype(np.uint16) << QAPixel.CIRRUS
    q |= cloud.astype(np.uint16) << QAPixel.CLOUD
    q |= (shadow & ~cloud).astype(np.uint16) << QAPixel.SHADOW
    q |= clear.astype(np.uint16) << QAPixel.CLEAR
    q |= (water & ~cloud).astype(np.uint16) << QAPixel.WATER
    cloud_conf = np.where(cloud, 3, np.where(sky.alpha >= 0.2, 2, 1)).astype(np.uint16)
    q |= cloud_conf << QAPixel.CLOUD_CONF
    q |= np.where(shadow, 3, 1).astype(np.uint16) << QAPixel.SHADOW_CONF
    q |= np.uint16(1) << QAPixel.SNOW_CONF
    q |= np.where(cirrus, 3, 1).astype(np.uint16) << QAPixel.CIRRUS_CONF
    return q.astype(np.float32)


def surface_temperature(ground: Ground, sky: Sky) -> np.ndarray:
    k, h, w = ground.abundance.shape
    st = (SURFACE_TEMP_K.astype(np.float64) @ ground.abundance.reshape(k, -1)).astype(np.float32).reshape(h, w)
    st = st * (1.0 - 0.02 * sky.shadow)
    cloud_top = 290.0 - 2.0 * np.minimum(sky.tau, 10.0)
    return (st * (1.0 - sky.alpha) + cloud_top * sky.alpha).astype(np.float32)


def sar(
    ground: Ground, angle: np.ndarray, xs: np.ndarray, ys: np.ndarray, res: float, key: int, speckle: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """sigma0 VV, VH in dB: endmembers mixed in linear power, crop biomass, then gamma speckle (ENL 4.4)."""
    k, h, w = ground.abundance.shape
    ab = ground.abundance.reshape(k, -1)
    d_angle = (angle - 37.0).reshape(-1)
    out = []
    for j in range(2):
        db = SAR_DB[:, j, None] + SAR_SLOPE[:, None] * d_angle[None]  # (K, N)
        lin = 10.0 ** (db / 10.0)
        p = (lin * ab).sum(axis=0).reshape(h, w)
        # growing maize scatters more (volume scattering): up to +3 dB VV, +4 dB VH at full canopy
        p *= 10.0 ** ((3.0 + j) * ground.canopy * (ab[2].reshape(h, w) > 0.3) / 10.0)
        # building-scale brightness variation (corner reflectors) in towns
        urb = (ab[7] + ab[8] + ab[9] + ab[12]).reshape(h, w)
        p *= 10.0 ** (urb * 4.0 * (pixel_uniform(xs, ys, res * 3, key ^ 0x77) - 0.4) / 10.0)
        if speckle:
            p *= pixel_gamma(xs, ys, res, key + 31 * j, ENL)
        out.append((10.0 * np.log10(np.maximum(p, 1e-6))).astype(np.float32))
    return out[0], out[1]
