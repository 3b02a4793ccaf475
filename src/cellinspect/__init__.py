"""cellinspect: defect inspection for battery cell production."""

__version__ = "0.1.0"
