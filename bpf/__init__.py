"""The TC classifier's C source; see hdrlog.c for its logic."""

from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
