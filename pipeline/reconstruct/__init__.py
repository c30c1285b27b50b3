"""Stage 4, reconstruction: AOI + date + checkpoint -> cloud-free COG, provenance, STAC Item, quicklook."""
