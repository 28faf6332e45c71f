"""A Flower app running hbfl_pyro's federated SVI on a model file."""
