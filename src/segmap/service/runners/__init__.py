"""Where a job's MAP container runs: the local Docker engine, or a Kubernetes cluster (one Job per segmap job)."""
