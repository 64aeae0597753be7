"""The TC classifier's C source (see hdrlog.c's top comment for its logic) and its build (build.py)."""

from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
