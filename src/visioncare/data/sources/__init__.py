"""Dataset sources: each turns one public dataset's files into `Record` lists per split."""

from visioncare.data.sources.base import DatasetSource
from visioncare.data.sources.idrid import IDRiDSource
from visioncare.data.sources.synthetic import SyntheticSource

__all__ = ["DatasetSource", "IDRiDSource", "SyntheticSource"]
