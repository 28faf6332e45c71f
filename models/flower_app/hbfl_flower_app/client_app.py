"""The ClientApp: hbfl_pyro's client update on the node's own data (by partition-id)."""

from hbfl_pyro.flower import client_app

app = client_app()
