"""How much /dev/shm one replica needs: the rule behind `shm_size` (compose) and the memory emptyDir (Kubernetes);
docs/deployment.md, "Shared memory sizing".

Each python stub (one per model instance) moves its requests' tensors through its own region in /dev/shm, which
grows in `--shm-growth-mb` steps and never shrinks while the stub lives (triton_facts.md §3). Its peak is what
one `execute` holds at once:
* a `preprocessing` stub: one upload (`--max-video-bytes`; a 1 GiB BYTES request grew a region to 1.42 GB, so
  x1.4) plus the pixels it returns;
* a `videochat_llm` stub: a batch of pixels (`--max-batch-size` requests).
Each peak is rounded up to whole growth steps, plus one step of headroom per stub. Docker's 64 MB default fails
as soon as a few requests run at once (`Failed to increase the shared memory pool size`).
"""
from __future__ import annotations

import math
import os

PIXEL_BYTES = 3 * 224 * 224 * 2        # one fp16 224x224 RGB tile of one frame
UPLOAD_FACTOR = 1.4                    # region size / BYTES input size, measured on 2.51


def request_pixel_bytes(num_segments: int = 8, hd_num: int = 6) -> int:
    """fp16 PIXEL_VALUES of the largest request with these options: at most hd_num + 1 clips (tiles + global)."""
    return (hd_num + 1) * num_segments * PIXEL_BYTES


def shm_bytes_needed(*, preprocess_instances: int, instances: int, max_batch_size: int, max_video_bytes: int,
                     pixel_bytes: int = request_pixel_bytes(), growth_mb: int = 64) -> int:
    step = growth_mb * 1024 * 1024

    def region(peak: float) -> int:
        return (math.ceil(peak / step) + 1) * step

    preprocessing = region(UPLOAD_FACTOR * max_video_bytes + pixel_bytes)
    llm = region(max_batch_size * pixel_bytes)
    return preprocess_instances * preprocessing + instances * llm


def shm_size(path: str = "/dev/shm") -> int | None:
    """Size of the file system at `path` in bytes (None if it cannot be read)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize
