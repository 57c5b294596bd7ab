"""pycaffe's ``caffe.proto``: ``from caffeport.compat.proto import caffe_pb2`` stands for
``from caffe.proto import caffe_pb2`` (the same generated module as ``caffeport.proto.caffe_pb2``)."""

from caffeport.proto import caffe_pb2

__all__ = ["caffe_pb2"]
