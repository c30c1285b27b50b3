"""Raw cube sample -> model inputs per ``InputSpec``, with synthetic-cloud augmentation.

A raw sample (``pipeline.dataset.cubes.CubeDataset``) holds ``D`` dates, oldest first, the LAST one the clear
reference: ``s2`` (D, 13, H, W) float32 [0, 1], ``s2_mask`` (D, H, W) cube codes, ``s1`` (D, 2, H, W)
float32 [0, 1], ``valid`` (D, H, W) bool, ``sample_id``. ``assemble_sample`` turns it into the tensors of
``models/spec.py`` (no batch axis; the DataLoader's default collate stacks them):

- ``includes_target_date`` models (mono-temporal SEN12MS-CR setting) see the ``T - 1`` latest earlier dates
  plus a *cloudy copy of the reference*: a real cloud mask from another date of the sample or a simulated one
  (smooth random field), with a bright, white-ish cloud spectrum blended by a thickness map and a darkened,
  displaced shadow. The reference stays the target, so the loss knows the ground under the cloud.
- other models (CRGenNet style) see the ``T`` dates before the reference as they were observed; during
  training clear input dates may additionally get synthetic clouds (``input_cloud_prob``).

Invalid pixels (``~valid`` or non-finite) are zero in ``optical`` and 1 in ``optical_mask``; a non-finite SAR
value is a ``DataError`` naming the sample, never a silent zero. That rule is ``model_arrays``, which inference
(``pipeline.reconstruct.mosaic``) calls too. Random choices come from a generator seeded
by ``(seed, epoch, index)``, so a sample looks the same whatever worker, rank or resume produced it, and
evaluation (``train=False``) is reproducible across models: every model and the composite baseline are scored
on the very same synthetic clouds.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

from models.refine import AGE_SCALE
from models.spec import InputSpec
from pipeline.errors import DataError
from pipeline.harmonize import (
    PROVENANCE_FILLED,
    PROVENANCE_NO_CLEAR,
    PROVENANCE_NODATA,
    FillConfig,
    GroundChangeArrays,
    fill_gaps,
    shadow_bands,
)
from pipeline.masking.codes import MaskClass
from pipeline.normalize import unit_to_sar
from pipeline.sensors import S1_BANDS, S2_BANDS, SENSORS
from pipeline.train.config import AugmentConfig  # defined there so the config stays torch-free

# Band names of each raw optical family when the sample does not carry ``<family>_bands``.
_DEFAULT_BANDS = {"s2": S2_BANDS, "landsat": SENSORS["landsat8_l2"].reflectance_bands}
_MARK_ALPHA = 0.05  # blend weight above which a pasted cloud pixel counts as contaminated in optical_mask


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from (seed, epoch, index), stable across processes and Python versions."""
    h = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def _band_index(raw: Mapping[str, Any], family: str, wanted: tuple[str, ...], sample_id: str) -> list[int]:
    names = tuple(raw.get(f"{family}_bands") or _DEFAULT_BANDS.get(family, ()))
    missing = [b for b in wanted if b not in names]
    if missing:
        raise DataError(
            f"sample {sample_id}: the model needs {family} band(s) {missing} but the cube holds {list(names)}; "
            "rebuild the dataset with those bands or pick a model whose input spec matches")
    return [names.index(b) for b in wanted]


def _input_dates(spec: InputSpec, n_dates: int, sample_id: str) -> list[int]:
    """Indices of the optical input dates (the reference is index n_dates - 1)."""
    earlier = n_dates - 1
    need = spec.optical_dates - 1 if spec.includes_target_date else spec.optical_dates
    if earlier < need:
        raise DataError(
            f"sample {sample_id} has {n_dates} date(s) (incl. the reference) but the model needs {need} earlier "
            f"date(s) (optical_dates={spec.optical_dates}, includes_target_date={spec.includes_target_date}); "
            "rebuild the dataset with more dates per sample or use a model with fewer optical_dates")
    idx = list(range(earlier - need, earlier))
    if spec.includes_target_date:
        idx.append(n_dates - 1)
    return idx


def simulated_cloud(rng: np.random.Generator, h: int, w: int, cover: float) -> np.ndarray:
    """Cloud opacity in [0, 1]: a smooth multi-octave random field thresholded at the requested cover."""
    field = np.zeros((h, w), dtype=np.float32)
    for octave, amp in ((max(h, w) / 6.0, 1.0), (max(h, w) / 16.0, 0.5), (max(h, w) / 40.0, 0.25)):
        noise = rng.standard_normal((h, w)).astype(np.float32)
        field += amp * ndimage.gaussian_filter(noise, sigma=octave, mode="wrap")
    thr = np.quantile(field, 1.0 - cover)
    soft = max(float(field.std()) * 0.25, 1e-6)  # soft edges: opacity ramps up over a fraction of a std
    return np.clip((field - thr) / soft, 0.0, 1.0)


