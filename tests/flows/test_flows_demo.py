"""``cloudfree demo`` end to end (build-dataset -> train-model -> reconstruct-aoi on zhengzhou-demo).

Training is shortened.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest


def test_the_model_replaces_the_composite_only_with_more_psnr_and_no_worse_mae():
    from flows.demo import choose

    comp = {"hidden_psnr": 26.18, "hidden_mae": 0.0178}
    assert choose({"unet": {"hidden_psnr": 26.69, "hidden_mae": 0.0232}, "composite": comp}, "unet") == "composite"
    assert choose({"unet": {"hidden_psnr": 26.80, "hidden_mae": 0.0170}, "composite": comp}, "unet") == "unet"
    assert choose({"unet": {"hidden_psnr": 26.50, "hidden_mae": 0.0100}, "composite": comp}, "unet") == "composite"
    assert choose({"unet": {"hidden_psnr": float("nan"), "hidden_mae": 0.01}, "composite": comp}, "unet") == "composite"


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_demo_command_writes_cog_stac_quicklook_and_prints_metrics(tmp_path):
    import rasterio
    from typer.testing import CliRunner

    import flows.cli  # noqa: F401  (registers `demo`)
    from pipeline.cli.app import app
    from pipeline.sensors import get_sensor

    out = tmp_path / "out"
    args = ["demo", "--epochs", "1", "--max-steps-per-epoch", "2", "--data-root", str(tmp_path / "data"),
            "--run", str(tmp_path / "run"), "--out", str(out), "--quiet"]
    from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    # a fresh machine: an empty Prefect home (the command creates it), no server running
    home = tmp_path / "prefect-home"
    with temporary_settings({PREFECT_HOME: home, PREFECT_LOCAL_STORAGE_PATH: home / "storage"}):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    # both reconstructions are written and scored on the simulator's truth; two training steps lose to the composite,
    # so the demo hands over the composite and says by how much
    unet, cog = out / "zhengzhou-demo_20210722_unet.tif", out / "zhengzhou-demo_20210722_composite.tif"
    assert unet.is_file()
    said = "".join(result.output.split())
    gap = re.search(r"Thedemo'soutputisthecomposite:unetscores(-\d+\.\d+)dBagainstitonthehiddenpixels"
                    r"\(MAE\d\.\d{4}vs\d\.\d{4}\),andamodelmustgain0\.5dBwithoutlosingonMAE", said)
    assert gap and float(gap.group(1)) < -1.0, result.output
    (chosen,) = [ln for ln in result.output.splitlines() if "composite (chosen)" in ln]
    psnr = float(chosen.split("│")[2])
    assert 20 < psnr < 45, chosen  # the composite on the demo date, against the truth: ~26 dB
    with rasterio.open(cog) as ds:
        assert ds.crs.to_string() == "EPSG:32649"
        assert list(ds.descriptions) == list(get_sensor("s2_l1c").reflectance_bands)
        assert ds.tags()["simulated"] == "true"
    item = json.loads(Path(str(cog).removesuffix(".tif") + ".json").read_text())
    assert item["assets"] and item["properties"]["proj:code"] == "EPSG:32649"
    assert (out / "zhengzhou-demo_20210722_composite_quicklook.png").is_file()
    # rich wraps long paths inside table cells: compare without whitespace and cell borders
    flat = "".join(result.output.replace("│", "").split())
    for needle in (str(cog), "STACitem", "quicklook", "unetall", "unetcloud", "baselineall", "baselinecloud",
                   "baseline=themostrecentclearobservation,notharmonized",
                   "PSNRdB"):
        assert needle in flat, needle
    # every cell of the metrics table holds a figure (all and cloud-covered pixels, model and composite)
    for label in ("PSNR dB", "SSIM", "MAE"):
        (line,) = [ln for ln in result.output.splitlines() if ln.strip("│┃ ").startswith(label)]
        cells = [c.strip() for c in line.strip("│┃ ").split("│")[1:]]
        # finite everywhere: no two synthetic overpasses are identical, so no baseline is "exact"
        assert len(cells) == 4 and all(re.fullmatch(r"-?\d+\.\d+", c) for c in cells), line
    # the water-under-cloud F1 of both methods, on cloud pixels only, where the test split has water under cloud
    (water,) = [ln for ln in result.output.splitlines() if ln.strip("│┃ ").startswith("water F1")]
    cells = [c.strip() for c in water.strip("│┃ ").split("│")[1:]]
    assert cells[0] == cells[2] == "-" and all(re.fullmatch(r"\d\.\d{3}", c) for c in cells[1::2]), water
    assert "WaterF1:mndwi>0.2" in flat
