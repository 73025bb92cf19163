"""The pieces of ``caffe_alex.net.Net``, one job a module: the plan's records (plan), the
builder that wires a filtered net into that plan (builder), the checks of each layer's
declaration (checks), learnable blobs and their sharing (params), shape inference after the
build (shapes) and the thread policy (threads). Net itself keeps its public surface and the
one forward loop over the plan (``Net.run``)."""
