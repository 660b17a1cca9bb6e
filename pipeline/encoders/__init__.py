"""Vision encoders: image geometry (``geometry``) and the CLIP/SigLIP towers that turn tiles into tokens (``tower``)."""

from pipeline.encoders.geometry import (
    PreparedImage,
    anyres_grid,
    prepare_image,
    token_boxes,
)
from pipeline.encoders.tower import EncodedImage, VisionEncoder, checkpoint_preprocessing, normalize_pixels

__all__ = [
    "EncodedImage", "PreparedImage", "VisionEncoder", "anyres_grid", "checkpoint_preprocessing", "normalize_pixels",
    "prepare_image", "token_boxes",
]
