"""What runs on a built net: draw, summary, timing, deploy (Classifier), images (pycaffe's
caffe.io), features, plot_log and onnx_export. Each is a library module the commands wrap."""
