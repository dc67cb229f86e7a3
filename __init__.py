"""cogcore: distill, personalize and serve small cognitive-core language models."""

__version__ = "0.1.0"
