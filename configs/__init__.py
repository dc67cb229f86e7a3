"""Shipped YAML configs (package data). Each file's header comment is its launch command."""

from pathlib import Path

CONFIG_DIR = Path(__file__).parent
