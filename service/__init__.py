"""The workers' layer: what every worker process (P, D, both) shares around its engine: its
config (`config.py`), the step loop over the data-path socket (`loop.py`), the operator HTTP
surface (`ops_http.py`) and the Prometheus metrics (`metrics.py`)."""
