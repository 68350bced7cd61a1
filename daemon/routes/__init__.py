"""The routes an object's bytes can take from S3 to Azure (see transfer.py)."""

from daemon.routes.base import Handoff, Route
from daemon.routes.blocks import Blocks
from daemon.routes.pipe import Pipe
from daemon.routes.server_side import ServerSide, SourceUrls
from daemon.routes.whole import Whole

__all__ = ["Blocks", "Handoff", "Pipe", "Route", "ServerSide", "SourceUrls", "Whole"]
