"""Privacy measurements: how much of a request's content its routing fingerprint gives away."""
