"""The synthetic archive: a deterministic simulator of S2/Landsat/S1 with the true cloud-free scene."""
