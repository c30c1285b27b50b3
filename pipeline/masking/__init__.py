"""Stage 1, masking: a scene raster -> a per-pixel class mask (clear, cloud, thin cloud, shadow, snow, nodata)."""
