"""``cloudfree reconstruct``: AOI + date + checkpoint -> cloud-free COG, provenance, STAC Item, quicklook."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import List, Optional

import typer

from pipeline.cli.app import app, console, parse_date
from pipeline.sources.registry import SourceName, SourceSpec


class OutType(str, enum.Enum):
    float32 = "float32"
    uint16 = "uint16"


class AuxDates(str, enum.Enum):
    clearest = "clearest"
    latest = "latest"


class Compression(str, enum.Enum):
    deflate = "deflate"
    zstd = "zstd"


@app.command("reconstruct")
def reconstruct_cmd(
    region: str = typer.Argument(..., help="Region name (regions/NAME.yaml) or path to a region YAML file."),
    date: List[str] = typer.Option(..., "--date", help="Target date YYYY-MM-DD; repeat for several dates (a VRT stacks them)."),
    checkpoint: str = typer.Option("composite", "--checkpoint", help="Training run folder (model.pt + model.json) or 'composite' (no training)."),
    source: SourceName = typer.Option(SourceName.synthetic, "--source", help="Where the input scenes come from."),
    out: Path = typer.Option(Path("out"), "--out", help="Output folder (created if missing)."),
    keep_clear: bool = typer.Option(False, "--keep-clear", help="Keep observed clear pixels of the target date exactly; feather the seam."),
    dask_address: Optional[str] = typer.Option(None, "--dask-address", help="Address of a running dask.distributed scheduler, e.g. tcp://10.0.0.5:8786."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of GeoTIFFs for --source local."),
    tile: int = typer.Option(256, help="Model tile size in pixels."),
    overlap: int = typer.Option(64, help="Overlap between tiles in pixels (>= 32 recommended)."),
    batch_size: int = typer.Option(8, help="Tiles per model forward."),
    block: int = typer.Option(1024, help="Output block side (multiple of 512); bounds memory."),
    dtype: OutType = typer.Option(OutType.float32, "--dtype", help="float32 reflectance or uint16 DN (reflectance x 10000, scale 1e-4)."),
    compress: Compression = typer.Option(Compression.deflate, "--compress", help="COG compression."),
    mask_method: str = typer.Option("auto", "--mask-method", help="Cloud mask method (auto, s2cloudless, cloudscore, qa60, scl, qa_pixel, spectral)."),
    sar_max_days: int = typer.Option(6, "--sar-max-days", help="Max days between an optical date and the S1 used with it."),
    aux_dates: AuxDates = typer.Option(AuxDates.clearest, "--aux-dates", help="Earlier optical dates the model sees: the least cloudy within 30 days before --date, or the latest ones."),
    device: Optional[str] = typer.Option(None, "--device", help="torch device (default: cuda if available, else cpu)."),
) -> None:
    """Reconstruct cloud-free imagery for REGION on --date with a checkpoint; writes COG + provenance + STAC + quicklook."""
    from pipeline.reconstruct.run import reconstruct_dates

    options = SourceSpec.parse(source, root).kwargs()
    dates = [parse_date(d) for d in date]
    with console.status(f"reconstructing {region} on {', '.join(map(str, dates))} ..."):
        results, vrt = reconstruct_dates(
            region, dates, checkpoint, source.value, out,
            keep_clear=keep_clear, tile=tile, overlap=overlap, batch_size=batch_size, block=block,
            dtype=dtype.value, compress=compress.value, dask_address=dask_address, mask_method=mask_method,
            sar_max_days=sar_max_days, aux_dates=aux_dates.value, device=device, source_options=options,
        )
    for r in results:
        resumed = f" (resumed, {r.blocks_computed}/{r.blocks_total} blocks computed)" if r.resumed else ""
        console.print(f"[green]wrote[/] {r.cog}{resumed}")
        for extra in (r.provenance, r.uncertainty, r.stac, r.quicklook):
            if extra is not None:
                console.print(f"      {extra}")
    if vrt is not None:
        console.print(f"[green]wrote[/] {vrt}")
