"""PyTorch cloud-removal architectures, losses and the model registry (no I/O, no Prefect, no rasterio)."""
