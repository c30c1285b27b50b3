"""Stage 0, sources: a region + dates -> ``Scene`` records and pixels on any ``Grid``.

``base`` is the protocol every source implements (``search`` and ``read``); ``registry`` names the
sources and builds one from a ``SourceSpec``; ``synthetic/`` (the embedded default, with truth),
``local/`` (folders of GeoTIFFs) and ``earthengine/`` are the implementations.
"""
