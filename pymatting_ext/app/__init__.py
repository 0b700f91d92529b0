"""The application built on the library: the ``pymatting-ext`` command line
(cli), matting videos and images (sources -> pipeline -> sinks), the
synthetic demo clip, the whole-model speed test and the exporters.

Layering: the library (``pymatting_ext``: ops, Refiner, models) never imports
this package; the one exception is the lazy attribute
``pymatting_ext.convert_video``, kept for compatibility, which imports
``app.pipeline`` on first use. The optional packages (PyAV, tqdm, Pillow,
matplotlib, onnx) are imported where they are used (``common.require``).
"""
