"""Stage 2, dataset: region + source -> scene masks -> selected samples -> patch GeoTIFFs + manifest -> Zarr cubes."""
