"""``ReconstructConfig``: one place for the options' defaults and rules, one-line errors, a light CLI import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.errors import CloudfreeError, cli_option
from pipeline.reconstruct.config import ReconstructConfig, ReconstructConfigError


@pytest.mark.parametrize("values, needle", [
    ({"tile": 100}, "tile 100: must be a positive multiple of 8"),
    ({"tile": 0}, "tile 0: must be a positive multiple of 8"),
    ({"overlap": 16}, r"overlap 16: narrower than 32 px leaves visible tile seams; pick 32 to 255"),
    ({"tile": 64, "overlap": 64}, r"overlap 64: must be smaller than the tile \(64 px\); pick 32 to 63 or a larger"),
    ({"block": 1000}, "block 1000: must be a positive multiple of 512"),
    ({"batch_size": 0}, "batch_size 0: .*greater than or equal to 1"),
    ({"feather": -1}, "feather -1: .*greater than or equal to 0"),
    ({"floor": 1.0}, "floor 1.0: .*less than 1"),
    ({"mask_method": "magic"}, "mask_method 'magic': unknown mask method; use one of: auto, s2cloudless"),
    ({"dtype": "int8"}, "dtype 'int8': Input should be 'float32' or 'uint16'"),
    ({"compress": "lzw"}, "compress 'lzw': Input should be 'deflate' or 'zstd'"),
    ({"sar_max_days": -1}, "sar_max_days -1: .*greater than or equal to 0"),
    ({"source": {"name": "local"}}, "source: --source local needs --root DIR"),
])
def test_each_rule_is_one_line_naming_the_option(values, needle):
    with pytest.raises(ReconstructConfigError, match=needle) as exc:
        ReconstructConfig.parse(values)
    assert "\n" not in str(exc.value) and isinstance(exc.value, CloudfreeError)
    with pytest.raises(ValidationError):  # the model itself refuses the value too, whoever builds it
        ReconstructConfig(**values)


def test_errors_use_the_cli_spelling_and_are_all_reported():
    with pytest.raises(ReconstructConfigError) as exc:
        ReconstructConfig.parse({"batch_size": 0, "block": 1000}, option=cli_option)
    msg = str(exc.value)
    assert msg.startswith("--batch-size 0: ") and "; --block 1000: must be a positive multiple of 512" in msg


def test_defaults_and_frozen():
    cfg = ReconstructConfig()
    assert (cfg.tile, cfg.overlap, cfg.batch_size, cfg.block, cfg.feather) == (256, 64, 8, 1024, 16)
    assert cfg.dtype == "uint16" and cfg.compress == "deflate" and cfg.aux_dates == "clearest"
    assert cfg.source.name == "synthetic" and type(cfg.source.build()).__name__ == "SyntheticSource"
    with pytest.raises(ValidationError):
        cfg.tile = 512  # type: ignore[misc]
    assert all(f.description for f in ReconstructConfig.model_fields.values())


def test_cli_options_take_defaults_and_help_from_the_config():
    import typer.main

    import pipeline.cli.reconstruct  # noqa: F401  (registers the command)
    from pipeline.cli.app import app

    command = typer.main.get_command(app).commands["reconstruct"]
    fields = ReconstructConfig.model_fields
    seen = set()
    for param in command.params:
        if param.name in fields and param.name != "source":  # --source/--root build the SourceSpec
            default = fields[param.name].default
            assert param.default == getattr(default, "value", default), param.name
            assert param.help == fields[param.name].description, param.name
            seen.add(param.name)
    assert {"tile", "overlap", "batch_size", "block", "keep_clear", "dtype", "compress", "mask_method", "sar_max_days",
            "aux_dates", "device", "dask_address"} <= seen


def test_cli_bad_option_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    import pipeline.cli.reconstruct  # noqa: F401  (registers the command)
    from pipeline.cli import main

    monkeypatch.setattr(sys, "argv", ["cloudfree", "reconstruct", "zhengzhou-demo", "--date", "2021-07-22",
                                      "--out", str(tmp_path), "--tile", "128", "--overlap", "128"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--overlap 128: must be smaller than the tile (128 px)" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # refused before any work


def test_config_module_imports_no_heavy_library():
    heavy = ("torch", "rasterio", "xarray", "zarr")
    code = f"import sys, pipeline.reconstruct.config; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("compress", ["deflate", "zstd"])
def test_default_dtype_round_trips_within_one_dn(tmp_path, compress):
    """The default output (uint16 DN, scale 1e-4) reads back within 1e-4 of the float32 reflectance: half a DN of
    rounding elsewhere, one DN at reflectance 0 (DN 0 is nodata, so 0 is stored as DN 1, as in S2 products)."""
    import rasterio
    from affine import Affine

    from pipeline.grid import Grid
    from pipeline.reconstruct.cog import RasterSpec, write_cog

    cfg = ReconstructConfig.parse({"compress": compress})
    grid = Grid("EPSG:32650", Affine(10, 0, 200_000, 0, -10, 3_000_000), 96, 64)
    rng = np.random.default_rng(3)
    refl = rng.uniform(0, 1.2, (3, 64, 96)).astype(np.float32)
    refl[0, 0, :8] = [0.0, 0.00004, 0.00005, 0.00015, 0.12345, 0.99995, 1.0, 6.5535]
    refl[1, :4, :4] = np.nan
    path = write_cog(tmp_path / "r.tif", refl, grid, RasterSpec.reflectance(["B4", "B3", "B2"], dtype=cfg.dtype),
                     compress=cfg.compress)
    with rasterio.open(path) as ds:
        assert ds.dtypes[0] == "uint16" and ds.nodata == 0 and ds.compression.name.lower() == compress
        dn = ds.read()
        back = dn * np.float32(ds.scales[0]) + np.float32(ds.offsets[0])  # as a reader decodes it, in float32
    valid = ~np.isnan(refl)
    assert np.array_equal(dn == 0, ~valid)  # nodata stays nodata, nothing else becomes nodata
    err = np.abs(back[valid] - refl[valid])
    assert err.max() <= 1e-4 + 1e-7
    away = valid & (refl >= 0.5e-4)
    assert np.abs(back[away] - refl[away]).max() <= 0.5e-4 + 1e-7
    assert dn[0, 0, 0] == 1 and dn[0, 0, 7] == 65535
