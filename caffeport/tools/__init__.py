"""Caffe's command-line tools as library functions (the CLI wraps them in ``caffeport.cli.tool_cmds``).

- :func:`convert_imageset` - ``tools/convert_imageset.cpp``: an image list → an LMDB/LevelDB of Datums;
- :func:`compute_image_mean` - ``tools/compute_image_mean.cpp``: a Datum DB → ``mean.binaryproto``;
- :func:`extract_features` - ``tools/extract_features.cpp``: net blobs → float Datum DBs.
"""

from caffeport.tools.features import extract_features
from caffeport.tools.imageset import convert_imageset
from caffeport.tools.mean import compute_image_mean

__all__ = ["convert_imageset", "compute_image_mean", "extract_features"]
