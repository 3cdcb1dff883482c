"""The calibration set shipped with recipe-compiler: images, ``manifest.jsonl`` and licences."""
from pathlib import Path

PATH = Path(__file__).resolve().parent
