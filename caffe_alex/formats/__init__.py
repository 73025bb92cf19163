"""Caffe's file formats, without the net builder: prototxt text and binary (prototxt.py), the
legacy-format upgrade rules (upgrade.py), NetState filtering (filtering.py), BlobProto <-> arrays
(blobs.py), weights (caffemodel.py, hdf5.py, torch_weights.py, with weights.py over them all)
and atomic writes (files.py)."""
