"""Caffe's data formats: databases (db.py), Datum records (datum.py), mean files (mean.py) and
the dataset tools (tools.py) behind ``convert-imageset``, ``compute-image-mean``,
``convert-mnist`` and ``db-info``."""
