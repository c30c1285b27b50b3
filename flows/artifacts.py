"""Prefect artifacts of the flows: markdown summaries, metric tables, the quicklook (shown in the UI)."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from prefect.artifacts import create_markdown_artifact, create_table_artifact

THUMB_SIDE = 480


def _key(key: str) -> str:
    # artifact keys: lower-case letters, digits and dashes only
    return "".join(c if c.isalnum() else "-" for c in key.lower()).strip("-")


def publish_markdown(key: str, markdown: str, description: str) -> None:
    create_markdown_artifact(markdown=markdown, key=_key(key), description=description)


def publish_table(key: str, rows: Sequence[Mapping[str, Any]], description: str) -> None:
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]
    create_table_artifact(table=clean, key=_key(key), description=description)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def build_summary_markdown(summary: Mapping[str, Any], stats: Sequence[Mapping[str, Any]]) -> str:
    """The dataset report (scenes, splits, rejected patches by reason, cloud histogram) + per-scene masks."""
    lines = [str(summary["markdown"]).rstrip(), "", f"Dataset folder: `{summary['out']}`", "",
             "## Scenes masked (whole region grid)", "",
             "| scene | sensor | date | cloud | shadow | valid | mask method |", "|---|---|---|---:|---:|---:|---|"]
    lines += [f"| {s['scene_id']} | {s['sensor']} | {s['date']} | {_pct(s['cloud_fraction'])} "
              f"| {_pct(s['shadow_fraction'])} | {_pct(s['valid_fraction'])} | {s['mask_method']} |" for s in stats]
    return "\n".join(lines) + "\n"


def metrics_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``pipeline.train.evaluate.evaluate`` output -> one row per method, all pixels and cloud-covered pixels."""
    from pipeline.train.evaluate import METRICS

    rows = []
    for who in ("model", "composite"):
        s = result["results"][who]["all"]
        method = result["model"] if who == "model" else "composite (recent clear)"
        row: dict[str, Any] = {"method": method, "split": result["split"], "samples": result["n_samples"]}
        row.update({f"{k}_all": round(float(s.get(k, math.nan)), 4) for k in METRICS})
        # evaluate's scores over cloud-covered pixels are named cloud_<metric>
        row.update({f"{k}_cloud": round(float(s.get(f"cloud_{k}", math.nan)), 4) for k in METRICS})
        rows.append(row)
    return rows


def thumbnail_data_uri(png: str | Path, side: int = THUMB_SIDE) -> str:
    from PIL import Image

    with Image.open(png) as im:
        im.thumbnail((side * 2, side))  # the quicklook is two panels side by side
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def publish_quicklook(key: str, png: str | Path, title: str) -> None:
    """The quicklook as a markdown artifact with an embedded thumbnail (the UI cannot read local files)."""
    md = f"# {title}\n\n![quicklook]({thumbnail_data_uri(png)})\n\nFull size: `{Path(png).resolve()}`\n"
    publish_markdown(key, md, title)
