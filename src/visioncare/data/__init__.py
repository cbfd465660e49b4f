"""Data: dataset sources, synthetic generator, preprocessing cache, transforms, datamodule."""

from visioncare.data.datamodule import FundusDataModule
from visioncare.data.records import Record, stratified_split

__all__ = ["FundusDataModule", "Record", "stratified_split"]
