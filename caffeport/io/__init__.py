"""Every Caffe file format, read and written as BVLC Caffe does (LMDB/Datum live in caffeport.data).

Nets and solvers come back *upgraded* (V0/V1 layers, input fields, BatchNorm specs, solver_type);
weights come back as ``{layer name: [numpy arrays]}`` decoded straight from the wire format.
Every writer writes a temp file beside the target and renames it into place.
"""

from __future__ import annotations

from caffeport.io.blobs import (
    array_to_blobproto,
    blobproto_to_array,
    read_blobproto,
    read_blobproto_vector,
    write_blobproto,
    write_blobproto_vector,
)
from caffeport.io.caffemodel import load_caffemodel, load_caffemodel_net, save_caffemodel
from caffeport.io.prototxt import CaffeportWarning, read_net, read_solver, write_net, write_solver
from caffeport.io.solverstate import SolverStateData, read_solverstate, write_solverstate
from caffeport.io.upgrade import upgrade_net, upgrade_solver

__all__ = [
    "read_net",
    "read_solver",
    "write_net",
    "write_solver",
    "load_caffemodel",
    "load_caffemodel_net",
    "save_caffemodel",
    "read_blobproto",
    "write_blobproto",
    "read_blobproto_vector",
    "write_blobproto_vector",
    "blobproto_to_array",
    "array_to_blobproto",
    "read_solverstate",
    "write_solverstate",
    "SolverStateData",
    "upgrade_net",
    "upgrade_solver",
    "CaffeportWarning",
]
