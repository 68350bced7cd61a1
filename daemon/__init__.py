"""blobferry: stream objects from Amazon S3 to Azure Blob Storage."""

from __future__ import annotations

__version__ = "0.1.0"
