"""`python -m videochat serve`: render a self-contained model repository and supervise tritonserver."""
