"""comp: a toolkit for the Raidium few-shot CT segmentation challenge (ENS Challenge Data 150)."""

__version__ = "0.1.0"
