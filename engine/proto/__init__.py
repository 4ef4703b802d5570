"""Caffe protobuf schema (caffe.proto) and its generated Python module.

Regenerate caffe_pb2 with ``python -m engine.proto.generate``.
"""

from . import caffe_pb2

__all__ = ["caffe_pb2"]
