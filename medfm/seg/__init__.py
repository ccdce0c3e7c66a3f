"""SAM segmentation: model zoo, embedding cache, prompt simulation, training, prediction,
evaluation and export to segment-anything's format.

Conventions shared by every module here (SAM's own):

- An image given to a predictor is a numpy array ``(H, W)`` grey or ``(H, W, 3)`` RGB, uint8;
  `medfm.seg.types.to_rgb_uint8` turns any 2D slice into one.
- Boxes are ``(N, 4)`` float ``x0, y0, x1, y1`` in pixels of the original image, x = column,
  y = row; points are ``(N, P, 2)`` ``x, y`` with labels ``(N, P)`` (1 positive, 0 negative).
- Masks are ``(N, H, W)`` bool at the original image size.
"""
