"""Step 0 of the pipeline, and its bottom layer: model inputs and where they come from.

- :mod:`.inputs`: :class:`InputSet`, one array per model input (images; token ids + mask);
- :mod:`.preprocess`: image preprocessing, shared by calibration and the edge runtime
  (numpy + Pillow only: the edge image has no torch);
- :mod:`.sources`: ``.npy``/``.npz`` files and image folders, loaded and validated;
- :mod:`.photos`, :mod:`.fashion_mnist`, :mod:`.text`: real data that ships in packages.

Nothing here knows about models, examples or quantization.
"""
