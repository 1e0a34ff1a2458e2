"""`python -m videochat serve`: find tritonserver, prepare the python stub, render the model repository, run."""
