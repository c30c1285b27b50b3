"""Stage 3, training: Zarr cubes -> model tensors -> a validated checkpoint (``model.pt`` + ``model.json``)."""
