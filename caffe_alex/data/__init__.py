"""Caffe's data formats and feeds: databases (db.py), Datum records (datum.py), the
DataTransformer (transformer.py; its mean and scale on the device: device_transform.py), record
sources (sources.py, array_sources.py, window_source.py; SSD's AnnotatedData: annotated.py with
its augmentation in ssd_augment.py), the feed of batches (loader.py, uint8 records through a ring
of reused shared buffers: ring.py) and the dataset tools (tools.py) behind ``convert-imageset``,
``compute-image-mean``, ``convert-mnist`` and ``db-info``, and SSD's ``convert-annoset``
(annoset.py)."""