def _donor_date(rng: np.random.Generator, masks: np.ndarray) -> int | None:
    """An earlier date whose real cloud can be pasted (2..95 % cloud), or None when no date has one."""
    cloud_frac = (masks == MaskClass.CLOUD).mean(axis=(1, 2))
    usable = np.flatnonzero((cloud_frac >= 0.02) & (cloud_frac <= 0.95))
    return None if usable.size == 0 else int(rng.choice(usable))


def _real_cloud(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Opacity and shadow of a real mask."""
    alpha = ndimage.gaussian_filter((m == MaskClass.CLOUD).astype(np.float32), sigma=1.5)
    alpha = np.clip(alpha * 1.5, 0.0, 1.0)  # keep the core opaque, feather the edge
    return alpha, (m == MaskClass.SHADOW)


def _cloud_spectrum(rng: np.random.Generator, wavelengths: np.ndarray) -> np.ndarray:
    """A bright, white-ish cloud reflectance per band: flat in VIS/NIR, darker in SWIR (ice/water absorption)."""
    level = rng.uniform(0.45, 0.9)
    spec = np.full(wavelengths.shape, level, dtype=np.float32)
    swir = wavelengths > 1500
    spec[swir] *= rng.uniform(0.4, 0.75)
    spec[(wavelengths > 1300) & (wavelengths < 1450)] = rng.uniform(0.2, 0.5) * level  # cirrus band sees high ice only
    spec *= rng.uniform(0.95, 1.05, size=spec.shape).astype(np.float32)  # slight colour
    return np.clip(spec, 0.0, 1.0)


def paste_clouds(
    rng: np.random.Generator,
    clear: np.ndarray,
    wavelengths: np.ndarray,
    other_masks: np.ndarray | None,
    cfg: AugmentConfig,
    other_pixels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cloudy copy of ``clear`` (C, H, W) and its contamination mask (H, W) bool.

    A real cloud comes from ``other_masks`` (D, H, W) of earlier dates. With ``other_pixels`` (D, C, H, W, those
    dates' reflectance in ``clear``'s bands) it may bring its own pixels (``cfg.donor_pixels_prob``): the benchmark's
    paste, real cloud spectra, thin edges and shadows included, flagged where the donor's mask is not clear.
    """
    c, h, w = clear.shape
    alpha: np.ndarray | None = None
    shadow: np.ndarray | None = None
    if cfg.cloud_source != "simulated" and other_masks is not None and other_masks.size:
        use_real = cfg.cloud_source == "real" or rng.random() < 0.5
        donor = _donor_date(rng, other_masks) if use_real else None
        if donor is not None:
            if other_pixels is not None and rng.random() < cfg.donor_pixels_prob:
                m = other_masks[donor]
                hidden = (m != MaskClass.CLEAR) & (m != MaskClass.NODATA) & np.isfinite(other_pixels[donor]).all(0)
                cloudy = np.where(hidden[None], other_pixels[donor], clear)
                return np.clip(cloudy, 0.0, 1.0).astype(np.float32), hidden
            alpha, shadow = _real_cloud(other_masks[donor])
    if alpha is None:
        alpha = simulated_cloud(rng, h, w, float(rng.uniform(cfg.cover_min, max(cfg.cover_min, cfg.cover_max))))
    if shadow is None:
        shadow = np.zeros((h, w), dtype=bool)
    if rng.random() < cfg.thin_prob:
        alpha = alpha * rng.uniform(0.3, 0.7)
    alpha = np.where(alpha > _MARK_ALPHA, alpha, 0.0).astype(np.float32)  # unmarked pixels stay exactly clear
    if cfg.shadow and not shadow.any():
        # shadow = the cloud displaced along a random sun azimuth by a few percent of the patch
        ang = rng.uniform(0, 2 * np.pi)
        dist = rng.uniform(0.03, 0.12) * max(h, w)
        shifted = ndimage.shift(alpha, (dist * np.sin(ang), dist * np.cos(ang)), order=0, mode="constant", cval=0.0)
        shadow = (shifted > 0.5) & (alpha == 0)
    cloudy = clear.copy()
    if shadow.any():
        cloudy[:, shadow] *= np.float32(rng.uniform(0.3, 0.6))
    spectrum = _cloud_spectrum(rng, wavelengths)
    a = alpha[None].astype(np.float32)
    cloudy = (1.0 - a) * cloudy + a * spectrum[:, None, None]
    contaminated = (alpha > _MARK_ALPHA) | shadow
    return np.clip(cloudy, 0.0, 1.0).astype(np.float32), contaminated


def family_sensor(family: str) -> str:
    """The sensor key whose band table an optical family's (``s2``, ``landsat``) samples use."""
    return "s2_l1c" if family == "s2" else "landsat8_l2"


def _wavelengths(family: str, bands: tuple[str, ...]) -> np.ndarray:
    """Centre wavelengths (nm) of ``bands``; 0 for bands without one (they get the visible cloud level)."""
    sensor = SENSORS[family_sensor(family)]
    out = []
    for b in bands:
        wl = sensor.band(b).wavelength_nm if b in sensor.band_names else None
        out.append(wl or 0.0)
    return np.array(out, dtype=np.float32)


def model_arrays(
    optical: Sequence[np.ndarray],
    codes: Sequence[np.ndarray],
    sar: Sequence[np.ndarray] = (),
    *,
    contaminated: Sequence[np.ndarray | None] | None = None,
    where: str = "input",
    sar_labels: Sequence[str] = (),
    sar_fix: str = "",
) -> dict[str, np.ndarray]:
    """Per-date inputs in the cube's units -> the model arrays ``optical``, ``optical_mask``, ``sar`` (no batch axis).

    The one statement of the input rule that training (``assemble_sample``) and inference
    (``pipeline.reconstruct.mosaic.MosaicLoader``) share, so the model sees at inference what it saw in training:

    - ``optical[t]`` (C, H, W): reflectance in [0, 1] of input date ``t``; ``codes[t]`` (H, W) its cube mask codes.
      A pixel is invalid where its code is NODATA or one of its values is not finite; it is 0 in ``optical``.
      ``optical_mask`` (T, 1, H, W) is 1 wherever the date does not show clear ground: invalid, any code but
      CLEAR, or ``contaminated[t]`` (synthetic clouds pasted by training). Cloudy values are kept, only flagged.
    - ``sar[k]`` (S, H, W): S1 in [0, 1] of SAR slot ``k`` (the same array may fill several slots). A non-finite
      value is a ``DataError`` naming ``where``, the slot's ``sar_labels[k]`` and ``sar_fix``; SAR is never
      zero-filled, since a zero is a valid (very dark) backscatter.
    """
    arrays: dict[str, np.ndarray] = {}
    if len(optical):
        opt = np.empty((len(optical),) + optical[0].shape, dtype=np.float32)
        mask = np.empty((len(optical), 1) + optical[0].shape[1:], dtype=np.float32)
        for t, (x, code) in enumerate(zip(optical, codes)):
            valid = (code != MaskClass.NODATA) & np.isfinite(x).all(axis=0)
            opt[t] = x
            opt[t][:, ~valid] = 0.0
            bad = ~valid | (code != MaskClass.CLEAR)
            if contaminated is not None and contaminated[t] is not None:
                bad |= contaminated[t]
            mask[t, 0] = bad
        arrays["optical"], arrays["optical_mask"] = opt, mask
    if len(sar):
        gaps, checked = [], set()
        for k, s in enumerate(sar):
            if id(s) in checked:
                continue
            checked.add(id(s))
            missing = ~np.isfinite(s).all(axis=0)
            if missing.any():
                label = sar_labels[k] if k < len(sar_labels) else f"slot {k}"
                gaps.append(f"{label} ({missing.mean():.1%} of the pixels)")
        if gaps:
            fix = f"; {sar_fix}" if sar_fix else ""
            raise DataError(f"{where}: SAR has NaN/inf (no data) in {', '.join(gaps)}{fix}")
        arrays["sar"] = np.stack(sar).astype(np.float32, copy=False)
    return arrays


def composite_arrays(image: np.ndarray, provenance: np.ndarray, age_days: np.ndarray,
                     target: np.ndarray) -> dict[str, np.ndarray]:
    """A ``fill_gaps`` result -> a ``needs_composite`` model's ``composite`` (C, H, W) and ``composite_info`` (3, H, W).

    The rule training and inference (``pipeline.reconstruct.tiling``) share: where the fill has no value (no clear
    date), the composite holds the target's own value as observed, cloud and all (0 where it has none), and
    ``composite_info`` says so; values are clipped to [0, 1] as every output is.
    """
    comp = np.where(np.isfinite(image), image, np.nan_to_num(target, nan=0.0))
    info = np.stack([provenance == PROVENANCE_FILLED,
                     (provenance == PROVENANCE_NO_CLEAR) | (provenance == PROVENANCE_NODATA),
                     np.clip(age_days, 0, None) / AGE_SCALE]).astype(np.float32)
    return {"composite": np.clip(comp, 0.0, 1.0).astype(np.float32), "composite_info": info}


def _sample_composite(raw: Mapping[str, Any], opt: np.ndarray, masks: np.ndarray, valid: np.ndarray,
                      in_idx: list[int], cloudy: np.ndarray, contaminated: np.ndarray | None,
                      sample_id: str, fill: FillConfig, bands: Sequence[int] | None) -> dict[str, np.ndarray]:
    """The harmonized fill of the sample's (cloudy) reference from every earlier date of the sample, as inference
    runs it on the AOI: the reference is the last date, ages come from the sample's ``dates`` (days)."""
    if "dates" not in raw:
        raise DataError(f"sample {sample_id} has no 'dates': a refine model's composite needs each date's day to "
                        "harmonize by age; load it from a dataset cube (pipeline.dataset.cubes)")
    days = np.asarray(raw["dates"], dtype=np.int64)
    ref = opt.shape[0] - 1

    def refl(d: int, image: np.ndarray | None = None) -> np.ndarray:
        x = opt[d][in_idx] if image is None else image
        return np.where(valid[d][None], x, np.nan).astype(np.float32)

    history = [(float(days[ref] - days[d]), refl(d), valid[d] & (masks[d] == MaskClass.CLEAR))
               for d in range(ref) if days[ref] > days[d]]
    clear = valid[ref] & (masks[ref] == MaskClass.CLEAR)
    if contaminated is not None:
        clear &= ~contaminated
    target = refl(ref, cloudy)
    change = None
    if "s1" in raw:  # the S1 nearest each date, as reconstruct tests a flagged shadow against (FillLoader)
        s1 = unit_to_sar(np.asarray(raw["s1"], dtype=np.float32), tuple(raw.get("s1_bands") or S1_BANDS), axis=1)
        change = GroundChangeArrays([s1[ref]], {float(days[ref] - days[d]): s1[d] for d in range(ref)
                                                if days[ref] > days[d]})
    res = fill_gaps(target, clear, history, fill, shadow_bands=bands, ground_change=change)
    return composite_arrays(res.image, res.provenance, res.source_age_days, target)


def assemble_sample(
    raw: Mapping[str, Any],
    spec: InputSpec,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    index: int = 0,
    augment: AugmentConfig | None = None,
    fill: FillConfig | None = None,
) -> dict[str, Any]:
    """One raw cube sample -> the model's tensors (no batch axis) plus ``sample_id`` and ``cloud`` (H, W).

    ``needs_composite`` models also get the harmonized fill of the cloudy reference with ``fill`` (default: the
    default ``FillConfig``, as ``reconstruct`` runs it), computed before the crop so it sees the whole patch.
    """
    cfg = augment or AugmentConfig()
    family = spec.optical_sensor
    sample_id = str(raw.get("sample_id", f"#{index}"))
    if family not in raw:
        raise DataError(
            f"sample {sample_id} has no {family!r} array (keys: {sorted(raw)}); the model needs {family} optical input"
        )
    rng = np.random.default_rng(sample_seed(seed, epoch if train else -1, index))

    opt = np.asarray(raw[family], dtype=np.float32)
    n_dates = opt.shape[0]
    masks = np.asarray(raw.get(f"{family}_mask", np.zeros(opt.shape[:1] + opt.shape[2:], np.uint8)))
    valid = np.asarray(raw.get("valid", np.ones(masks.shape, bool)), dtype=bool) & np.isfinite(opt).all(axis=1)
    in_idx = _band_index(raw, family, spec.optical_bands, sample_id)
    out_idx = _band_index(raw, family, spec.out_bands, sample_id)
    dates = _input_dates(spec, n_dates, sample_id)
    ref = n_dates - 1
    wl = _wavelengths(family, spec.optical_bands)
    earlier_masks = masks[:ref]

    # Synthetic clouds go on the reflectance as observed; model_arrays then zeroes invalid pixels and flags both.
    optical, contaminated = [], []
    for d in dates:
        img, cont = opt[d][in_idx], None
        if d == ref and spec.includes_target_date:
            img, cont = paste_clouds(rng, np.nan_to_num(img), wl, earlier_masks, cfg, opt[:ref][:, in_idx])
        elif train and cfg.input_cloud_prob > 0 and masks[d].mean() < 0.05 and rng.random() < cfg.input_cloud_prob:
            img, cont = paste_clouds(rng, np.nan_to_num(img), wl, earlier_masks, cfg)
        optical.append(img)
        contaminated.append(cont)
    sar: list[np.ndarray] = []
    sar_dates = dates + [ref]
    if spec.sar_bands:
        if "s1" not in raw:
            raise DataError(
                f"sample {sample_id} has no 's1' array but the model needs SAR bands {list(spec.sar_bands)}; "
                "rebuild the dataset with s1 in the region's sensors")
        s1 = np.asarray(raw["s1"], dtype=np.float32)
        names = tuple(raw.get("s1_bands") or S1_BANDS)
        missing = [b for b in spec.sar_bands if b not in names]
        if missing:
            raise DataError(
                f"sample {sample_id}: the model needs SAR band(s) {missing} but the cube holds {list(names)}")
        sar_idx = [names.index(b) for b in spec.sar_bands]
        sar = [s1[d][sar_idx] for d in sar_dates]
    codes = [np.where(valid[d], masks[d], np.uint8(MaskClass.NODATA)) for d in dates]
    arrays = model_arrays(
        optical, codes, sar, contaminated=contaminated, where=f"sample {sample_id}",
        sar_labels=[f"date index {d}" for d in sar_dates],
        sar_fix="the cube builder must mask or drop samples without S1 coverage (cloudfree build-dataset), "
                "training never zero-fills them")
    if spec.needs_composite:
        arrays.update(_sample_composite(raw, opt, masks, valid, in_idx, optical[-1], contaminated[-1], sample_id,
                                        fill or FillConfig(),
                                        shadow_bands(family_sensor(family), spec.optical_bands)))
    arrays["target"] = np.where(valid[ref][None], np.nan_to_num(opt[ref][out_idx]), 0.0).astype(np.float32)
    arrays["target_valid"] = (valid[ref] & (masks[ref] == MaskClass.CLEAR))[None].astype(np.float32)

    if train:
        arrays = _crop(rng, arrays, cfg.crop)
        arrays = _flip_rotate(rng, arrays, cfg)
    out: dict[str, Any] = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    out["cloud"] = out["optical_mask"][-1, 0].clone()  # where the latest input does not see the ground
    out["sample_id"] = sample_id
    out["index"] = index
    return out


def _crop(rng: np.random.Generator, arrays: dict[str, np.ndarray], size: int | None) -> dict[str, np.ndarray]:
    h, w = arrays["target"].shape[-2:]
    if size is None or (size >= h and size >= w):
        return arrays
    y0 = int(rng.integers(0, max(h - size, 0) + 1))
    x0 = int(rng.integers(0, max(w - size, 0) + 1))
    return {k: a[..., y0: y0 + size, x0: x0 + size] for k, a in arrays.items()}


def _flip_rotate(rng: np.random.Generator, arrays: dict[str, np.ndarray], cfg: AugmentConfig) -> dict[str, np.ndarray]:
    """The same flip/rotation on every spatial array (the last two axes)."""
    flip_h = cfg.flips and rng.random() < 0.5
    flip_v = cfg.flips and rng.random() < 0.5
    h, w = arrays["target"].shape[-2:]
    k = int(rng.integers(0, 4)) if cfg.rot90 else 0
    if h != w:
        k = 2 * (k % 2)  # a quarter turn would swap H and W and break batching
    out = {}
    for name, a in arrays.items():
        if flip_h:
            a = a[..., ::-1]
        if flip_v:
            a = a[..., ::-1, :]
        if k:
            a = np.rot90(a, k=k, axes=(-2, -1))
        out[name] = a
    return out


class AssembledDataset(torch.utils.data.Dataset):
    """Wraps a raw-sample dataset; ``set_epoch`` changes the augmentation draw like DistributedSampler does."""

    def __init__(self, raw: torch.utils.data.Dataset, spec: InputSpec, *, train: bool, seed: int = 0,
                 augment: AugmentConfig | None = None, fill: FillConfig | None = None) -> None:
        self.raw, self.spec, self.train, self.seed = raw, spec, train, seed
        self.augment = augment or AugmentConfig()
        self.fill = fill or FillConfig()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.raw)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return assemble_sample(self.raw[index], self.spec, train=self.train, seed=self.seed, epoch=self.epoch,
                               index=index, augment=self.augment, fill=self.fill)


def model_inputs(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor keys of the spec contract (drops bookkeeping such as sample ids and the cloud map)."""
    return {k: v for k, v in batch.items()
            if k in ("optical", "optical_mask", "sar", "target", "target_valid", "composite", "composite_info")}
