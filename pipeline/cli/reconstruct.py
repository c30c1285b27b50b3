"""``cloudfree reconstruct``: AOI + date + checkpoint -> cloud-free COG, provenance, STAC Item, quicklook.

The options are the fields of ``pipeline.reconstruct.config.ReconstructConfig``: their defaults, help texts
and rules live there, and a bad value comes back as one line naming the option (exit code 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from pipeline.cli.app import app, console, parse_date
from pipeline.errors import cli_option
from pipeline.reconstruct.config import AuxDates, Compression, OutType, ReconstructConfig
from pipeline.sources.registry import SourceName, SourceSpec


def _option(field: str) -> Any:
    """A typer option of a config field: the config's default and description, spelled ``--field-name``."""
    info = ReconstructConfig.model_fields[field]
    return typer.Option(info.default, cli_option(field), help=info.description)


@app.command("reconstruct")
def reconstruct_cmd(
    region: str = typer.Argument(..., help="Region name (regions/NAME.yaml) or path to a region YAML file."),
    date: List[str] = typer.Option(
        ..., "--date", help="Target date YYYY-MM-DD; repeat for several dates (a VRT stacks them)."),
    checkpoint: str = typer.Option(
        "composite", "--checkpoint", help="Training run folder (model.pt + model.json) or 'composite' (no training)."),
    source: SourceName = typer.Option(SourceSpec.model_fields["name"].default, "--source",
                                      help="Where the input scenes come from."),
    out: Path = typer.Option(Path("out"), "--out", help="Output folder (created if missing)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder of GeoTIFFs for --source local."),
    keep_clear: bool = _option("keep_clear"),
    dask_address: Optional[str] = _option("dask_address"),
    tile: int = _option("tile"),
    overlap: int = _option("overlap"),
    batch_size: int = _option("batch_size"),
    block: int = _option("block"),
    dtype: OutType = _option("dtype"),
    compress: Compression = _option("compress"),
    mask_method: str = _option("mask_method"),
    sar_max_days: int = _option("sar_max_days"),
    aux_dates: AuxDates = _option("aux_dates"),
    device: Optional[str] = _option("device"),
) -> None:
    """Reconstruct cloud-free imagery for REGION on --date with a checkpoint: COG, provenance, STAC Item, quicklook."""
    config = ReconstructConfig.parse({
        "source": SourceSpec.parse(source, root), "keep_clear": keep_clear, "dask_address": dask_address, "tile": tile,
        "overlap": overlap, "batch_size": batch_size, "block": block, "dtype": dtype, "compress": compress,
        "mask_method": mask_method, "sar_max_days": sar_max_days, "aux_dates": aux_dates, "device": device,
    }, option=cli_option)
    dates = [parse_date(d) for d in date]
    from pipeline.reconstruct.run import reconstruct_dates  # torch, rasterio: only once a command runs

    with console.status(f"reconstructing {region} on {', '.join(map(str, dates))} ..."):
        results, vrt = reconstruct_dates(region, dates, checkpoint, out, config)
    for r in results:
        resumed = f" (resumed, {r.blocks_computed}/{r.blocks_total} blocks computed)" if r.resumed else ""
        console.print(f"[green]wrote[/] {r.cog}{resumed}")
        for extra in (r.provenance, r.uncertainty, r.stac, r.quicklook):
            if extra is not None:
                console.print(f"      {extra}")
    if vrt is not None:
        console.print(f"[green]wrote[/] {vrt}")
