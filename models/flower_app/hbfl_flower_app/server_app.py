"""The ServerApp: hbfl_pyro's server (closed-form or gradient mode) as a Flower strategy."""

from hbfl_pyro.flower import server_app

app = server_app()
