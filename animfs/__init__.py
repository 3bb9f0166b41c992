"""animfs: a shared DICOM archive in two object stores, served read-only as plain files."""

__version__ = "0.1.0"
