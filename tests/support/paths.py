"""Where the test data lives."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
TINY = DATA / "tiny-videochat"          # the official code's tiny checkpoint + golden.json (see its README.md)
VIDEOS = DATA / "videos"                # the video corpus (manifest.json says what each file is)
GOLDEN = json.loads((TINY / "golden.json").read_text())
CASES = {case["id"]: case for case in GOLDEN["cases"]}
