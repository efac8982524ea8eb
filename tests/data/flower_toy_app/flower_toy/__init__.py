"""A toy Flower app for the deployment tests: FedAvg over one small array."""
