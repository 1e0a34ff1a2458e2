"""Video/image bytes -> InternVideo2-Chat-8B-HD model input (the model card's `load_video`).

    from preprocessing import preprocess
    res = preprocess(open("clip.mp4", "rb").read())   # padding=False, 8 frames, 224
    res.pixel_values    # float32 [1, 3, 8, 3, 224, 224]
    res.metadata.message

Pure torch + PyAV; no Triton. See docs/preprocessing.md.
"""

from .errors import VideoDecodeError
from .limits import Limits
from .pipeline import PreprocessMetadata, PreprocessResult, preprocess

__all__ = ["Limits", "PreprocessMetadata", "PreprocessResult", "VideoDecodeError", "preprocess"]
