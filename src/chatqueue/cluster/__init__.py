"""chatqueue on Ray Serve: replicas (one ChatQueue over one model each) behind one endpoint, with
Ray's request-router API, exact admission across replicas and the single server's HTTP surface.
Needs the `cluster` extra (`pip install chatqueue[cluster]`). Nothing in chatqueue imports this
package but the CLI."""

from chatqueue.cluster.deploy import app_for, build_app, serve_cluster

__all__ = ["app_for", "build_app", "serve_cluster"]
