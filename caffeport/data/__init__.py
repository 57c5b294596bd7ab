"""Caffe's data pipeline: the DataTransformer, record/batch sources and background prefetching."""

from caffeport.data.transformer import DataTransformer, read_mean_file

__all__ = ["DataTransformer", "read_mean_file"]
