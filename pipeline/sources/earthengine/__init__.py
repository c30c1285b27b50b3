"""The Earth Engine source: collections, server-side masks, pixels by ``computePixels``, batch exports."""
