"""Caffe's data formats and feeds: databases (db.py), Datum records (datum.py), the
DataTransformer (transformer.py), record sources (sources.py, array_sources.py), the feed of
batches (loader.py) and the dataset tools (tools.py) behind ``convert-imageset``,
``compute-image-mean``, ``convert-mnist`` and ``db-info``."""
