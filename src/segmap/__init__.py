"""segmap: ship a MONet nnU-Net model and a Segmentation Task file as MONAI Application Packages.

The installable package holds the plain, graph-free logic (task files, model loading, the nnU-Net-faithful
engine, DICOM/NIfTI I/O) and the ``segmap`` command. The MONAI Deploy graph in the repository's ``app/`` and
``operators/`` folders is a thin shell over it.
"""

__version__ = "0.1.0"
